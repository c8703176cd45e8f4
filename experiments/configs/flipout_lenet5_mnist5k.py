"""FlipOut on LeNet-5 on the embedded `mnist_5k` (CPU scale).

Same recipe as the LeNet-300-100 main job: 80 epochs, an event every 9 epochs,
8 halvings to 99.61 % sparsity. LeNet-5 has 61,706 parameters (60,850 prunable).
"""

from experiments.configs import _base


def get_config():
  c = _base.base_config()
  c.method = "flipout"
  c.model = "lenet5"
  c.dataset = "mnist_5k"
  c.batch_size = 128
  c.num_epochs = 80
  c.lr = 0.05
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.lr_schedule = "piecewise"
  c.lr_decay_epochs = (74, 78)  # after the last event (epoch 72)
  c.prune_every_epochs = 9.0
  c.prune_rate = 0.5
  c.hoyer_lambda = 3e-5
  c.finetune_epochs = 20
  c.finetune_lr = 0.005
  return c
