"""N:M structured sparsity on LeNet-300-100, mnist_5k: `method_kw.structure`.

The mnist5k recipe (80 epochs, ~20 s a run). Every layer has 784, 300 or 100
inputs, so ends exactly N:M: sparsity 1 − N/M (50 % at 2:4, 75 % at 1:4). The
gradual methods share epochs 2.5 → 40 (ST-3's reference proportions, 5 → 80 of
160): ST-3's cubic ramp (the last 5 epochs fine-tune under the frozen mask),
global magnitude / FlipOut's events; RigL updates every epoch until epoch 60.
The table's command: experiments/results/nm_lenet300100/results.md.

    python -m experiments.main --config experiments/configs/nm_lenet300100_mnist5k.py \
        --config.method_kw.structure=2:4
"""

from experiments.configs import _base


def get_config():
  c = _base.mnist5k_config("lenet300100", method="st3", start_epoch=2.5,
                           end_epoch=40.0, freeze_epoch=75.0)
  c.presets.rigl = dict(every_epochs=1.0, end_epoch=60.0)
  return c
