"""Registry entries of the N:M structured-sparsity methods.

Every method ends with every N:M-compatible prunable layer exactly
``nm_n:nm_m`` along its contraction (input) axis — at most ``nm_n`` nonzeros
in each group of ``nm_m`` consecutive inputs of an output unit — so the
final sparsity is ``1 − nm_n/nm_m`` of those layers (layers skipped as
incompatible stay dense). ``config.sparsity`` / ``target`` are not used.

* ``nm_magnitude``: :func:`flipout_jax.nm_magnitude`, gradual: ``nm_m − nm_n``
  events (``n_t = nm_m−1, …, nm_n`` kept per group, largest ``|θ|``) evenly
  spaced from ``prune_start_epoch`` to ``prune_end_epoch`` (None: half of
  ``num_epochs``); masks only shrink.
* ``nm_flipout``: :func:`flipout_jax.nm_flipout`, the same events with
  FlipOut's saliency ``|θ|^flipout_p/(flips+1)`` and its gradient noise
  (``noise_scale``, ``noise_on``).
* ``nm_st3``: :func:`flipout_jax.nm_st3`, ST-3 with one soft threshold per
  group (its largest pruned magnitude): the cubic ramp of ``s_t`` from 0 to
  ``1 − nm_n/nm_m`` and ``n_t = clip(round((1 − s_t)·nm_m), nm_n, nm_m)``,
  masks recomputed from the raw weights every step; the ``st3_*`` fields
  (ramp epochs, power, rescale, fine-tuning epochs, gradient clip).
* ``nm_dst``: :func:`flipout_jax.nm_dst`, N:M from the first step (a random
  N:M mask), drop-and-grow inside every group every
  ``dst_update_every_epochs`` until ``dst_end_epoch``, growth
  ``nm_dst_grow`` (RigL ``|g|`` by default); the ``dst_*`` fields
  (``dst_distribution`` is not used).

Fields (``nm_n``, ``nm_m``, ``nm_skip_incompatible``, ``nm_dst_grow``) and
their defaults: ``experiments/configs/_base.py`` (``NM_FIELDS``); a config
without them runs with the defaults (2:4, RigL growth). With
``nm_skip_incompatible`` None, the conv nets skip their incompatible layers
(the first conv has 1 or 3 input channels) and LeNet-300-100 does not.
"""

from __future__ import annotations

import math

import optax

import flipout_jax as fj
from experiments import methods
from experiments import methods_sparse_training as mst
from experiments.configs import _base

ConfigError = methods.ConfigError
GROW = ("rigl", "dst_ee", "random")
# Models whose every prunable layer can be N:M for the usual M (2, 4, 8...):
# nm_skip_incompatible=None means False for these, True for the others.
_ALL_COMPATIBLE_MODELS = ("lenet300100",)
_EPS = 1e-9
# prune_end_epoch None: the events end at half the run (ST-3's reference
# ramp ends at epoch 80 of 160).
_END_FRACTION = 0.5
_check = methods._check  # pylint: disable=protected-access


def field(config, name: str):
  """``config.<name>``, or its default (``_base.NM_FIELDS``) if absent."""
  if name in config:
    return config[name]
  return _base.NM_FIELDS[name][1]


def nm_pattern(config) -> tuple[int, int]:
  return field(config, "nm_n"), field(config, "nm_m")


def skip_incompatible(config) -> bool:
  """``nm_skip_incompatible``, None resolved by the model (module docs)."""
  skip = field(config, "nm_skip_incompatible")
  if skip is None:
    return config.model not in _ALL_COMPATIBLE_MODELS
  return skip


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _epoch_to_step(epoch: float, steps_per_epoch: int) -> int:
  return int(math.floor(epoch * steps_per_epoch + _EPS))


# --- Validation -------------------------------------------------------------------


def validate_nm(c) -> None:
  """nm_n, nm_m, nm_skip_incompatible (all N:M methods)."""
  n, m = nm_pattern(c)
  _check(_is_int(m) and 2 <= m <= fj.structure.MAX_M, "nm_m", m,
         f"an int in [2, {fj.structure.MAX_M}] (the group size M)")
  _check(_is_int(n) and 1 <= n < m, "nm_n", n,
         f"an int in [1, nm_m={m}) (nonzeros kept per group of nm_m)")
  skip = field(c, "nm_skip_incompatible")
  _check(skip is None or isinstance(skip, bool), "nm_skip_incompatible", skip,
         "None (by model), True or False")


def gradual_epochs(config) -> tuple[float, float]:
  """``(start, end)`` epochs of the N:M events: ``prune_start_epoch`` and
  ``prune_end_epoch``, or half of ``num_epochs`` if that is None (ST-3's
  reference proportion, 80 of 160 epochs)."""
  end = config.prune_end_epoch
  if end is None:
    end = config.num_epochs * _END_FRACTION
  return config.prune_start_epoch, end


