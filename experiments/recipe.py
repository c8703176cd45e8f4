"""A config's method: resolved by name, built into the phases of a run.

:func:`resolve`: a config (JSON) -> the run's *spec*, the method and exactly the
keyword arguments it takes (epoch values in epochs), the optimizer and the run's
fields; the same spec is the same run (:func:`same_run`: a sweep skips it).
:func:`phases` builds a spec into :class:`Phase` s; the library checks every
argument, its errors naming the config key. Methods: ``fj.registry`` names and
``HARNESS``: "dense" (the optimizer alone), "hoyer_square" (regulariser, then
threshold and fine-tune under the fixed mask) and ``POST_TRAINING``
(``fj.post_training``'s magnitude, wanda, sparsegpt; unipts), the only phase of
a run from a dense run's params (``init_from``; BatchNorm recalibrated).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import optax

import flipout_jax as fj
from experiments import one_line
from experiments.configs import _base

REQUIRED = fj.registry.REQUIRED
_EPS = 1e-9
EPOCH_SUFFIXES = ("_epochs", "_epoch")
LR_SCHEDULES = ("piecewise", "cosine", "constant")
CALIBRATION_LABELS = ("teacher", "true")
# The authors' logit temperature of the θHg measure (GraSP's too).
AUTHORS_TEMPERATURE = 200.0
RUN_FIELDS = ("model", "width", "dataset", "data_dir", "augment", "seed",
              "batch_size", "eval_batch_size", "num_epochs", "optimizer",
              "optimizer_kw", "weight_decay", "lr", "lr_schedule",
              "lr_decay_epochs", "lr_decay_factor", "grad_clip", "sparse_init",
              "init_from", "model_kw", "data_kw")
HARNESS = {
    "dense": {},
    "hoyer_square": dict(_base.PRESETS["hoyer_square"], strength=REQUIRED),
    "magnitude": dict(sparsity=REQUIRED, distribution="global", structure=None),
    **{m: dict(sparsity=REQUIRED, allocation="uniform", structure=None,
               owl_threshold=5.0, owl_lambda=0.08,
               **(dict(block_size=128, dampening=0.01) if m == "sparsegpt"
                  else {}))
       for m in ("wanda", "sparsegpt")},
    "unipts": dict(sparsity=REQUIRED, seed=0, search=True, structure=None, **{
        f.name: f.default for f in
        dataclasses.fields(fj.unipts.UniPTSConfig)}),
}
POST_TRAINING = ("magnitude", "unipts", "wanda", "sparsegpt")


class ConfigError(ValueError):
  """A bad config value; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Phase:
  """``make_tx(aux)``, ``aux`` (checkpointed) from ``enter(params)``; or a
  post-training ``post(model, variables, ds) -> (variables, masks, report)``."""
  name: str
  num_epochs: int
  make_tx: Callable[[Any], optax.GradientTransformation] | None = None
  learning_rate: Callable[[int], float] = lambda step: 0.0
  enter: Callable[[Any], tuple[Any, Any]] | None = None
  post: Callable[..., tuple[Any, Any, dict]] | None = None


def keywords(name: str) -> dict[str, Any]:
  if name in HARNESS:
    return HARNESS[name]
  try:
    return fj.registry.keywords(name)
  except ValueError:
    raise ConfigError(
        f"method: unknown method {name!r}; valid: registry "
        f"{', '.join(fj.registry.names())}; harness {', '.join(HARNESS)}; "
        f"or a key of presets") from None


def canonical(key: str, valid) -> tuple[str | None, bool]:
  """``(keyword, in_epochs)`` of a method_kw key for a method taking ``valid``."""
  if key in valid:
    return key, False
  for suffix in EPOCH_SUFFIXES:
    if key.endswith(suffix):
      base = key[:-len(suffix)]
      for k in (base, base + "_step"):
        if k in valid:
          return k, True
  return None, False


def _all_keywords() -> set[str]:
  names = list(fj.registry.names()) + list(HARNESS)
  return set().union(*(keywords(n) for n in names))


def _paper_every(target: float) -> float:
  for t, every in _base.PAPER_TARGETS.items():
    if abs(target - t) < 5e-3:
      return every
  raise ConfigError(f"target: {target} is not one of the paper's sparsities; "
                    f"valid: {', '.join(f'{t:g}' for t in _base.PAPER_TARGETS)}")


