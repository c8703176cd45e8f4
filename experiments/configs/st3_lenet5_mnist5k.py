"""`st3_lenet300100_mnist5k.py` on LeNet-5 for 12 epochs (a step costs ~10x),
cosine lr; the ramp from epoch 0.375 to 6 (5 → 80 of 160); the last epoch
fine-tunes under the frozen mask. The table's command:
experiments/results/st3_lenet5/results.md.
"""

from experiments.configs import st3_lenet300100_mnist5k


def get_config():
  return st3_lenet300100_mnist5k.get_config(
      "lenet5", num_epochs=12, lr_schedule="cosine", lr_decay_epochs=None,
      start_epoch=0.375, end_epoch=6.0, freeze_epoch=11.0)