def gradual_steps(config, steps_per_epoch: int) -> tuple[int, int]:
  """``(start_step, end_step)`` of the N:M events, checked to fit the run."""
  n, m = nm_pattern(config)
  start_e, end_e = gradual_epochs(config)
  total = config.num_epochs * steps_per_epoch
  start = _epoch_to_step(start_e, steps_per_epoch)
  end = _epoch_to_step(end_e, steps_per_epoch)
  events = m - n
  if not (start + events - 1 <= end < total and start <= end):
    raise ConfigError(
        f"prune_end_epoch: {end_e:g} gives step {end}; the "
        f"{events} events (n_t = {m - 1}..{n}) need distinct steps from "
        f"prune_start_epoch (step {start}) to it, before the end of the run "
        f"(step {total})")
  return start, end


def validate_gradual(c) -> None:
  validate_nm(c)
  gradual_steps(c, 1000)


def validate_st3(c) -> None:
  validate_nm(c)
  mst.validate_st3_schedule(c)


def validate_dst(c) -> None:
  validate_nm(c)
  grow = field(c, "nm_dst_grow")
  _check(grow in GROW, "nm_dst_grow", grow, f"one of {', '.join(GROW)}")
  mst.validate_dst_schedule(c)


# --- Building -------------------------------------------------------------------


def _incompatible_as_config_error(
    tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """An indivisible layer at ``init`` becomes a ConfigError naming the field."""

  def init(params):
    try:
      return tx.init(params)
    except fj.structure.IncompatibleLayerError as e:
      raise ConfigError(
          f"nm_skip_incompatible: {' '.join(str(e).split())} (in the CLI: "
          "--config.nm_skip_incompatible=True, or another nm_m)") from None

  return optax.GradientTransformationExtraArgs(init, tx.update)


def _structure(config):
  n, m = nm_pattern(config)
  return fj.n_m(n, m, skip_incompatible=skip_incompatible(config))


def _gradual_schedule(config, steps_per_epoch) -> fj.schedules.Schedule:
  """Dense → N:M in ``M − N`` events, one per ``n_t = M−1, …, N``, evenly
  spaced from the window's start to its end (one event: at the end)."""
  n, m = nm_pattern(config)
  start, end = gradual_steps(config, steps_per_epoch)
  values = list(range(m - 1, n - 1, -1))
  if len(values) == 1:
    steps = (end,)
  else:
    span = end - start
    steps = tuple(int(start + round(i * span / (len(values) - 1)))
                  for i in range(len(values)))
  return fj.schedules.Schedule(steps, tuple(1.0 - v / m for v in values))


@methods.register(
    "nm_magnitude", validate=validate_gradual, prunes_to_target=False,
    help="N:M gradual magnitude pruning, events n_t = M-1..N (nm_*, prune_*)")
def _nm_magnitude(config, steps_per_epoch, total_steps):
  del total_steps
  return _incompatible_as_config_error(fj.prune(
      methods.make_optimizer(config, steps_per_epoch),
      score_fn=fj.scores.magnitude,
      schedule=_gradual_schedule(config, steps_per_epoch),
      distribution="uniform", structure=_structure(config), seed=config.seed,
      name="nm_magnitude"))


@methods.register(
    "nm_flipout", validate=validate_gradual, prunes_to_target=False,
    help="N:M with FlipOut's saliency and noise, events n_t = M-1..N (nm_*)")
def _nm_flipout(config, steps_per_epoch, total_steps):
  del total_steps
  return _incompatible_as_config_error(fj.prune(
      methods.make_optimizer(config, steps_per_epoch),
      score_fn=fj.scores.flipout_saliency(config.flipout_p),
      schedule=_gradual_schedule(config, steps_per_epoch),
      distribution="uniform", structure=_structure(config),
      noise_scale=config.noise_scale, noise_on=config.noise_on,
      tracker=fj.flip_counter(), seed=config.seed, name="nm_flipout"))


@methods.register(
    "nm_st3", validate=validate_st3, prunes_to_target=False,
    help="ST-3 with per-group soft thresholds, cubic ramp to N:M (nm_*, st3_*)")
def _nm_st3(config, steps_per_epoch, total_steps):
  del total_steps
  start, end, freeze = mst.st3_steps(config, steps_per_epoch)
  n, m = nm_pattern(config)
  tx = _incompatible_as_config_error(fj.st3(
      methods.make_optimizer(config, steps_per_epoch), sparsity=1.0 - n / m,
      start_step=start, end_step=end, power=mst.field(config, "st3_power"),
      rescale=mst.field(config, "st3_rescale"), freeze_step=freeze,
      structure=_structure(config)))
  clip = mst.field(config, "st3_grad_clip")
  if clip is not None:
    # nm_st3 must be last: its updates are w_eff' − params (fj.st3 docs).
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx


@methods.register(
    "nm_dst", validate=validate_dst, prunes_to_target=False,
    help="N:M dynamic sparse training, drop-and-grow per group (nm_*, dst_*)")
def _nm_dst(config, steps_per_epoch, total_steps):
  del total_steps
  every, end = mst.dst_steps(config, steps_per_epoch)
  n, m = nm_pattern(config)
  grow = field(config, "nm_dst_grow")
  return _incompatible_as_config_error(fj.dst(
      methods.make_optimizer(config, steps_per_epoch), sparsity=1.0 - n / m,
      update_every=every, end_step=end, grow=grow,
      drop_fraction=mst.field(config, "dst_drop_fraction"),
      exploration=mst.field(config, "dst_exploration"),
      epsilon=mst.field(config, "dst_epsilon"), distribution="uniform",
      structure=_structure(config), seed=config.seed))
