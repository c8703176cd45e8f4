"""The FlipOut paper's CIFAR-10 recipe for ResNet18 (`_base.paper_cifar10_config`;
needs an accelerator). `target` 75 / 93.75 / 98.44 / 99.61 / 99.9 -> prune_every
117 / 70 / 50 / 39 / 32 epochs: 2 / 4 / 6 / 8 / 10 halvings.

    python -m experiments.main --config experiments/configs/flipout_resnet18_cifar10.py \
        --config.target=98.44 --config.seed=43
    python -m experiments.main --config experiments/configs/flipout_resnet18_cifar10.py:99.61
"""

from experiments.configs import _base


def get_config(target=None):
  return _base.paper_cifar10_config("resnet18", hoyer_lambda=1e-4, target=target)
