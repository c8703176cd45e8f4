"""Registry entries of the gradient-flow importance measures (and GraSP).

``gradient_flow`` (Lubana & Dick, ICLR 2021; :func:`flipout_jax.gradient_flow`)
prunes while training from scratch: ``rounds`` events, one every
``round_epochs`` epochs from ``prune_start_epoch``, event k removing
``r_k = p/(k·p + n(1−p))`` of what is left (exactly ``p = sparsity`` after
the last), the momentum reset after each; then training goes on under the
fixed mask until ``num_epochs``. Config fields (defaults below apply to a
config that lacks them, e.g. ``--config.method=gradient_flow`` on a FlipOut
config; ``experiments/configs/gradient_flow_*.py`` define them all so that
they can be overridden or swept):

  measure          "magnitude" |θ|, "loss_preservation" |θg|,
                   "loss_preservation_magnitude" |θ²g| (proposed),
                   "gradient_norm" θHg (GraSP-like, signed),
                   "gradient_norm_preservation" |θHg| (proposed).
  rounds           n, the number of pruning events (>= 1).
  round_epochs     epochs between events (float; floor(epochs·steps/epoch)
                   steps, at least one step).
  structured       prune whole output neurons / channels; ``sparsity`` then
                   counts filters, not weights.
  reset_moments    True (the protocol), False, or a ``core.RESET_MOMENTS``
                   mode.
  hvp_temperature  logits / T in the loss of g and Hg; None: the authors'
                   choice, 200 for "gradient_norm" (and GraSP), 1 otherwise.
  sparsity         the final sparsity p (or, if None, FlipOut's events rule,
                   ``methods.target_sparsity``).

``grasp`` (Wang et al. 2020; :func:`flipout_jax.grasp`): one shot at
initialisation (the first update) by θHg, logits / ``hvp_temperature``
(default 200); the mask is then fixed. Uses ``sparsity``, ``structured`` and
``hvp_temperature``.

Both get ``loss_fn`` — the current batch's cross-entropy, eval-mode
BatchNorm — from the train step (``needs_loss_fn``); the Hessian-gradient
product ``Hg`` is thus taken on one batch, on pruning steps only.
"""

from __future__ import annotations

import functools
import math

import optax

import flipout_jax as fj
from experiments import methods

MEASURES = tuple(fj.scores.GRADIENT_FLOW_MEASURES)
DEFAULTS = {
    "measure": "loss_preservation_magnitude",
    "rounds": 10,
    "round_epochs": 1.0,
    "structured": False,
    "reset_moments": True,
    "hvp_temperature": None,
}
# The authors' (and GraSP's) temperature of the θHg measure.
AUTHORS_TEMPERATURE = {"gradient_norm": fj.hessian.GRASP_TEMPERATURE}
_EPS = 1e-9


def _is_number(x) -> bool:
  return (isinstance(x, (int, float)) and not isinstance(x, bool)
          and math.isfinite(x))


def _check(ok: bool, name: str, value, want: str) -> None:
  if not ok:
    raise methods.ConfigError(f"{name}: got {value!r}; must be {want}")


def field(config, name: str):
  """``config[name]``, or its default when the config has no such field."""
  return config.get(name, DEFAULTS[name])


def temperature(config, measure: str) -> float:
  t = field(config, "hvp_temperature")
  return float(AUTHORS_TEMPERATURE.get(measure, 1.0) if t is None else t)


def round_steps(config, steps_per_epoch: int) -> int:
  return int(math.floor(field(config, "round_epochs") * steps_per_epoch + _EPS))


def start_step(config, steps_per_epoch: int) -> int:
  return int(math.floor(config.prune_start_epoch * steps_per_epoch + _EPS))


def _check_schedule(config, steps_per_epoch: int) -> None:
  every = round_steps(config, steps_per_epoch)
  if every < 1:
    raise methods.ConfigError(
        f"round_epochs: {field(config, 'round_epochs')} epochs is less than "
        f"one step ({steps_per_epoch} steps per epoch)")
  last = start_step(config, steps_per_epoch) + field(config, "rounds") * every
  total = config.num_epochs * steps_per_epoch
  if last >= total:
    raise methods.ConfigError(
        f"rounds: {field(config, 'rounds')} rounds of "
        f"{field(config, 'round_epochs')} epochs from epoch "
        f"{config.prune_start_epoch} end at epoch {last / steps_per_epoch:g}, "
        f"not before the end of the run (num_epochs={config.num_epochs}); "
        "lower rounds or round_epochs, or raise num_epochs")


def _check_common(c) -> None:
  structured = field(c, "structured")
  _check(isinstance(structured, bool), "structured", structured,
                 "a bool")
  t = field(c, "hvp_temperature")
  _check(t is None or (_is_number(t) and t > 0),
                 "hvp_temperature", t, "None (the authors' choice) or > 0")
  methods.target_sparsity(c)


def validate_gradient_flow(c) -> None:
  """The method's fields; the schedule fits (checked again in ``build``)."""
  measure = field(c, "measure")
  _check(measure in MEASURES, "measure", measure,
                 f"one of {', '.join(MEASURES)}")
  rounds = field(c, "rounds")
  _check(isinstance(rounds, int) and not isinstance(rounds, bool)
                 and rounds >= 1, "rounds", rounds, "an int >= 1")
  every = field(c, "round_epochs")
  _check(_is_number(every) and every > 0, "round_epochs",
                 every, "a number > 0")
  reset = field(c, "reset_moments")
  _check(isinstance(reset, bool) or reset in fj.core.RESET_MOMENTS,
                 "reset_moments", reset,
                 f"a bool or one of {', '.join(fj.core.RESET_MOMENTS)}")
  _check_common(c)
  _check_schedule(c, 1000)


def with_temperature(tx, t: float):
  """``tx`` whose ``loss_fn`` extra argument is called with ``temperature=t``
  (the train step's ``loss_fn(params, *, temperature=1.0)``)."""
  if t == 1.0:
    return tx
  tx = optax.with_extra_args_support(tx)

  def update(updates, state, params=None, **extra):
    if extra.get("loss_fn") is not None:
      extra["loss_fn"] = functools.partial(extra["loss_fn"], temperature=t)
    return tx.update(updates, state, params, **extra)

  return optax.GradientTransformationExtraArgs(tx.init, update)


@methods.register(
    "gradient_flow", validate=validate_gradient_flow, needs_loss_fn=True,
    help="gradient-flow measures (config.measure), n rounds while training")
def _gradient_flow(config, steps_per_epoch, total_steps):
  del total_steps
  _check_schedule(config, steps_per_epoch)
  measure = field(config, "measure")
  tx = fj.gradient_flow(
      methods.make_optimizer(config, steps_per_epoch), measure=measure,
      sparsity=methods.target_sparsity(config), rounds=field(config, "rounds"),
      steps_per_round=round_steps(config, steps_per_epoch),
      start_step=start_step(config, steps_per_epoch),
      structure=fj.units() if field(config, "structured") else None,
      reset_moments=field(config, "reset_moments"), seed=config.seed)
  return with_temperature(tx, temperature(config, measure))


@methods.register(
    "grasp", validate=_check_common, needs_loss_fn=True,
    help="GraSP: one shot θHg (logits/200) at the first step, then fixed")
def _grasp(config, steps_per_epoch, total_steps):
  del total_steps
  tx = fj.grasp(methods.make_optimizer(config, steps_per_epoch),
                sparsity=methods.target_sparsity(config), step=0,
                structure=fj.units() if field(config, "structured") else None,
                seed=config.seed)
  return with_temperature(tx, temperature(config, "gradient_norm"))