def _events(kw, num_epochs) -> int:
  """N = #{k >= 1: start + k·prune_every < num_epochs} (epochs)."""
  every = kw.get("every_epochs")
  if not every or every <= 0:
    return 0
  span = num_epochs - (kw.get("start_epoch") or 0.0)
  return max(0, math.ceil(span / every * (1 - _EPS)) - 1)


def resolve(c: dict[str, Any]) -> dict[str, Any]:
  """The spec of config ``c`` (JSON, as :func:`config_json` gives)."""
  preset = dict((c.get("presets") or {}).get(c["method"]) or {})
  name = preset.pop("method", c["method"])
  valid = keywords(name)
  merged = {**(c.get("method_kw") or {})}
  if c.get("target") is not None:
    paper = _paper_every(c["target"])
    merged["every_epochs"] = paper * c["num_epochs"] / _base.PAPER_NUM_EPOCHS
    if merged.get("sparsity") is None:
      n = math.ceil(_base.PAPER_NUM_EPOCHS / paper) - 1
      merged["sparsity"] = 1.0 - 0.5 ** n
  if "sparsity" in valid and merged.get("sparsity") is None:
    nm = getattr(structure(merged.get("structure")), "options", {})
    merged["sparsity"] = 1.0 - nm["n"] / nm["m"] if "m" in nm else None
    if merged["sparsity"] is None and (n := _events(merged, c["num_epochs"])):
      merged["sparsity"] = 1.0 - (1.0 - merged.get("prune_rate", 0.5)) ** n
  if (valid.get("end_step") is REQUIRED and "end_epoch" not in merged
      and "end_step" not in merged and merged.get("every_epochs")
      and 0 <= (merged.get("sparsity") or -1) < 1):  # FlipOut's last event
    n = fj.schedules.events_needed(merged["sparsity"], merged.get("prune_rate", 0.5))
    merged["end_epoch"] = ((merged.get("start_epoch") or 0.0)
                           + n * merged["every_epochs"])
  for k, v in preset.items():  # A preset key replaces its keyword's.
    kw_name = canonical(k, valid)[0] or k
    merged = {m: x for m, x in merged.items()
              if (canonical(m, valid)[0] or m) != kw_name}
    merged[k] = v
  kw = {}
  for k, v in merged.items():
    key, in_epochs = canonical(k, valid)
    if key is None:
      if canonical(k, _all_keywords())[0] is None:
        raise ConfigError(f"method_kw.{k}: not an argument of any method "
                          f"({name} takes {', '.join(valid) or 'none'})")
      continue  # Another method's argument (a config shared by several).
    if in_epochs and v == 0:
      v = 0  # None and 0 are the same in any unit
    kw[k if in_epochs and v else key] = v
  given = {canonical(k, valid)[0] for k in kw}
  for k, default in valid.items():  # Defaults written out: absent == default.
    if k not in given and k != "seed" and (default is None or isinstance(
        default, (bool, int, float, str, tuple))):
      kw[k] = list(default) if isinstance(default, tuple) else default
  if "seed" in valid and "seed" not in given:
    kw["seed"] = c["seed"]
  defaults = _base.base_config()  # a field added since: at its default
  spec = {k: c[k] if k in c else defaults.get(k) for k in RUN_FIELDS}
  for k in ("optimizer_kw", "model_kw", "data_kw"):  # None (absent) == {}
    spec[k] = dict(spec[k] or {})
  t = c.get("hvp_temperature")
  if t is None:
    t = AUTHORS_TEMPERATURE if (name == "grasp" or kw.get("measure")
                                == "gradient_norm") else 1.0
  spec.update(method=name, method_kw=kw, hvp_temperature=float(t))
  if name in POST_TRAINING:
    spec.update(calibration_size=c.get("calibration_size"),
                calibration_labels=c.get("calibration_labels"))
  return spec


