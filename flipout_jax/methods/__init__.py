"""Public constructors of the pruning and sparse-training methods."""
