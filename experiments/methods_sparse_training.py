"""Registry entries of the sparse-training methods: ST-3 and DST (DST-EE, RigL, SET).

Methods (the final sparsity of each is :func:`methods.target_sparsity`, i.e.
``config.sparsity``, or ``config.target`` / the pruning events):

* ``st3``, ``st3_sigma``: :func:`flipout_jax.st3` (ST-3σ: ``sigma_normalized``)
  with the main optimizer (weight decay inside it, so it decays the raw
  weights), the cubic ramp from ``st3_start_epoch`` to ``st3_end_epoch``, and
  optionally the last ``st3_finetune_epochs`` under the frozen mask and a
  gradient clip ``st3_grad_clip`` before it.
* ``dst_ee``, ``rigl``, ``set``: :func:`flipout_jax.dst` with ``grow``
  ``"dst_ee"`` / ``"rigl"`` / ``"random"``: a random sparse start at the
  ``dst_distribution`` (ERK) densities, drop-and-grow every
  ``dst_update_every_epochs`` until ``dst_end_epoch``.
* ``static_random``: the same random sparse start (the same mask as the DST
  methods for the same seed), held fixed: :func:`flipout_jax.prune` with
  :func:`flipout_jax.core.random_masks` as the initial masks
  and no events.

With ``dst_sparse_init`` (an optional field, off unless a config sets it;
e.g. ``configs/dst_lenet5_mnist5k_sparse_init.py``) the DST methods and
``static_random`` also rescale the kept weights at the first update
(:func:`flipout_jax.sparse_init`).

The fields and their defaults are in ``experiments/configs/_sparse_training.py``;
a config without them (e.g. the FlipOut configs) gets those defaults.
"""

from __future__ import annotations

import math

import optax

import flipout_jax as fj
from flipout_jax import distributions as distributions_lib
from experiments import methods
from experiments.configs import _sparse_training as fields

ConfigError = methods.ConfigError
_EPS = 1e-9


def field(config, name: str):
  """``config.<name>``, or its default when the config lacks the field."""
  table = {**fields.ST3_FIELDS, **fields.DST_FIELDS,
           **fields.DST_OPTIONAL_FIELDS}
  if name in config:
    return config[name]
  return table[name][1]


def _epoch_to_step(epoch: float, steps_per_epoch: int) -> int:
  return int(math.floor(epoch * steps_per_epoch + _EPS))


def _is_number(x) -> bool:
  return methods._is_number(x)  # pylint: disable=protected-access


_check = methods._check  # pylint: disable=protected-access


# --- ST-3 -------------------------------------------------------------------------


def st3_epochs(config) -> tuple[float, float, float | None]:
  """``(start, end, freeze)`` epochs of ST-3 (freeze None: no fine-tuning)."""
  ref_start, ref_end, ref_total = fields.ST3_REFERENCE_EPOCHS
  start = field(config, "st3_start_epoch")
  end = field(config, "st3_end_epoch")
  if start is None:
    start = config.num_epochs * ref_start / ref_total
  if end is None:
    end = config.num_epochs * ref_end / ref_total
  finetune = field(config, "st3_finetune_epochs")
  freeze = None if not finetune else config.num_epochs - finetune
  return start, end, freeze


def _check_st3_epochs(config) -> None:
  start, end, freeze = st3_epochs(config)
  if not 0 <= start < end < config.num_epochs:
    raise ConfigError(
        f"st3_start_epoch, st3_end_epoch: the ramp from epoch {start:g} to "
        f"epoch {end:g} must satisfy 0 <= start < end < num_epochs="
        f"{config.num_epochs}")
  if freeze is not None and not end < freeze:
    raise ConfigError(
        f"st3_finetune_epochs: {field(config, 'st3_finetune_epochs')} fine-tune "
        f"epochs start at epoch {freeze:g}, not after st3_end_epoch={end:g}; "
        "lower st3_finetune_epochs or st3_end_epoch")


def st3_steps(config, steps_per_epoch: int) -> tuple[int, int, int | None]:
  """``(start_step, end_step, freeze_step)`` checked to fit the run."""
  _check_st3_epochs(config)
  start, end, freeze = st3_epochs(config)
  s0, s1 = _epoch_to_step(start, steps_per_epoch), _epoch_to_step(end, steps_per_epoch)
  if not s0 < s1:
    raise ConfigError(
        f"st3_end_epoch: the ramp from epoch {start:g} to {end:g} is less "
        f"than one step ({steps_per_epoch} steps per epoch)")
  return s0, s1, None if freeze is None else freeze * steps_per_epoch


def validate_st3(c) -> None:
  s = methods.target_sparsity(c)
  _check(0 <= s < 1, "sparsity", s, "in [0, 1)")
  validate_st3_schedule(c)


def validate_st3_schedule(c) -> None:
  """The st3_* fields (ramp, power, rescale, fine-tuning, clip); not sparsity."""
  for name in ("st3_start_epoch", "st3_end_epoch"):
    v = field(c, name)
    _check(v is None or (_is_number(v) and v >= 0), name, v,
           "None (scaled from the reference) or a number >= 0")
  power = field(c, "st3_power")
  _check(_is_number(power) and power > 0, "st3_power", power, "a number > 0")
  rescale = field(c, "st3_rescale")
  _check(isinstance(rescale, bool), "st3_rescale", rescale, "True or False")
  ft = field(c, "st3_finetune_epochs")
  _check(isinstance(ft, int) and not isinstance(ft, bool)
         and 0 <= ft < c.num_epochs, "st3_finetune_epochs", ft,
         "an int in [0, num_epochs)")
  clip = field(c, "st3_grad_clip")
  _check(clip is None or (_is_number(clip) and clip > 0), "st3_grad_clip",
         clip, "None or a number > 0")
  _check_st3_epochs(c)


