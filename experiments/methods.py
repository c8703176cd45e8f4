"""The method registry: method name -> optax transformation built from a config.

A method is a :class:`Method`: a ``build(config, steps_per_epoch, total_steps)
-> optax transformation`` for the main training phase (``config.num_epochs``
epochs, ``total_steps`` steps), and optionally ``extra_phases(config,
steps_per_epoch)`` for multi-phase methods (Hoyer-Square: train with the
regulariser, threshold, fine-tune under the fixed mask). Add one with::

    @methods.register("rigl", validate=methods.validate_one_shot,
                      help="RigL: drop by |θ|, grow by |g|")
    def _rigl(config, steps_per_epoch, total_steps):
      return fj.rigl(methods.make_optimizer(config, steps_per_epoch),
                     sparsity=methods.target_sparsity(config), ...)

New config fields go in ``experiments/configs/_base.py`` (with a default, so
every config has them); ``validate(config)`` checks the method's own fields.

and, for a method with a later phase, ``register(name, extra_phases=fn)``
where ``fn(config, steps_per_epoch) -> [Phase(...)]``. Each :class:`Phase`
gets an ``enter(params, opt_state) -> (params, aux)`` hook run once when the
phase starts (with the previous phase's final params and optimizer state) and
a ``make_tx(aux)`` that builds the phase's transformation; ``aux`` (e.g. the
fine-tuning masks) is saved in the checkpoints, so every phase resumes.

Schedules are given in epochs in the config and converted to steps here with
``steps_per_epoch``. Bad values raise :class:`ConfigError` (a one-line
message naming the field and what is valid).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import optax
from ml_collections import config_dict

import flipout_jax as fj
from experiments.configs import _base

ConfigDict = config_dict.ConfigDict
Builder = Callable[[ConfigDict, int, int], optax.GradientTransformation]

LR_SCHEDULES = ("piecewise", "cosine", "constant")
NOISE_ON = ("all", "prunable")
# Tolerance of the float comparison "k * prune_every < num_epochs".
_EPS = 1e-9


class ConfigError(ValueError):
  """A bad config value; the message is one line."""


# --- Phases and the registry ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Phase:
  """One training phase.

  Attributes:
    name: shown in logs and metrics.
    num_epochs: epochs of this phase.
    make_tx: ``aux -> transformation``; ``aux`` is what ``enter`` returned
      (None for a phase without ``enter``).
    learning_rate: ``step within the phase -> lr`` (for the metrics).
    enter: ``(params, opt_state of the previous phase) -> (params, aux)``,
      run once at the start of the phase; None: params pass through.
    needs_loss_fn: the train step calls ``tx.update(grads, state, params,
      loss_fn=f)``, ``f(params, *, temperature=1.0)`` the mean cross-entropy
      of the current batch (BatchNorm in inference mode, logits divided by
      ``temperature``).
  """
  name: str
  num_epochs: int
  make_tx: Callable[[Any], optax.GradientTransformation]
  learning_rate: Callable[[int], float]
  enter: Callable[[Any, Any], tuple[Any, Any]] | None = None
  needs_loss_fn: bool = False


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered method.

  Attributes:
    name: registry key (``config.method``).
    build: ``(config, steps_per_epoch, total_steps) -> tx`` for the main phase.
    extra_phases: ``(config, steps_per_epoch) -> [Phase]`` run after it.
    prunes_to_target: whether the final sparsity is the resolved target
      (:func:`target_sparsity`); False for dense and for methods whose
      sparsity is set indirectly (Hoyer-Square's λ).
    help: one line for ``--help`` style listings.
    validate: ``config -> None``, raises :class:`ConfigError` for a bad value
      of the method's own fields (run before any data is loaded).
    needs_loss_fn: the main phase's ``tx.update`` gets ``loss_fn=`` (see
      :class:`Phase` and ``experiments.train``), e.g. for Hessian-gradient
      scores.
  """
  name: str
  build: Builder
  extra_phases: Callable[[ConfigDict, int], Sequence[Phase]] | None = None
  prunes_to_target: bool = True
  help: str = ""
  validate: Callable[[ConfigDict], None] | None = None
  needs_loss_fn: bool = False


