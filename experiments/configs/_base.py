"""Defaults shared by every config; a config file overrides what it needs.

Field reference (all can be overridden with `--config.<field>=<value>`):

Run
  method            name in `experiments.methods.METHODS` ("flipout", "dense", ...).
  model, width      `flipout_jax.models.get_model(model, width=width)`.
  dataset           `flipout_jax.data.DATASETS`; data_dir for tfds data sets.
  augment           None: the data set's default (CIFAR crop+flip on), or a bool.
  seed              model init, data order, pruning PRNG (paper: 42, 43, 44).
  batch_size, eval_batch_size, num_epochs.
Optimizer (coupled weight decay as in the paper:
           chain(add_decayed_weights(weight_decay), sgd(lr, momentum)))
  lr, momentum, nesterov, weight_decay.
  lr_schedule       "piecewise" (x lr_decay_factor at each of lr_decay_epochs),
                    "cosine" (to 0 at the end) or "constant".
Pruning schedule (flipout, global_magnitude, noisy_global_magnitude, random)
  sparsity          final fraction of pruned prunable weights, or None: set by
                    the events, 1 - (1 - prune_rate)^N with N the number of
                    events prune_start_epoch + k*prune_every_epochs < num_epochs
                    (the paper's rule: never at the last epoch).
  prune_every_epochs  epochs between events (float allowed; converted to
                    floor(epochs * steps_per_epoch) steps).
  target            the paper's sparsity in percent, one of 75, 93.75, 98.44,
                    99.61, 99.9: picks prune_every_epochs = paper value * num_epochs/350
                    (117/70/50/39/32 at 350 epochs) and overrides prune_every_epochs.
  prune_end_epoch   instead of prune_every_epochs: reach `sparsity` by this epoch.
  prune_rate, prune_start_epoch.
  noise_scale, noise_on   FlipOut's gradient noise (lambda, "all" or "prunable");
                    also used by noisy_global_magnitude.
  flipout_p         exponent of |theta| in the FlipOut saliency.
Hoyer-Square (method "hoyer_square")
  hoyer_lambda, hoyer_threshold; then finetune_epochs under the fixed mask with
  finetune_lr / finetune_lr_schedule / finetune_lr_decay_epochs.
"""

from ml_collections import config_dict

# The paper's CIFAR-10 schedules (350 epochs, prune_rate 0.5): target sparsity
# in percent -> prune_every in epochs. Events at k * prune_every < 350 give
# 2, 4, 6, 8, 10 halvings.
PAPER_NUM_EPOCHS = 350
PAPER_TARGETS = {75.0: 117, 93.75: 70, 98.44: 50, 99.61: 39, 99.9: 32}


def base_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.method = "flipout"
  c.model = "lenet300100"
  c.width = 1.0
  c.dataset = "mnist_5k"
  c.data_dir = config_dict.placeholder(str)
  c.augment = config_dict.placeholder(bool)
  c.seed = 42
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 80

  c.lr = 0.1
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 5e-4
  c.lr_schedule = "piecewise"
  c.lr_decay_epochs = (150, 250)
  c.lr_decay_factor = 0.1

  c.sparsity = config_dict.placeholder(float)
  c.prune_every_epochs = config_dict.placeholder(float)
  c.target = config_dict.placeholder(float)
  c.prune_end_epoch = config_dict.placeholder(float)
  c.prune_rate = 0.5
  c.prune_start_epoch = 0.0
  c.noise_scale = 1.0
  c.noise_on = "all"
  c.flipout_p = 2.0

  c.hoyer_lambda = 1e-4
  c.hoyer_threshold = 1e-4
  c.finetune_epochs = 0
  c.finetune_lr = 0.01
  c.finetune_lr_schedule = "constant"
  c.finetune_lr_decay_epochs = ()
  return c


def paper_cifar10_config(model: str, hoyer_lambda: float,
                         target=None) -> config_dict.ConfigDict:
  """The FlipOut paper's CIFAR-10 recipe for ``model`` (VGG19, ResNet18)."""
  c = base_config()
  c.method = "flipout"
  c.model = model
  c.dataset = "cifar10"
  c.augment = True
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = PAPER_NUM_EPOCHS
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
  c.hoyer_lambda = hoyer_lambda
  c.finetune_epochs = 150
  c.finetune_lr = 0.01
  return c
