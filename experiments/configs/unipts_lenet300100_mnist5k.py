"""UniPTS post-training sparsity of a dense LeNet-300-100 on `mnist_5k`: the
LeNet-5 file's recipe (`unipts_lenet5_mnist5k.py`) with the other model."""

from experiments.configs import unipts_lenet5_mnist5k


def get_config():
  return unipts_lenet5_mnist5k.get_config("lenet300100")
