"""N:M structured sparsity (2:4 by default) on LeNet-300-100, mnist_5k.

CPU scale; the recipe of the other LeNet-300-100 configs
(`flipout_lenet300100_mnist5k.py`, `st3_lenet300100_mnist5k.py`), so the
rows compare with their tables: 4,000 training / 1,000 test images, batch
128 (31 steps per epoch), 80 epochs of SGD lr 0.05, momentum 0.9, coupled
weight decay 5e-4, lr ×0.1 at epochs 74 and 78. About 20 s per run on 2
CPU cores. Every LeNet-300-100 layer has 784, 300 or 100 inputs, all
divisible by 2 and 4, so every layer ends exactly nm_n:nm_m (final sparsity
1 − nm_n/nm_m: 50 % at 2:4, 75 % at 1:4) and `nm_skip_incompatible` is
False. The gradual methods share one window, epochs 2.5 → 40 (the reference
ST-3 proportions, 5 → 80 of 160, as `st3_lenet300100_mnist5k.py`):

* nm_magnitude, nm_flipout: events n_t = M−1, …, N evenly spaced from
  `prune_start_epoch` 2.5 to `prune_end_epoch` 40 (2:4: 3:4 at 2.5, 2:4 at
  40; 1:4: 3:4, 2:4, 1:4 at 2.5, 21.25, 40);
* nm_st3: cubic ramp of s_t from epoch 2.5 to 40 (`st3_start_epoch`,
  `st3_end_epoch` None: scaled from the reference), n_t = round((1 − s_t)·M)
  per group, the last 5 epochs (75-80) fine-tune under the frozen N:M mask,
  no gradient clip;
* nm_dst: a random N:M start, drop-and-grow inside every group (RigL
  growth, d_0 = 0.5 cosine-decayed to 0) every epoch until epoch 60 (3/4 of
  the run).

    python -m experiments.main --config experiments/configs/nm_lenet300100_mnist5k.py
    python -m experiments.main --config experiments/configs/nm_lenet300100_mnist5k.py \
        --config.method=nm_flipout --config.nm_n=1
    python -m experiments.sweep --config experiments/configs/nm_lenet300100_mnist5k.py \
        --grid method=dense,nm_magnitude,nm_flipout,nm_st3,nm_dst --grid nm_n=2,1 \
        --seeds 42,43,44 --workers 1 --out experiments/results/nm_lenet300100
"""

from experiments.configs import _base
from experiments.configs import _sparse_training


def get_config():
  c = _base.mnist5k_config("lenet300100", method="nm_st3")
  _base.add_nm_fields(c)
  c.nm_n = 2
  c.nm_m = 4
  c.nm_skip_incompatible = False  # 784, 300, 100 inputs: all divisible by 4
  c.nm_dst_grow = "rigl"
  # nm_magnitude, nm_flipout: the N:M events' window.
  c.prune_start_epoch = 2.5
  c.prune_end_epoch = 40.0
  # Not used by the N:M methods (their sparsity is 1 − nm_n/nm_m): the
  # unstructured methods on this config (--config.method=st3,
  # global_magnitude, ...) prune to 2:4's 50 % over the same window.
  c.sparsity = 0.5
  _sparse_training.add_st3_fields(c)
  c.st3_start_epoch = None  # 80 * 5/160 = 2.5
  c.st3_end_epoch = None  # 80 * 80/160 = 40
  c.st3_power = 3.0
  c.st3_rescale = True
  c.st3_finetune_epochs = 5
  c.st3_grad_clip = None
  _sparse_training.add_dst_fields(c)
  c.dst_update_every_epochs = 1.0
  c.dst_end_epoch = None  # 3/4 of num_epochs: 60
  c.dst_exploration = 1e-3
  return c
