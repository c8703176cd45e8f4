"""DST (DST-EE, RigL, SET) and a static random sparse mask: LeNet-300-100, mnist_5k.

CPU scale (issue 5). 4,000 training / 1,000 test images, 31 steps per epoch
at batch 128; 30 epochs of SGD (lr 0.05, momentum 0.9, coupled weight decay
5e-4, the FlipOut main job's optimizer) with a cosine learning rate to 0.
Sparse from the first step: a random mask at ERK densities; the DST methods
move ⌊d_t·a_l⌋ weights per layer every epoch (ΔT = 31 steps) until epoch
22.5 (3/4 of the run, RigL's T_end), d_0 = 0.5 (DST-EE, RigL) or 0.3 (SET)
cosine-decayed to 0. DST-EE's exploration weight c = 1e-3 (the library
default). See `experiments/configs/_sparse_training.py` for the fields.

    python -m experiments.main --config experiments/configs/dst_lenet300100_mnist5k.py
    python -m experiments.main --config experiments/configs/dst_lenet300100_mnist5k.py \
        --config.method=rigl --config.sparsity=0.98
    python -m experiments.sweep --config experiments/configs/dst_lenet300100_mnist5k.py \
        --grid method=dst_ee,rigl,set,static_random --grid sparsity=0.9,0.95,0.98 \
        --seeds 42,43,44 --workers 1 --out experiments/results/dst_lenet300100
"""

from experiments.configs import _base


def get_config():
  # end_epoch 22.5: DST's T_end (3/4 of the run, RigL), and where the gradual
  # pruning methods on this config reach `sparsity`.
  return _base.mnist5k_config(
      "lenet300100", method="dst_ee", num_epochs=30, lr_schedule="cosine",
      lr_decay_epochs=None, sparsity=0.9, every_epochs=1.0,
      end_epoch=22.5, exploration=1e-3)
