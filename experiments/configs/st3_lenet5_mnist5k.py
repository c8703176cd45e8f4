"""ST-3 / ST-3σ on LeNet-5, mnist_5k (CPU scale, issue 4).

As `st3_lenet300100_mnist5k.py` but LeNet-5 for 12 epochs (a LeNet-5 step
costs ~10x a LeNet-300-100 step): SGD lr 0.05 momentum 0.9 weight decay 5e-4,
cosine lr; the cubic ramp from epoch 0.375 to 6 (the reference's 5 → 80 of
160); the last epoch fine-tunes under the frozen mask. Sparsity: `target`
(75, 93.75, 98.44, 99.61, 99.9 %) or `sparsity`.

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