def same_run(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """The spec fields in which two configs differ (old ones upgraded first)."""
  from experiments import legacy  # pylint: disable=g-import-not-at-top
  a, b = resolve(legacy.upgrade(old)), resolve(new)
  diff = sorted(k for k in set(a) | set(b) if k != "method_kw"
                and a.get(k) != b.get(k))
  ka, kb = a["method_kw"], b["method_kw"]
  return diff + sorted(f"method_kw.{k}" for k in set(ka) | set(kb)
                       if ka.get(k) != kb.get(k))


def learning_rate_fn(lr, schedule, decay_epochs, decay_factor, num_epochs,
                     steps_per_epoch) -> optax.Schedule:
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


def optimizer(spec, lr: optax.Schedule) -> optax.GradientTransformation:
  """Coupled weight decay (every parameter, as PyTorch's SGD), then
  ``optax.<optimizer>``; inside the method (FlipOut's noise: the loss gradient's)."""
  make = getattr(optax, str(spec["optimizer"]), None)
  if not callable(make):
    raise ConfigError(f"optimizer: optax has no optimizer {spec['optimizer']!r}")
  try:
    inner = make(lr, **(spec["optimizer_kw"] or {}))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"optimizer_kw: {one_line(e)}") from None
  return optax.chain(optax.add_decayed_weights(spec["weight_decay"]), inner)


def structure(value, example=None):
  """A ``structure`` from its string ("2:4", "2:4+skip", "units", "unstructured",
  "coupled[:reduce]": traced from ``example`` (apply_fn, variables, x)); else as is."""
  if not isinstance(value, str):
    return value
  if value in ("units", "unstructured"):
    return getattr(fj, value)()
  if value.split(":")[0] == "coupled":
    groups = fj.dependency_groups(*example) if example else ()
    return _library("method_kw.structure", {}, lambda: fj.coupled(
        groups, reduce=(value + ":sum").split(":")[1]))
  try:
    n, m = value.split("+")[0].split(":")
    return fj.n_m(int(n), int(m), skip_incompatible=value.endswith("+skip"))
  except ValueError:
    raise ConfigError(f"method_kw.structure: {value!r}; valid: 'N:M', "
                      "'N:M+skip', 'units', 'unstructured', 'coupled[:reduce]'") from None


def with_temperature(tx, t: float):
  """``tx`` whose ``loss_fn`` extra argument is called with ``temperature=t``."""
  tx = optax.with_extra_args_support(tx)
  if t == 1.0:
    return tx

  def update(updates, state, params=None, **extra):
    if extra.get("loss_fn") is not None:
      f = extra["loss_fn"]
      extra["loss_fn"] = lambda p, **k: f(p, **{"temperature": t, **k})
    return tx.update(updates, state, params, **extra)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def _steps(spec, spe: int, example=None) -> tuple[dict[str, Any], dict[str, str]]:
  """The method's keyword arguments in steps, and keyword -> config key."""
  valid = keywords(spec["method"])
  kw, source = {}, {}
  for k, v in spec["method_kw"].items():
    key, in_epochs = canonical(k, valid)
    if in_epochs and v is not None:
      v = int(math.floor(v * spe + _EPS))
    kw[key], source[key] = (structure(v, example) if key == "structure" else v), k
  total = spec["num_epochs"] * spe
  if "prune_rate" in kw and kw.get("every") and 0 <= (kw.get("sparsity") or -1) < 1:
    n = fj.schedules.events_needed(kw["sparsity"], kw.get("prune_rate", 0.5))
    last = (kw.get("start_step") or 0) + n * kw["every"]
    if last >= total:
      raise ConfigError(
          f"method_kw.{source['every']}: sparsity {kw['sparsity']:g} "
          f"needs {n} events, the last at epoch {last / spe:g}, not before "
          f"the end of the run (num_epochs={spec['num_epochs']}); lower "
          "sparsity or the period, or raise num_epochs")
  return kw, source


def _library(what: str, source: dict[str, str], build):
  """``build()``, its ValueError naming the config key of the argument."""
  try:
    return build()
  except (TypeError, ValueError) as e:
    msg = one_line(e)
    arg = msg.split(":", 1)[0]
    key = f"method_kw.{source[arg]}" if arg in source else what
    raise ConfigError(f"{key}: {msg}") from None