def _st3_builder(sigma_normalized: bool):
  def build(config, steps_per_epoch, total_steps):
    del total_steps
    start, end, freeze = st3_steps(config, steps_per_epoch)
    tx = fj.st3(methods.make_optimizer(config, steps_per_epoch),
                sparsity=methods.target_sparsity(config), start_step=start,
                end_step=end, power=field(config, "st3_power"),
                rescale=field(config, "st3_rescale"),
                sigma_normalized=sigma_normalized, freeze_step=freeze)
    clip = field(config, "st3_grad_clip")
    if clip is not None:
      # st3 must be last: its updates are w_eff' − params (fj.st3 docs).
      tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx
  return build


methods.register(
    "st3", validate=validate_st3,
    help="ST-3: soft-threshold + straight-through, cubic ramp (st3_*)")(
        _st3_builder(False))
methods.register(
    "st3_sigma", validate=validate_st3,
    help="ST-3σ: ST-3 ranking |w|·sqrt(sum of dims) per layer (st3_*)")(
        _st3_builder(True))


# --- DST --------------------------------------------------------------------------


def dst_steps(config, steps_per_epoch: int) -> tuple[int, int]:
  """``(update_every, end_step)`` in steps, checked to fit the run."""
  every_e = field(config, "dst_update_every_epochs")
  end_e = field(config, "dst_end_epoch")
  if end_e is None:
    end_e = fields.DST_END_FRACTION * config.num_epochs
  every = _epoch_to_step(every_e, steps_per_epoch)
  end = _epoch_to_step(end_e, steps_per_epoch)
  if every < 1:
    raise ConfigError(
        f"dst_update_every_epochs: {every_e:g} epochs is less than one step "
        f"({steps_per_epoch} steps per epoch)")
  total = config.num_epochs * steps_per_epoch
  if not 0 < end <= total:
    raise ConfigError(f"dst_end_epoch: {end_e:g} must be in (0, num_epochs="
                      f"{config.num_epochs}]")
  return every, end


def _validate_distribution(c) -> None:
  d = field(c, "dst_distribution")
  try:
    distributions_lib.validate_distribution(d)
  except ValueError:
    raise ConfigError(
        f"dst_distribution: got {d!r}; must be one of "
        f"{', '.join(distributions_lib.DISTRIBUTIONS)}") from None


def validate_static_random(c) -> None:
  s = methods.target_sparsity(c)
  _check(0 <= s < 1, "sparsity", s, "in [0, 1)")
  _validate_distribution(c)
  si = field(c, "dst_sparse_init")
  _check(isinstance(si, bool), "dst_sparse_init", si, "True or False")


def validate_dst(c) -> None:
  validate_static_random(c)
  validate_dst_schedule(c)


def validate_dst_schedule(c) -> None:
  """The drop-and-grow fields (period, end, d_0, c, ε); not sparsity."""
  every = field(c, "dst_update_every_epochs")
  _check(_is_number(every) and every > 0, "dst_update_every_epochs", every,
         "a number > 0")
  end = field(c, "dst_end_epoch")
  _check(end is None or _is_number(end), "dst_end_epoch", end,
         "None (3/4 of num_epochs) or a number in (0, num_epochs]")
  d0 = field(c, "dst_drop_fraction")
  _check(d0 is None or (_is_number(d0) and 0 < d0 < 1), "dst_drop_fraction",
         d0, "None (the family's) or in (0, 1)")
  cexp = field(c, "dst_exploration")
  _check(_is_number(cexp) and cexp >= 0, "dst_exploration", cexp,
         "a number >= 0")
  eps = field(c, "dst_epsilon")
  _check(_is_number(eps) and eps > 0, "dst_epsilon", eps, "a number > 0")
  dst_steps(c, 1000)


def _maybe_sparse_init(config, tx):
  return fj.sparse_init(tx) if field(config, "dst_sparse_init") else tx


def _dst_builder(grow: str):
  def build(config, steps_per_epoch, total_steps):
    del total_steps
    every, end = dst_steps(config, steps_per_epoch)
    return _maybe_sparse_init(config, fj.dst(methods.make_optimizer(config, steps_per_epoch),
                  sparsity=methods.target_sparsity(config), update_every=every,
                  end_step=end, drop_fraction=field(config, "dst_drop_fraction"),
                  grow=grow, exploration=field(config, "dst_exploration"),
                  epsilon=field(config, "dst_epsilon"),
                  distribution=field(config, "dst_distribution"),
                  seed=config.seed))
  return build


methods.register(
    "dst_ee", validate=validate_dst,
    help="DST-EE: drop by |θ|, grow by |g| + c·ln(t+1)/(N+ε) (dst_*)")(
        _dst_builder("dst_ee"))
methods.register(
    "rigl", validate=validate_dst,
    help="RigL: drop by |θ|, grow by |g| (dst_*)")(_dst_builder("rigl"))
methods.register(
    "set", validate=validate_dst,
    help="SET: drop by |θ|, grow at random (dst_*)")(_dst_builder("random"))


@methods.register(
    "static_random", validate=validate_static_random,
    help="random sparse mask at the dst_distribution (ERK) densities, fixed")
def _static_random(config, steps_per_epoch, total_steps):
  del total_steps
  sparsity = methods.target_sparsity(config)
  distribution = field(config, "dst_distribution")
  # The DST methods' random start (same seed -> same mask), never updated.
  return _maybe_sparse_init(config, fj.prune(
      methods.make_optimizer(config, steps_per_epoch),
      score_fn=fj.scores.magnitude, schedule=fj.schedules.Schedule((), ()),
      distribution=distribution,
      initial_masks=fj.core.random_masks(sparsity, distribution),
      seed=config.seed, name="static_random"))
