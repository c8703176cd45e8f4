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
  c = _base.base_config()
  c.method = "flipout"
  c.model = "resnet18"
  c.dataset = "cifar10"
  c.augment = True
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = _base.PAPER_NUM_EPOCHS
  c.lr = 0.1
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.lr_schedule = "piecewise"
  c.lr_decay_epochs = (150, 250)
  c.lr_decay_factor = 0.1
  c.target = float(target) if target else 99.9
  c.prune_rate = 0.5
  c.noise_scale = 1.0
  # Hoyer-Square (--config.method=hoyer_square): the paper's lambda, 350 epochs
  # + 150 fine-tune epochs under the fixed mask.
  c.hoyer_lambda = 1e-4
  c.finetune_epochs = 150
  c.finetune_lr = 0.01
  return c
