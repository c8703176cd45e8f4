"""`flipout_resnet18_cifar10.py`'s recipe for VGG19-BN (needs an accelerator).

    python -m experiments.main --config experiments/configs/flipout_vgg19_cifar10.py \
        --config.target=98.44 --config.seed=43
    python -m experiments.main --config experiments/configs/flipout_vgg19_cifar10.py:99.61
"""

from experiments.configs import _base


def get_config(target=None):
  return _base.paper_cifar10_config("vgg19", hoyer_lambda=6e-5, target=target)
