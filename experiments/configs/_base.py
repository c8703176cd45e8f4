"""Defaults shared by every config; a config file overrides what it needs.

A config names its method and passes its keyword arguments straight to it
(big_vision style; override any field with ``--config.<field>=<value>``):

* ``method``: a ``fj.registry`` name ("flipout", "st3", "rigl", ...), a harness
  method ("dense", "hoyer_square", the post-training ones, from ``init_from``)
  or a key of ``presets``.
* ``method_kw``: its keyword arguments (a config shared by several methods holds
  the union; each gets the keys it takes). ``<name>_epoch(s)`` is in epochs,
  passed as ``<name>`` (or ``<name>_step``) in ⌊epochs·steps_per_epoch⌋ steps.
  ``structure``: "2:4" (``fj.n_m``), "2:4+skip" (incompatible layers stay
  dense), "units". ``seed`` defaults to the run's. ``sparsity`` None: 1 − (1 −
  prune_rate)^N for the N events at start + k·prune_every < num_epochs.
* ``presets``: name -> {"method": registry name, **method_kw overrides}, the
  variants a sweep's ``--grid method=...`` names (``PRESETS``).
* ``target``: the FlipOut paper's sparsity in percent (75, 93.75, 98.44, 99.61,
  99.9): every_epochs = the paper's × num_epochs / 350.
* ``optimizer``, ``optimizer_kw``: ``optax.<optimizer>(lr, **optimizer_kw)``
  after coupled ``weight_decay``; ``lr_schedule`` "piecewise" (× lr_decay_factor
  at each of lr_decay_epochs), "cosine" or "constant"; ``grad_clip`` (global
  norm, before the method) and ``sparse_init`` (``fj.sparse_init``) wrap it.
* ``hvp_temperature``: logits / T of the ``loss_fn`` a method scores with
  (None: 200 for the θHg measure and GraSP, else 1).
* ``init_from``: a finished run's workdir to start from (its final params);
  ``calibration_size``, ``calibration_labels``: the post-training calibration
  set, that many train images drawn by the seed, labelled "teacher" (the
  model's argmax) or "true".
"""

from ml_collections import config_dict

# The paper's CIFAR-10 schedules (350 epochs, prune_rate 0.5): target sparsity
# (%) -> prune_every (epochs); events at k * prune_every < 350: 2 ... 10 halvings.
PAPER_NUM_EPOCHS = 350
PAPER_TARGETS = {75.0: 117, 93.75: 70, 98.44: 50, 99.61: 39, 99.9: 32}

# The method names of the results tables that are variants of another.
PRESETS = {
    "global_magnitude": {"noise_scale": 0.0},
    "noisy_global_magnitude": {"method": "global_magnitude", "noise_scale": 1.0},
    "random": {"method": "random_pruning"},
    "set": {"method": "set_"},
    "st3_sigma": {"method": "st3", "sigma_normalized": True},
    # RigL's random sparse start, never updated.
    "static_random": {"method": "rigl", "every": 1, "end_step": 1},
    # An event per epoch, the cubic ramp ending at FlipOut's last event.
    "movement": {"every_epochs": 1.0},
    "hoyer_square": {"strength": 1e-4, "threshold": 1e-4, "finetune_epochs": 0,
                     "finetune_lr": 0.01, "finetune_lr_schedule": "constant",
                     "finetune_lr_decay_epochs": ()},
    "unipts_uniform": {"method": "unipts", "search": False},
    "magnitude_uniform": {"method": "magnitude", "distribution": "uniform"},
}


def base_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.method = "flipout"
  c.method_kw = config_dict.ConfigDict(
      {"sparsity": config_dict.placeholder(float),
       "structure": config_dict.placeholder(str), "start_epoch": 0.0,
       # FlipOut's (the paper's defaults), here to be overridden.
       "prune_rate": 0.5, "p": 2.0, "noise_scale": 1.0, "noise_on": "all"})
  c.presets = config_dict.ConfigDict(PRESETS)
  c.target = config_dict.placeholder(float)
  c.model = "lenet300100"
  c.width = 1.0
  c.dataset = "mnist_5k"
  c.data_dir = config_dict.placeholder(str)
  c.augment = config_dict.placeholder(bool)
  c.seed = 42
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 80
  c.optimizer = "sgd"
  c.optimizer_kw = config_dict.ConfigDict({"momentum": 0.9, "nesterov": False})
  c.weight_decay = 5e-4
  c.lr = 0.1
  c.lr_schedule = "piecewise"
  c.lr_decay_epochs = (150, 250)
  c.lr_decay_factor = 0.1
  c.grad_clip = config_dict.placeholder(float)
  c.sparse_init = False
  c.hvp_temperature = config_dict.placeholder(float)
  c.init_from = config_dict.placeholder(str)
  c.calibration_size = 512
  c.calibration_labels = "teacher"
  return c


def mnist5k_config(model: str, method: str, *, num_epochs: int = 80,
                   lr_schedule: str = "piecewise",
                   lr_decay_epochs: tuple[float, ...] | None = (74, 78),
                   **method_kw) -> config_dict.ConfigDict:
  """The CPU-scale recipe of the mnist_5k tables: 4,000 train / 1,000 test
  images, batch 128 (31 steps per epoch), SGD lr 0.05, momentum 0.9, coupled
  weight decay 5e-4; by default 80 epochs, lr ×0.1 at epochs 74 and 78 (after
  FlipOut's last event, at 72; None keeps the base default, for cosine)."""
  c = base_config()
  c.method = method
  c.model = model
  c.num_epochs = num_epochs
  c.lr = 0.05
  c.lr_schedule = lr_schedule
  if lr_decay_epochs is not None:
    c.lr_decay_epochs = tuple(lr_decay_epochs)
  c.method_kw.update(method_kw)
  return c


def paper_cifar10_config(model: str, hoyer_lambda: float,
                         target=None) -> config_dict.ConfigDict:
  """The FlipOut paper's CIFAR-10 recipe for ``model`` (VGG19, ResNet18).

  SGD lr 0.1, momentum 0.9, coupled weight decay 5e-4, batch 128, 350 epochs,
  lr ×0.1 at epochs 150 and 250, random crop (pad 4) + horizontal flip.
  ``target`` picks the paper's prune_every (``PAPER_TARGETS``).
  """
  c = base_config()
  c.model = model
  c.dataset = "cifar10"
  c.augment = True
  c.num_epochs = PAPER_NUM_EPOCHS
  c.target = float(target) if target else 99.9
  # Hoyer-Square (--config.method=hoyer_square): the paper's lambda, 350
  # epochs + 150 fine-tune epochs under the fixed mask.
  c.presets.hoyer_square.update(strength=hoyer_lambda, finetune_epochs=150)
  return c