def phases(spec: dict[str, Any], spe: int, example=None) -> list[Phase]:
  """The phases of a resolved config, ``spe`` steps per epoch."""
  name, n = spec["method"], spec["num_epochs"]
  kw, source = _steps(spec, spe, example)
  if name in POST_TRAINING:
    if not spec["init_from"]:
      raise ConfigError(f"init_from: {name} is a post-training method: give "
                        "the workdir of a finished (dense) run")
    if spec["calibration_labels"] not in CALIBRATION_LABELS:
      raise ConfigError(f"calibration_labels: {spec['calibration_labels']!r}; "
                        f"valid: {', '.join(CALIBRATION_LABELS)}")
    if name != "unipts":  # Check the arguments now.
      _library(name, source, lambda: fj.post_training.check_arguments(
          name, kw.get("allocation", kw.get("distribution")),
          kw["structure"], kw["sparsity"]))
    else:
      _library(name, source, lambda: fj.unipts.UniPTSConfig(**{
          k: v for k, v in kw.items() if k not in ("sparsity", "seed", "search", "structure")}))
    return [Phase(name, 0, post=lambda *a: post_train(name, kw, spec, *a))]
  lr = learning_rate_fn(spec["lr"], spec["lr_schedule"], spec["lr_decay_epochs"],
                        spec["lr_decay_factor"], n, spe)

  def make_tx(aux):
    del aux
    inner = optimizer(spec, lr)
    if name == "dense":
      tx = inner
    elif name == "hoyer_square":
      tx = optax.chain(_library(name, source, lambda: fj.hoyer_square(
          kw["strength"])), inner)
    else:
      tx = _library(name, source, lambda: fj.registry.build(name, inner, **kw))
    if spec["sparse_init"]:
      tx = fj.sparse_init(tx)
    if spec["grad_clip"] is not None:  # before the method (ST-3 must be last)
      tx = optax.chain(optax.clip_by_global_norm(spec["grad_clip"]), tx)
    return with_temperature(tx, spec["hvp_temperature"])

  out = [Phase("train", n, make_tx, lr)]
  if name == "hoyer_square" and kw["finetune_epochs"]:
    ft_lr = learning_rate_fn(kw["finetune_lr"], kw["finetune_lr_schedule"],
                             kw["finetune_lr_decay_epochs"],
                             spec["lr_decay_factor"], kw["finetune_epochs"], spe)
    out.append(Phase(
        "finetune", kw["finetune_epochs"],
        lambda masks: fj.fixed_mask(optimizer(spec, ft_lr), masks), ft_lr,
        enter=lambda params: fj.threshold_prune(params, kw["threshold"])))
  return out


def calibration_indices(num_train: int, size: int, seed: int) -> np.ndarray:
  """``size`` sorted train-split indices drawn by ``default_rng([seed, 1])``."""
  if not (isinstance(size, int) and 1 <= size <= num_train):
    raise ConfigError(f"calibration_size: {size!r}; must be an int in [1, "
                      f"{num_train}] (the training examples)")
  rng = np.random.default_rng([seed, 1])
  return np.sort(rng.choice(num_train, size=size, replace=False))


def post_train(name, kw, spec, model, variables, ds):
  """A post-training method on ``variables``: ``(variables, masks, report)``."""
  import jax  # pylint: disable=g-import-not-at-top
  idx = calibration_indices(ds.train.num_examples, spec["calibration_size"],
                            spec["seed"])
  x, y = ds.train.read(idx)
  report = {"calibration_indices": idx.tolist()}
  if name == "unipts":
    labels = y if spec["calibration_labels"] == "true" else None
    r = _library(name, {k: k for k in kw}, lambda: fj.unipts.run(
        model.apply, variables, x, calibration_y=labels, log_fn=print, **kw))
    return jax.device_get(r.variables), r.masks, dict(r.report, **report)
  pt_kw = kw if name != "magnitude" else dict(
      sparsity=kw["sparsity"], structure=kw["structure"],
      allocation=kw["distribution"])
  r = _library(name, {k: k for k in kw}, lambda: fj.post_training.prune(
      lambda v, xb: model.apply(v, xb, train=False), variables, x,
      method=name, **pt_kw))
  sparse, report["post_training"] = r.variables, r.report
  if fj.unipts.has_batch_stats(sparse):
    sparse = fj.unipts.recalibrate_batch_stats(model.apply, sparse, x)
  return jax.device_get(sparse), r.masks, report