METHODS: dict[str, Method] = {}


def register(name: str, *, extra_phases=None, prunes_to_target: bool = True,
             help: str = "", validate=None,  # pylint: disable=redefined-builtin
             needs_loss_fn: bool = False):
  """Decorator: registers ``build`` under ``name`` (see :class:`Method`)."""
  def wrap(build: Builder) -> Builder:
    if name in METHODS:
      raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = Method(name, build, extra_phases, prunes_to_target, help,
                           validate, needs_loss_fn)
    return build
  return wrap


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ConfigError(f"method: unknown method {name!r}; valid methods are: "
                      f"{', '.join(sorted(METHODS))}")
  return METHODS[name]


def phases(config: ConfigDict, steps_per_epoch: int) -> list[Phase]:
  """The phases of ``config.method``: the main phase, then any extra ones."""
  method = get_method(config.method)
  total = config.num_epochs * steps_per_epoch
  main = Phase(
      name="train", num_epochs=config.num_epochs,
      make_tx=lambda aux: method.build(config, steps_per_epoch, total),
      learning_rate=learning_rate_fn(config.lr, config.lr_schedule,
                                     config.lr_decay_epochs,
                                     config.lr_decay_factor, config.num_epochs,
                                     steps_per_epoch),
      needs_loss_fn=method.needs_loss_fn)
  extra = list(method.extra_phases(config, steps_per_epoch)
               if method.extra_phases else [])
  return [main] + extra


# --- Optimizer ----------------------------------------------------------------


def learning_rate_fn(lr: float, schedule: str, decay_epochs: Sequence[float],
                     decay_factor: float, num_epochs: int,
                     steps_per_epoch: int) -> optax.Schedule:
  """``piecewise``: ×decay_factor at each of decay_epochs; ``cosine`` to 0."""
  if schedule == "piecewise":
    bounds = {}
    for e in decay_epochs:
      step = int(round(e * steps_per_epoch))
      bounds[step] = bounds.get(step, 1.0) * decay_factor
    return optax.piecewise_constant_schedule(lr, bounds)
  if schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(1, num_epochs * steps_per_epoch))
  if schedule == "constant":
    return optax.constant_schedule(lr)
  raise ConfigError(f"lr_schedule: unknown schedule {schedule!r}; valid: "
                    f"{', '.join(LR_SCHEDULES)}")


