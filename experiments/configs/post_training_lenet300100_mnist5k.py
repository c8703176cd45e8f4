"""Post-training sparsity on LeNet-300-100, mnist_5k: magnitude, Wanda, SparseGPT, OWL.

The LeNet-5 file's methods (`post_training_lenet5_mnist5k.py`) on the
dense LeNet-300-100 teachers of `unipts_lenet300100_mnist5k.py` (30 epochs
of SGD, cosine lr from 0.05), pruned once without fine-tuning from
`--config.init_from=<teacher workdir>` on `calibration_size` = 512 train
images drawn by the seed. Every input width (784, 300, 100) is a multiple
of 4, so 2:4 (`--config.structure=2:4`, sparsity 0.5) holds every layer.
The commands are in experiments/results/post_training_lenet300100_mnist5k/
results.md.
"""

from experiments.configs import post_training_lenet5_mnist5k


def get_config():
  return post_training_lenet5_mnist5k.get_config("lenet300100")
