"""`dst_lenet300100_mnist5k.py` on LeNet-5 (60,850 prunable weights) for 12
epochs (a LeNet-5 step costs ~10x): a mask update every half epoch (ΔT = 15
steps) until epoch 9 (3/4 of the run).

    python -m experiments.sweep --config experiments/configs/dst_lenet5_mnist5k.py \
        --grid method=dst_ee,rigl,set,static_random --grid sparsity=0.9,0.95,0.98 \
        --seeds 42,43,44 --workers 1 --out experiments/results/dst_lenet5
"""

from experiments.configs import _base


def get_config():
  return _base.mnist5k_config(
      "lenet5", method="dst_ee", num_epochs=12, lr_schedule="cosine",
      lr_decay_epochs=None, sparsity=0.9, every_epochs=0.5,
      end_epoch=9.0, exploration=1e-3)
