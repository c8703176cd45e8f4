"""Gradient-flow pruning (Lubana & Dick 2021) of LeNet-300-100 on `mnist_5k`.

CPU scale: prune while training from scratch in 10 rounds of one epoch, round k
removing p/(k·p + n(1−p)) of what is left (exactly `sparsity` at the first step
of epoch 11), momentum reset after each event; then on to 30 epochs with the
mask fixed. SGD lr 0.05, momentum 0.9, weight decay 5e-4, lr ×0.1 at 22 and 27.

    python -m experiments.main --config experiments/configs/gradient_flow_lenet300100_mnist5k.py \
        --config.measure=gradient_norm_preservation --config.sparsity=0.98
    python -m experiments.main --config ... --config.method=grasp   # one shot at init
"""

from experiments.configs import _base


def get_config():
  return _base.mnist5k_config(
      "lenet300100", method="gradient_flow", num_epochs=30,
      lr_decay_epochs=(22, 27), sparsity=0.9,
      measure="loss_preservation_magnitude", rounds=10,
      every_epochs=1.0, reset_moments=True)
