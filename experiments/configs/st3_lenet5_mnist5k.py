"""`st3_lenet300100_mnist5k.py` on LeNet-5 for 12 epochs (a step costs ~10x),
cosine lr; the ramp from epoch 0.375 to 6 (5 → 80 of 160); the last epoch
fine-tunes under the frozen mask.

    python -m experiments.sweep --config experiments/configs/st3_lenet5_mnist5k.py \
        --grid method=st3,st3_sigma --grid target=75,93.75,98.44,99.61 \
        --seeds 42,43,44 --workers 1 --out experiments/results/st3_lenet5
"""

from experiments.configs import _base


def get_config():
  c = _base.mnist5k_config("lenet5", method="st3", num_epochs=12,
                           lr_schedule="cosine", lr_decay_epochs=None,
                           start_epoch=0.375, end_epoch=6.0, freeze_epoch=11.0)
  c.target = 99.61
  for name in ("flipout", "global_magnitude"):
    c.presets[name] = dict(c.presets.get(name, {}), start_epoch=0.0,
                           end_epoch=None)
  return c
