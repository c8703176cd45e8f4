"""FlipOut on LeNet-5 on the embedded `mnist_5k` (CPU scale).

Same recipe as the LeNet-300-100 main job: 80 epochs, an event every 9 epochs,
8 halvings to 99.61 % sparsity. LeNet-5 has 61,706 parameters (60,850 prunable).
"""

from experiments.configs import _base


def get_config():
  c = _base.mnist5k_config("lenet5", method="flipout")
  c.prune_every_epochs = 9.0
  c.prune_rate = 0.5
  c.hoyer_lambda = 3e-5
  c.finetune_epochs = 20
  c.finetune_lr = 0.005
  return c
