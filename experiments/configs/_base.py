"""Defaults shared by every config; a config file overrides what it needs.

Field reference (all can be overridden with `--config.<field>=<value>`):

Run
  method            name in `experiments.methods.METHODS` ("flipout", "dense", ...).
  model, width      `flipout_jax.models.get_model(model, width=width)`.
  dataset           `experiments.data.DATASETS`; data_dir for tfds data sets.
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
N:M structured sparsity (methods "nm_magnitude", "nm_flipout", "nm_st3",
"nm_dst"; see experiments/methods_nm.py). NM_FIELDS below, added by
add_nm_fields() (e.g. configs/nm_lenet300100_mnist5k.py), not by base_config():
adding fields to every config would change every config's JSON and the
existing sweeps could no longer skip or resume their finished runs. A config
without them runs the N:M methods with these defaults.
  nm_n, nm_m        the pattern: at most nm_n nonzeros in every group of nm_m
                    consecutive weights along the contraction (input) axis;
                    1 <= nm_n < nm_m <= 255 (default 2:4).
  nm_skip_incompatible  True: layers whose input axis is not divisible by nm_m
                    stay dense; False: such a layer is an error naming it.
                    None (default): True for the conv nets (their first conv
                    has 1 (MNIST) or 3 (CIFAR) input channels), False for
                    lenet300100 (784/300/100 inputs, divisible by 2 and 4).
  nm_dst_grow       nm_dst's growth: "rigl" (|g|, default), "dst_ee" or
                    "random" (SET).
The schedules are the families': nm_magnitude/nm_flipout prune dense -> nm_m-1
-> ... -> nm_n per group in events evenly spaced from prune_start_epoch to
prune_end_epoch (None: half of num_epochs); nm_st3 uses the st3_* fields (cubic ramp of s_t to
1 - nm_n/nm_m, fine-tuning, clip); nm_dst the dst_* fields (drop fraction,
period, end; dst_distribution unused: every layer is nm_n:nm_m).
"""

from ml_collections import config_dict

# The paper's CIFAR-10 schedules (350 epochs, prune_rate 0.5): target sparsity
# in percent -> prune_every in epochs. Events at k * prune_every < 350 give
# 2, 4, 6, 8, 10 halvings.
PAPER_NUM_EPOCHS = 350
PAPER_TARGETS = {75.0: 117, 93.75: 70, 98.44: 50, 99.61: 39, 99.9: 32}

# N:M fields: name -> (type, default); a None default is a placeholder.
NM_FIELDS = {
    "nm_n": (int, 2),
    "nm_m": (int, 4),
    "nm_skip_incompatible": (bool, None),
    "nm_dst_grow": (str, "rigl"),
}


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


def mnist5k_config(model: str, method: str, *, num_epochs: int = 80,
                   lr_schedule: str = "piecewise",
                   lr_decay_epochs: tuple[float, ...] | None = (74, 78)
                   ) -> config_dict.ConfigDict:
  """The CPU-scale recipe shared by the mnist_5k tables of every method.

  4,000 training / 1,000 test images of the embedded MNIST subset, batch 128
  (31 steps per epoch), SGD lr 0.05 with momentum 0.9 and coupled weight
  decay 5e-4. By default 80 epochs with the lr ×0.1 at epochs 74 and 78
  (after FlipOut's last event, at epoch 72); ``lr_decay_epochs=None`` keeps
  the base default (for a cosine schedule). The method configs add their
  own fields.
  """
  c = base_config()
  c.method = method
  c.model = model
  c.dataset = "mnist_5k"
  c.batch_size = 128
  c.num_epochs = num_epochs
  c.lr = 0.05
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.lr_schedule = lr_schedule
  if lr_decay_epochs is not None:
    c.lr_decay_epochs = tuple(lr_decay_epochs)
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


def add_nm_fields(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """Adds the N:M fields (``NM_FIELDS``) with their defaults to ``c``."""
  for name, (kind, default) in NM_FIELDS.items():
    setattr(c, name,
            config_dict.placeholder(kind) if default is None else default)
  return c
