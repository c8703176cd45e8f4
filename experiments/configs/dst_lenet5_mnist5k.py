"""`dst_lenet300100_mnist5k.py` on LeNet-5 (60,850 prunable weights) for 12
epochs (a step costs ~10x): a mask update every half epoch (ΔT = 15 steps)
until epoch 9 (3/4). The table's command: experiments/results/dst_lenet5/results.md.
"""

from experiments.configs import _base


def get_config():
  return _base.mnist5k_config(
      "lenet5", method="dst_ee", num_epochs=12, lr_schedule="cosine",
      lr_decay_epochs=None, sparsity=0.9, every_epochs=0.5,
      end_epoch=9.0, exploration=1e-3)
