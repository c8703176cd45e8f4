"""Gradient-flow pruning (Lubana & Dick 2021) of LeNet-5 on `mnist_5k`.

CPU-scale protocol (a LeNet-5 step costs ~10x a LeNet-300-100 one): prune
while training from scratch in 3 rounds of one epoch (31 steps at batch
128), round k removing p/(k·p + n(1−p)) of what is left (exactly `sparsity`
after round 3, at the first step of epoch 4), the momentum reset after each
event; then train on to 6 epochs with the mask fixed. SGD lr 0.05,
momentum 0.9, coupled weight decay 5e-4, lr ×0.1 at epoch 5. (Chosen for a
shared 2-core CPU: ~1.3 s of compute per epoch, ~8 s start-up per run.)

    python -m experiments.main --config experiments/configs/gradient_flow_lenet5_mnist5k.py \
        --config.measure=gradient_norm_preservation --config.sparsity=0.98

Fields: see `experiments/methods_gradient_flow.py`.
"""

from experiments.configs import _base


def get_config():
  return _base.mnist5k_config(
      "lenet5", method="gradient_flow", num_epochs=6, lr_decay_epochs=(5,),
      sparsity=0.9, measure="loss_preservation_magnitude", rounds=3,
      every_epochs=1.0, reset_moments=True)
