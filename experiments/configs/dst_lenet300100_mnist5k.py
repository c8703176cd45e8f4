"""DST (DST-EE, RigL, SET) and a static random sparse mask: LeNet-300-100, mnist_5k.

CPU scale (issue 5): 30 epochs of the mnist5k recipe (`_base.mnist5k_config`)
with a cosine lr to 0. Sparse from the first step (a random mask at ERK
densities); the DST methods move ⌊d_t·a_l⌋ weights per layer every epoch (ΔT =
31 steps) until epoch 22.5 (3/4 of the run, RigL's T_end; also where the
gradual pruning methods reach `sparsity`), d_0 = 0.5 (DST-EE, RigL) or 0.3
(SET) cosine-decayed to 0; DST-EE's exploration weight c = 1e-3.

    python -m experiments.main --config experiments/configs/dst_lenet300100_mnist5k.py \
        --config.method=rigl --config.sparsity=0.98
    python -m experiments.sweep --config experiments/configs/dst_lenet300100_mnist5k.py \
        --grid method=dst_ee,rigl,set,static_random --grid sparsity=0.9,0.95,0.98 \
        --seeds 42,43,44 --workers 1 --out experiments/results/dst_lenet300100
"""

from experiments.configs import _base


def get_config():
  return _base.mnist5k_config(
      "lenet300100", method="dst_ee", num_epochs=30, lr_schedule="cosine",
      lr_decay_epochs=None, sparsity=0.9, every_epochs=1.0,
      end_epoch=22.5, exploration=1e-3)
