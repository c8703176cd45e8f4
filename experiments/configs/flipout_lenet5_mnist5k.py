"""`flipout_lenet300100_mnist5k.py` on LeNet-5 (61,706 parameters, 60,850
prunable): 80 epochs, an event every 9 epochs, 8 halvings to 99.61 %."""

from experiments.configs import _base


def get_config():
  c = _base.mnist5k_config("lenet5", method="flipout", every_epochs=9.0)
  c.presets.hoyer_square.update(strength=3e-5, finetune_epochs=20,
                                finetune_lr=0.005)
  return c
