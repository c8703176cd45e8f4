"""Structured gradual magnitude pruning on mnist_5k: `coupled:l2` removes whole
traced dependency groups by L2 norm, the same fraction of every group, at
epochs 1-4, then fine-tunes to 12 (cosine). Commands, baseline, VGG-11:
experiments/results/structured_mnist5k/results.md."""

from experiments.configs import _base


def get_config():
  return _base.mnist5k_config("lenet5", "global_magnitude", num_epochs=12,
                              lr_schedule="cosine", lr_decay_epochs=None,
                              every_epochs=1.0, distribution="uniform",
                              structure="coupled:l2")
