"""The FlipOut paper's CIFAR-10 recipe for ResNet18 (needs an accelerator).

SGD lr 0.1, momentum 0.9, weight decay 5e-4 (coupled), batch 128, 350 epochs,
lr x0.1 at epochs 150 and 250, random crop (pad 4) + horizontal flip.
`target` picks the paper's prune_every: 75 -> 117, 93.75 -> 70, 98.44 -> 50,
99.61 -> 39, 99.9 -> 32 epochs; with prune_rate 0.5 and events only at
k * prune_every < 350, that is 2 / 4 / 6 / 8 / 10 halvings.

    python -m experiments.main --config experiments/configs/flipout_resnet18_cifar10.py \
        --config.target=98.44 --config.seed=43
    python -m experiments.main --config experiments/configs/flipout_resnet18_cifar10.py:99.61
"""

from experiments.configs import _base


def get_config(target=None):
  return _base.paper_cifar10_config("resnet18", hoyer_lambda=1e-4, target=target)