def sgd(config: ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  """The paper's optimizer: coupled weight decay, then SGD with momentum.

  The decay applies to every parameter (biases and BatchNorm included), as
  PyTorch's ``SGD(weight_decay=...)`` in the reference code does.

  The decay sits inside the optimizer a pruning method wraps, so FlipOut's
  gradient noise is computed from the loss gradient, before weight decay.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(lr, momentum=config.momentum or None,
                nesterov=config.nesterov))


def make_optimizer(config: ConfigDict,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """The main phase's optimizer from ``config`` (lr schedule included)."""
  return sgd(config, learning_rate_fn(
      config.lr, config.lr_schedule, config.lr_decay_epochs,
      config.lr_decay_factor, config.num_epochs, steps_per_epoch))


# --- Pruning schedule -----------------------------------------------------------


def _paper_target(config: ConfigDict) -> tuple[float, float]:
  """``(target %, prune_every_epochs)`` for ``config.target``."""
  for t, every in _base.PAPER_TARGETS.items():
    if abs(config.target - t) < 5e-3:
      return t, every * config.num_epochs / _base.PAPER_NUM_EPOCHS
  raise ConfigError(
      f"target: {config.target} is not one of the paper's sparsities; valid: "
      f"{', '.join(f'{t:g}' for t in _base.PAPER_TARGETS)}")


def prune_every_epochs(config: ConfigDict) -> float | None:
  """The period in epochs (``target`` overrides ``prune_every_epochs``)."""
  if config.target is not None:
    return _paper_target(config)[1]
  return config.prune_every_epochs


def events_in_run(config: ConfigDict) -> int:
  """N = #{k >= 1: prune_start_epoch + k·prune_every < num_epochs}."""
  every = prune_every_epochs(config)
  if not every or every <= 0:
    return 0
  span = config.num_epochs - config.prune_start_epoch
  return max(0, math.ceil(span / every * (1 - _EPS)) - 1)


def target_sparsity(config: ConfigDict) -> float:
  """``config.sparsity``, or ``1 − (1 − prune_rate)^N`` from the events."""
  if config.sparsity is not None:
    return float(config.sparsity)
  n = events_in_run(config)
  if n == 0:
    raise ConfigError(
        f"sparsity: not given, and no pruning event fits: prune_every_epochs="
        f"{prune_every_epochs(config)} with num_epochs={config.num_epochs} "
        f"(events at prune_start_epoch + k*prune_every_epochs < num_epochs); "
        "set sparsity, or a smaller prune_every_epochs/target")
  return 1.0 - (1.0 - config.prune_rate) ** n


@dataclasses.dataclass(frozen=True)
class PruneSchedule:
  sparsity: float
  prune_every: int | None  # steps
  end_step: int | None
  start_step: int
  num_events: int

  def kwargs(self) -> dict[str, Any]:
    return dict(sparsity=self.sparsity, prune_every=self.prune_every,
                end_step=self.end_step, start_step=self.start_step)


def prune_schedule(config: ConfigDict, steps_per_epoch: int) -> PruneSchedule:
  """The gradual-pruning schedule in steps; validated to fit in the run."""
  total = config.num_epochs * steps_per_epoch
  sparsity = target_sparsity(config)
  start = int(math.floor(config.prune_start_epoch * steps_per_epoch + _EPS))
  n = fj.schedules.events_needed(sparsity, config.prune_rate)
  every = prune_every_epochs(config)
  if every is not None:
    every_steps = int(math.floor(every * steps_per_epoch + _EPS))
    if every_steps < 1:
      raise ConfigError(
          f"prune_every_epochs: {every} epochs is less than one step "
          f"({steps_per_epoch} steps per epoch)")
    last = start + n * every_steps
    if last >= total:
      raise ConfigError(
          f"sparsity: {sparsity:g} needs {n} events of prune_rate "
          f"{config.prune_rate:g} every {every:g} epochs, the last at epoch "
          f"{last / steps_per_epoch:g}, not before the end of the run "
          f"(num_epochs={config.num_epochs}); lower sparsity or "
          "prune_every_epochs, or raise num_epochs")
    return PruneSchedule(sparsity, every_steps, None, start, n)
  if config.prune_end_epoch is None:
    raise ConfigError("prune_every_epochs: give prune_every_epochs, target or "
                      "prune_end_epoch for a gradual pruning method")
  end = int(math.floor(config.prune_end_epoch * steps_per_epoch + _EPS))
  if not 0 < end < total:
    raise ConfigError(
        f"prune_end_epoch: {config.prune_end_epoch} must be in (0, num_epochs"
        f"={config.num_epochs})")
  return PruneSchedule(sparsity, None, end, start, n)


# --- Validation -------------------------------------------------------------------


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, field: str, value, want: str) -> None:
  if not ok:
    raise ConfigError(f"{field}: got {value!r}; must be {want}")


