"""N:M structured sparsity on LeNet-300-100, mnist_5k: `method_kw.structure`.

The mnist5k recipe (80 epochs; ~20 s per run on 2 CPU cores). Every layer has
784, 300 or 100 inputs, so every layer ends exactly N:M: sparsity 1 − N/M (50 %
at 2:4, 75 % at 1:4; `sparsity` None). The gradual methods share one window,
epochs 2.5 → 40 (the reference ST-3 proportions, 5 → 80 of 160): ST-3's cubic
ramp (fine-tuning the last 5 epochs under the frozen mask), global magnitude /
FlipOut's events; RigL drop-and-grows every epoch until epoch 60 (3/4).

    python -m experiments.main --config experiments/configs/nm_lenet300100_mnist5k.py \
        --config.method_kw.structure=2:4
    python -m experiments.sweep --config experiments/configs/nm_lenet300100_mnist5k.py \
        --grid method=dense,global_magnitude,flipout,st3,rigl --grid structure=2:4,1:4 \
        --seeds 42,43,44 --workers 1 --out experiments/results/nm_lenet300100
"""

from experiments.configs import _base


def get_config():
  c = _base.mnist5k_config("lenet300100", method="st3", start_epoch=2.5,
                           end_epoch=40.0, freeze_epoch=75.0)
  c.presets.rigl = dict(every_epochs=1.0, end_epoch=60.0)
  return c
