"""`flipout_lenet300100_mnist5k.py` on LeNet-5 (61,706 parameters, 60,850
prunable): 80 epochs, an event every 9 epochs, 8 halvings to 99.61 %."""

from experiments.configs import flipout_lenet300100_mnist5k


def get_config():
  c = flipout_lenet300100_mnist5k.get_config()
  c.model = "lenet5"
  return c