def validate(config: ConfigDict) -> None:
  """Checks the optimizer and pruning fields; raises :class:`ConfigError`."""
  method = get_method(config.method)
  c = config
  _check(_is_number(c.lr) and c.lr > 0, "lr", c.lr, "a number > 0")
  _check(_is_number(c.momentum) and 0 <= c.momentum < 1, "momentum",
         c.momentum, "in [0, 1)")
  _check(_is_number(c.weight_decay) and c.weight_decay >= 0, "weight_decay",
         c.weight_decay, "a number >= 0")
  for prefix in ("", "finetune_"):
    sched = c[prefix + "lr_schedule"]
    _check(sched in LR_SCHEDULES, prefix + "lr_schedule", sched,
           f"one of {', '.join(LR_SCHEDULES)}")
  _check(all(_is_number(e) and 0 < e for e in c.lr_decay_epochs),
         "lr_decay_epochs", c.lr_decay_epochs, "a tuple of epochs > 0")
  _check(_is_number(c.lr_decay_factor) and c.lr_decay_factor > 0,
         "lr_decay_factor", c.lr_decay_factor, "a number > 0")
  _check(_is_number(c.prune_rate) and 0 < c.prune_rate < 1, "prune_rate",
         c.prune_rate, "in (0, 1)")
  _check(_is_number(c.prune_start_epoch) and 0 <= c.prune_start_epoch
         < c.num_epochs, "prune_start_epoch", c.prune_start_epoch,
         "in [0, num_epochs)")
  _check(c.sparsity is None or (_is_number(c.sparsity) and 0 <= c.sparsity < 1),
         "sparsity", c.sparsity, "None (set by the events) or in [0, 1)")
  _check(c.prune_every_epochs is None or (_is_number(c.prune_every_epochs)
                                          and c.prune_every_epochs > 0),
         "prune_every_epochs", c.prune_every_epochs, "None or a number > 0")
  _check(c.target is None or _is_number(c.target), "target", c.target,
         "None or one of " + ", ".join(f"{t:g}" for t in _base.PAPER_TARGETS))
  if c.target is not None:
    _paper_target(c)
  _check(_is_number(c.noise_scale) and c.noise_scale >= 0, "noise_scale",
         c.noise_scale, "a number >= 0")
  _check(c.noise_on in NOISE_ON, "noise_on", c.noise_on,
         f"one of {', '.join(NOISE_ON)}")
  _check(_is_number(c.flipout_p) and c.flipout_p > 0, "flipout_p", c.flipout_p,
         "a number > 0")
  if method.validate is not None:
    method.validate(c)


def validate_gradual(config: ConfigDict) -> None:
  """The schedule fits the run (checked again with the real steps per epoch)."""
  prune_schedule(config, 1000)


def validate_one_shot(config: ConfigDict) -> None:
  target_sparsity(config)


def validate_hoyer(c: ConfigDict) -> None:
  _check(_is_number(c.hoyer_lambda) and c.hoyer_lambda >= 0, "hoyer_lambda",
         c.hoyer_lambda, "a number >= 0")
  _check(_is_number(c.hoyer_threshold) and c.hoyer_threshold > 0,
         "hoyer_threshold", c.hoyer_threshold, "a number > 0")
  _check(isinstance(c.finetune_epochs, int) and c.finetune_epochs >= 0,
         "finetune_epochs", c.finetune_epochs, "an int >= 0")
  _check(_is_number(c.finetune_lr) and c.finetune_lr > 0, "finetune_lr",
         c.finetune_lr, "a number > 0")
  _check(all(_is_number(e) and 0 < e for e in c.finetune_lr_decay_epochs),
         "finetune_lr_decay_epochs", c.finetune_lr_decay_epochs,
         "a tuple of epochs > 0")


# --- The methods ----------------------------------------------------------------

@register("dense", prunes_to_target=False,
          help="no pruning (the inner optimizer)")
def _dense(config, steps_per_epoch, total_steps):
  del total_steps
  return make_optimizer(config, steps_per_epoch)


@register("flipout", validate=validate_gradual,
          help="FlipOut: |θ|^p/(flips+1), gradient noise, halving events")
