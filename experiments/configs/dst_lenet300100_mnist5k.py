"""DST (DST-EE, RigL, SET) and a static random sparse mask: LeNet-300-100, mnist_5k.

CPU scale (issue 5): 30 epochs of `_base.mnist5k_config`, cosine lr to 0.
Sparse from the first step (a random ERK mask); the DST methods move ⌊d_t·a_l⌋
weights per layer every epoch (ΔT = 31 steps) until epoch 22.5 (3/4 of the run,
RigL's T_end; where the gradual pruning methods reach `sparsity`), d_0 = 0.5
(DST-EE, RigL) or 0.3 (SET) cosine-decayed to 0; DST-EE's c = 1e-3. The
table's command: experiments/results/dst_lenet300100/results.md.

    python -m experiments.main --config experiments/configs/dst_lenet300100_mnist5k.py \
        --config.method=rigl --config.sparsity=0.98
"""

from experiments.configs import _base


def get_config():
  return _base.mnist5k_config(
      "lenet300100", method="dst_ee", num_epochs=30, lr_schedule="cosine",
      lr_decay_epochs=None, sparsity=0.9, every_epochs=1.0,
      end_epoch=22.5, exploration=1e-3)
