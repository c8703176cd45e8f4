"""`gradient_flow_lenet300100_mnist5k.py` on LeNet-5 (a step costs ~10x): 3
rounds of one epoch (exactly `sparsity` at the first step of epoch 4), then on
to 6 epochs with the mask fixed, lr ×0.1 at epoch 5 (~1.3 s of compute per
epoch, ~8 s start-up per run on a shared 2-core CPU).

    python -m experiments.main --config experiments/configs/gradient_flow_lenet5_mnist5k.py \
        --config.measure=gradient_norm_preservation --config.sparsity=0.98
"""

from experiments.configs import _base


def get_config():
  return _base.mnist5k_config(
      "lenet5", method="gradient_flow", num_epochs=6, lr_decay_epochs=(5,),
      sparsity=0.9, measure="loss_preservation_magnitude", rounds=3,
      every_epochs=1.0, reset_moments=True)
