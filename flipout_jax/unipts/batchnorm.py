"""BatchNorm recalibration on a calibration set, for any Linen-style model.

Pruning shifts every layer's activations, so the dense model's running
statistics no longer fit; UniPTS re-estimates them on the calibration subset
before scoring a candidate (and we do so again after sparse training).

**What is computed.** For every ``batch_stats`` leaf, the statistic of the
whole calibration subset, as seen by the model in training mode on the fixed
batches ``x[0:b], x[b:2b], ...`` (the last one may be smaller):

* ``mean``: ``μ = Σ_k w_k·μ_k`` with ``w_k = |batch k| / n``;
* ``var`` next to a ``mean`` (Flax's ``nn.BatchNorm``): the biased variance
  of the whole subset, ``Σ_k w_k·(σ²_k + (μ_k − μ)²)`` (exact pooling of the
  batch variances, not their plain average);
* any other leaf: ``Σ_k w_k·s_k``.

The result depends on the weights, ``x`` and ``batch_size`` only — not on
the old statistics, nor on the order or momentum of an exponential moving
average — so it is deterministic for a fixed calibration subset. Only
``batch_stats`` changes; ``params`` (and every other collection) are
returned as given.

**How, without knowing the model.** A training-mode call ``apply_fn(
variables, x, train=True, mutable=["batch_stats"])`` returns
``m·old + (1 − m)·s`` for each statistic (``m`` the layer's momentum, ``s``
the batch statistic), and ``s`` does not depend on ``old`` (training mode
normalises with batch statistics). So one probe with ``old = 0`` and one with
``old = 1`` give ``m = new₁ − new₀`` for every entry, and each batch's
``s = new₀/(1 − m)`` with ``old = 0``. Entries that training mode does not
update (``m = 1``) keep their old value. This works for any module whose
running statistics are linear moving averages, which covers ``nn.BatchNorm``.
``apply_fn`` must be deterministic (no dropout RNGs).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from flipout_jax import trees

PyTree = Any
ApplyFn = Callable[..., Any]
_FROZEN_MOMENTUM = 1e-6  # 1 − m below this: the entry is not updated


def has_batch_stats(variables: Mapping[str, Any]) -> bool:
  """Whether ``variables`` hold a BatchNorm ``batch_stats`` collection."""
  return "batch_stats" in variables and bool(
      jax.tree.leaves(variables["batch_stats"]))


def _train_stats(apply_fn: ApplyFn, variables, stats, x) -> PyTree:
  """The ``batch_stats`` a training-mode call on ``x`` returns from ``stats``."""
  v = dict(variables)
  v["batch_stats"] = stats
  _, updated = apply_fn(v, x, train=True, mutable=["batch_stats"])
  return updated["batch_stats"]


def batch_stats_momentum(apply_fn: ApplyFn, variables: Mapping[str, Any],
                         x: jax.Array) -> PyTree:
  """Per-entry moving-average momentum ``m`` of the running statistics.

  Two training-mode calls on ``x`` (any batch; a few examples suffice), from
  all-zero and all-one statistics: ``m = new₁ − new₀``.

  Returns:
    A tree like ``variables["batch_stats"]`` (float32).
  """
  stats = variables["batch_stats"]
  zero = _train_stats(apply_fn, variables,
                      jax.tree.map(jnp.zeros_like, stats), x)
  one = _train_stats(apply_fn, variables,
                     jax.tree.map(jnp.ones_like, stats), x)
  return jax.tree.map(lambda a, b: (b - a).astype(jnp.float32), zero, one)


def _flat_with_paths(tree):
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  keys = [tuple(trees.path_str(p).split("/")) for p, _ in flat]
  return keys, [leaf for _, leaf in flat], treedef


def recalibrate(apply_fn: ApplyFn, variables: Mapping[str, Any], x: jax.Array,
                momentum: PyTree, *, batch_size: int) -> dict:
  """The traceable core of :func:`recalibrate_batch_stats` (``momentum``
  from :func:`batch_stats_momentum`); use inside your own ``jit``."""
  n = x.shape[0]
  full, rest = divmod(n, batch_size)
  old = variables["batch_stats"]
  zeros = jax.tree.map(jnp.zeros_like, old)

  def batch_stat(xb):
    new0 = _train_stats(apply_fn, variables, zeros, xb)
    return jax.tree.map(
        lambda s, m: s.astype(jnp.float32) / jnp.maximum(1.0 - m, _FROZEN_MOMENTUM),
        new0, momentum)

  stats, weights = [], []
  if full:
    xs = x[:full * batch_size].reshape((full, batch_size) + x.shape[1:])
    # scan, not a Python loop: one traced call however many batches.
    _, stacked = jax.lax.scan(lambda c, xb: (c, batch_stat(xb)), None, xs)
    stats.append(stacked)
    weights.append(jnp.full((full,), batch_size / n, jnp.float32))
  if rest:
    stats.append(jax.tree.map(lambda s: s[None], batch_stat(x[full * batch_size:])))
    weights.append(jnp.full((1,), rest / n, jnp.float32))
  stats = jax.tree.map(lambda *s: jnp.concatenate(s, axis=0), *stats)
  w = jnp.concatenate(weights)

  def pooled_mean(s):
    return jnp.tensordot(w, s, axes=1)

  keys, leaves, treedef = _flat_with_paths(stats)
  index = {k: i for i, k in enumerate(keys)}
  means = [pooled_mean(s) for s in leaves]
  out = []
  for k, s, mu in zip(keys, leaves, means):
    sibling = index.get(k[:-1] + ("mean",)) if k and k[-1] == "var" else None
    if sibling is None:
      out.append(mu)
    else:
      mu_k, mu_all = leaves[sibling], means[sibling]
      out.append(pooled_mean(s + jnp.square(mu_k - mu_all[None])))
  pooled = jax.tree.unflatten(treedef, out)
  new = jax.tree.map(
      lambda p, o, m: jnp.where(1.0 - m > _FROZEN_MOMENTUM, p, o).astype(o.dtype),
      pooled, old, momentum)
  result = dict(variables)
  result["batch_stats"] = new
  return result


def recalibrate_batch_stats(apply_fn: ApplyFn, variables: Mapping[str, Any],
                            x, *, batch_size: int = 64,
                            momentum: PyTree | None = None) -> dict:
  """Re-estimates BatchNorm statistics on ``x`` (module docstring for the math).

  Args:
    apply_fn: a Linen-style ``model.apply``, called as ``apply_fn(variables,
      x, train=True, mutable=["batch_stats"])``.
    variables: the model's variables (``params``, ``batch_stats``, ...).
    x: the calibration inputs ``[n, ...]``, ``n >= 1``.
    batch_size: examples per training-mode batch, >= 1 (BatchNorm sees batch
      statistics, so this is part of the result's definition).
    momentum: the moving-average momentum tree (default: probed with
      :func:`batch_stats_momentum` on the first batch).

  Returns:
    A new variables dict: ``batch_stats`` recalibrated, everything else the
    same objects as given. Without ``batch_stats``, ``variables`` unchanged.

  Raises:
    ValueError: for an empty ``x`` or a bad ``batch_size``.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
      or batch_size < 1:
    raise ValueError(f"batch_size: must be an int >= 1, got {batch_size!r}.")
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[0] == 0:
    raise ValueError(f"x: needs at least one example, got shape {x.shape}.")
  if not has_batch_stats(variables):
    return variables
  batch_size = min(int(batch_size), x.shape[0])
  try:
    hash(apply_fn)
    run = functools.partial(_recalibrate_jit, apply_fn)
  except TypeError:  # an unhashable callable: compile for this call only
    run = jax.jit(functools.partial(_recalibrate_stats, apply_fn),
                  static_argnames=("batch_size",))
  result = dict(variables)
  result["batch_stats"] = run(dict(variables), x, momentum,
                              batch_size=batch_size)
  return result


def _recalibrate_stats(apply_fn, variables, x, momentum, *, batch_size):
  if momentum is None:
    momentum = batch_stats_momentum(apply_fn, variables, x[:batch_size])
  return recalibrate(apply_fn, variables, x, momentum,
                     batch_size=batch_size)["batch_stats"]


# Module-level, so repeated calls with the same model (e.g. a model.apply)
# and shapes reuse one compilation.
_recalibrate_jit = jax.jit(_recalibrate_stats,
                           static_argnames=("apply_fn", "batch_size"))


__all__ = ["batch_stats_momentum", "has_batch_stats", "recalibrate",
           "recalibrate_batch_stats"]