def _flipout(config, steps_per_epoch, total_steps):
  del total_steps
  return fj.flipout(make_optimizer(config, steps_per_epoch),
                    **prune_schedule(config, steps_per_epoch).kwargs(),
                    prune_rate=config.prune_rate, p=config.flipout_p,
                    noise_scale=config.noise_scale, noise_on=config.noise_on,
                    seed=config.seed)


@register("global_magnitude", validate=validate_gradual,
          help="global magnitude |θ| on FlipOut's schedule")
def _global_magnitude(config, steps_per_epoch, total_steps):
  del total_steps
  return fj.global_magnitude(make_optimizer(config, steps_per_epoch),
                             **prune_schedule(config, steps_per_epoch).kwargs(),
                             prune_rate=config.prune_rate, noise_scale=0.0,
                             seed=config.seed)


@register("noisy_global_magnitude", validate=validate_gradual,
          help="global magnitude + FlipOut's gradient noise (the ablation)")
def _noisy_global_magnitude(config, steps_per_epoch, total_steps):
  del total_steps
  return fj.global_magnitude(make_optimizer(config, steps_per_epoch),
                             **prune_schedule(config, steps_per_epoch).kwargs(),
                             prune_rate=config.prune_rate,
                             noise_scale=config.noise_scale,
                             noise_on=config.noise_on, seed=config.seed)


@register("random", validate=validate_gradual,
          help="uniform random among the survivors, FlipOut's schedule")
def _random(config, steps_per_epoch, total_steps):
  del total_steps
  return fj.random_pruning(make_optimizer(config, steps_per_epoch),
                           **prune_schedule(config, steps_per_epoch).kwargs(),
                           prune_rate=config.prune_rate, seed=config.seed)


@register("movement", validate=validate_gradual,
          help="movement pruning: S = -sum θ·g, cubic ramp, an event per "
               "epoch, ending where FlipOut's schedule ends")
def _movement(config, steps_per_epoch, total_steps):
  del total_steps
  sched = prune_schedule(config, steps_per_epoch)
  end = sched.end_step or sched.start_step + sched.num_events * sched.prune_every
  return fj.movement(make_optimizer(config, steps_per_epoch),
                     sparsity=sched.sparsity, start_step=sched.start_step,
                     end_step=end, every=steps_per_epoch, seed=config.seed)


@register("snip", validate=validate_one_shot,
          help="SNIP: one shot |θ·g| at the first step, then a fixed mask")
def _snip(config, steps_per_epoch, total_steps):
  del total_steps
  return fj.snip(make_optimizer(config, steps_per_epoch),
                 sparsity=target_sparsity(config), step=0, seed=config.seed)


def _hoyer_finetune(config, steps_per_epoch):
  if config.finetune_epochs == 0:
    return []
  lr = learning_rate_fn(config.finetune_lr, config.finetune_lr_schedule,
                        config.finetune_lr_decay_epochs, config.lr_decay_factor,
                        config.finetune_epochs, steps_per_epoch)

  def enter(params, opt_state):
    del opt_state
    return fj.threshold_prune(params, config.hoyer_threshold)

  return [Phase(name="finetune", num_epochs=config.finetune_epochs,
                make_tx=lambda masks: fj.fixed_mask(sgd(config, lr), masks),
                learning_rate=lr, enter=enter)]


@register("hoyer_square", extra_phases=_hoyer_finetune, prunes_to_target=False,
          validate=validate_hoyer,
          help="Hoyer-Square regulariser (λ=hoyer_lambda), threshold, fine-tune")
def _hoyer_square(config, steps_per_epoch, total_steps):
  del total_steps
  return optax.chain(fj.hoyer_square(config.hoyer_lambda),
                     make_optimizer(config, steps_per_epoch))


# Methods registered in their own modules (importing them registers them).
from experiments import methods_gradient_flow  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
from experiments import methods_sparse_training  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
from experiments import methods_nm  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
