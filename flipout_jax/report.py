"""Sparsity reports and the exact-zero check.

:func:`sparsity_report` counts, per prunable layer, the weights its mask
prunes *and* the zeros actually present in the params, so that a broken
promise shows: a pruned weight that is not exactly 0.0 (e.g. a transformation
chained *after* the pruning one rescaled its update), a non-finite weight, or
a layer with no weight left. :func:`check_sparse` raises on the first two; a
test or a training loop can call it.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flipout_jax import core
from flipout_jax import structure as structure_lib
from flipout_jax import trees
from flipout_jax import validate


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
  """One prunable leaf.

  Attributes:
    path: the leaf's key path, ``"a/b/kernel"``.
    shape: its shape.
    size: number of weights.
    zeros: pruned weights (mask False; without masks, value exactly 0).
    value_zeros: weights whose value is exactly 0.0 in the params.
    pruned_nonzero: pruned weights whose value is not 0.0 (NaN included):
      the exact-zero contract is broken there.
    nonfinite: weights (pruned or not) that are NaN or ±inf.
  """
  path: str
  shape: tuple[int, ...]
  size: int
  zeros: int
  value_zeros: int = 0
  pruned_nonzero: int = 0
  nonfinite: int = 0

  @property
  def sparsity(self) -> float:
    return self.zeros / self.size if self.size else 0.0

  @property
  def collapsed(self) -> bool:
    """True if no weight of the layer is left (every output is constant)."""
    return self.size > 0 and self.zeros == self.size

  def problems(self) -> list[str]:
    """The broken promises of this leaf (empty when the contract holds)."""
    out = []
    if self.pruned_nonzero:
      out.append(f"{self.pruned_nonzero:,} pruned weights not 0.0")
    if self.nonfinite:
      out.append(f"{self.nonfinite:,} non-finite")
    return out


@dataclasses.dataclass(frozen=True)
class SparsityReport:
  """Sparsity of the prunable leaves; ``str(report)`` is a Markdown table.

  Attributes:
    layers: one :class:`LayerSparsity` per prunable leaf.
    nonfinite_dense: ``(path, count)`` of the non-prunable float leaves that
      hold NaN or ±inf.
  """
  layers: tuple[LayerSparsity, ...]
  nonfinite_dense: tuple[tuple[str, int], ...] = ()

  @property
  def size(self) -> int:
    return sum(l.size for l in self.layers)

  @property
  def zeros(self) -> int:
    return sum(l.zeros for l in self.layers)

  @property
  def sparsity(self) -> float:
    """Global sparsity over all prunable weights."""
    return self.zeros / self.size if self.size else 0.0

  @property
  def value_zeros(self) -> int:
    return sum(l.value_zeros for l in self.layers)

  @property
  def pruned_nonzero(self) -> int:
    return sum(l.pruned_nonzero for l in self.layers)

  @property
  def nonfinite(self) -> int:
    return (sum(l.nonfinite for l in self.layers)
            + sum(c for _, c in self.nonfinite_dense))

  @property
  def collapsed(self) -> tuple[str, ...]:
    """Paths of the layers with no weight left."""
    return tuple(l.path for l in self.layers if l.collapsed)

  @property
  def ok(self) -> bool:
    """Every pruned weight is exactly 0.0 and every weight is finite."""
    return self.pruned_nonzero == 0 and self.nonfinite == 0

  def as_dict(self) -> dict[str, float]:
    """``{path: sparsity}`` per layer."""
    return {l.path: l.sparsity for l in self.layers}

  def problems(self) -> list[str]:
    """One line per broken promise: ``"<path>: <what>"``."""
    out = [f"{l.path}: {', '.join(l.problems())}"
           for l in self.layers if l.problems()]
    out += [f"{path}: {count:,} non-finite" for path, count in self.nonfinite_dense]
    return out

  def __str__(self) -> str:
    rows = ["| layer | shape | weights | pruned | zeros in params | sparsity | notes |",
            "|---|---|---:|---:|---:|---:|---|"]
    for l in self.layers:
      notes = "; ".join(f"**{p}**" for p in
                        l.problems() + (["collapsed"] if l.collapsed else []))
      rows.append(f"| {l.path} | {'x'.join(map(str, l.shape))} | {l.size:,} | "
                  f"{l.zeros:,} | {l.value_zeros:,} | "
                  f"{100 * l.sparsity:.2f}% | {notes} |")
    rows.append(f"| **global** | | {self.size:,} | {self.zeros:,} | "
                f"{self.value_zeros:,} | {100 * self.sparsity:.2f}% | |")
    lines = "\n".join(rows)
    if not self.ok:
      lines += ("\n\n**WARNING: the exact-zero contract is broken**: "
                + "; ".join(self.problems()))
    if self.collapsed:
      lines += (f"\n\n**WARNING: {len(self.collapsed)} collapsed layer(s)** "
                f"(no weight left): {', '.join(self.collapsed)}")
    return lines


class SparsityError(ValueError):
  """A pruned weight is not exactly 0.0, or a weight is not finite."""


@jax.jit
def _leaf_counts(params, masks):
  """Per leaf (mask layout, int32 [4]): pruned, value zeros, pruned nonzero,
  non-finite; computed where the params live, so only counts travel."""
  def one(m, p):
    pruned = ~m
    return jnp.stack([
        jnp.sum(pruned, dtype=jnp.int32),
        jnp.sum(p == 0, dtype=jnp.int32),
        jnp.sum(pruned & (p != 0), dtype=jnp.int32),  # NaN != 0 is True.
        jnp.sum(~jnp.isfinite(p), dtype=jnp.int32)])
  return trees.map_prunable(one, masks, params)


@jax.jit
def _nonfinite_counts(params):
  return jax.tree.map(
      lambda p: (jnp.sum(~jnp.isfinite(p), dtype=jnp.int32)
                 if jnp.issubdtype(p.dtype, jnp.inexact) else None), params)


def sparsity_report(params: Any, masks: Any = None,
                    filter_fn=None) -> SparsityReport:
  """Counts pruned weights per prunable layer and globally.

  Beside the mask counts, the report counts the zeros actually present in the
  params, the pruned weights that are not exactly 0.0 and the non-finite
  weights, and marks collapsed layers (no weight left); ``str(report)`` says
  so loudly, and a broken contract or a collapsed layer also raises a
  ``UserWarning``.

  Args:
    params: the params pytree (Flax NNX ``nnx.State`` and Variables are
      unwrapped; ``None`` leaves are skipped).
    masks: a mask tree (e.g. ``fj.get_masks(state)``); a weight is pruned
      where its mask is False. Without masks, a prunable weight is pruned
      where it is exactly 0.0 and ``filter_fn`` decides what is prunable.
    filter_fn: used only without masks (default: float leaves, ndim >= 2).

  Returns:
    A :class:`SparsityReport`.
  """
  params = trees.user_view(params)
  if masks is None:
    prunable = trees.prunable_tree(params, filter_fn)
    masks = jax.tree.map(lambda p, s: jnp.asarray(p) != 0 if s else None,
                         params, prunable)
  else:
    masks = trees.user_view(masks)
    trees.check_same_structure(params, masks, what="sparsity_report",
                               prefix=True)
  counts = jax.device_get(_leaf_counts(params, masks))
  layers = []
  for (path, m), c in zip(trees.leaves_with_paths(masks),
                          trees.prunable_leaves(masks, counts)):
    pruned, value_zeros, pruned_nonzero, nonfinite = (int(x) for x in c)
    layers.append(LayerSparsity(path, tuple(m.shape), int(np.prod(m.shape)),
                                pruned, value_zeros, pruned_nonzero, nonfinite))
  # The params outside the masks (a None mask may cover a whole subtree).
  dense = jax.tree.map(lambda m, p: p if m is None else None, masks, params,
                       is_leaf=lambda x: x is None)
  nonfinite = jax.device_get(_nonfinite_counts(dense))
  dense_bad = tuple((path, int(c)) for path, c in trees.leaves_with_paths(nonfinite)
                    if int(c))
  report = SparsityReport(tuple(layers), dense_bad)
  if not report.ok:
    warnings.warn("sparsity_report: the exact-zero contract is broken: "
                  + "; ".join(report.problems()), stacklevel=2)
  if report.collapsed:
    warnings.warn(
        f"sparsity_report: {', '.join(report.collapsed)}: no weight left "
        "(collapsed layers, constant outputs). A global ranking can do this "
        "with tied or all-zero scores; see distribution='uniform' / 'erk'.",
        stacklevel=2)
  return report


def check_sparse(params: Any, state_or_masks: Any, *,
                 allow_nonfinite: bool = False) -> SparsityReport:
  """Raises unless every pruned weight is exactly 0.0 (and every weight finite).

  Cheap enough for a training loop: the counts are computed on the devices
  holding the params; only one int per leaf comes back.

  Args:
    params: the params pytree (as passed to ``tx.update``).
    state_or_masks: an optimizer state holding a flipout_jax transformation
      (anywhere inside a chain, partition or ``nnx.Optimizer``), or masks.
    allow_nonfinite: do not raise for NaN/inf weights (still reported).

  Returns:
    The :class:`SparsityReport`, if the contract holds.

  Raises:
    SparsityError: naming each leaf path with its count of pruned weights
      that are not 0.0 and of non-finite weights.
  """
  allow_nonfinite = validate.boolean(allow_nonfinite, "allow_nonfinite")
  masks = state_or_masks
  if core.find_prune_states(state_or_masks):
    masks = core.get_masks(state_or_masks)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    report = sparsity_report(params, masks)
  broken = report.pruned_nonzero or (report.nonfinite and not allow_nonfinite)
  if broken:
    hints = []
    if report.pruned_nonzero:
      hints.append("a transformation chained after the pruning one (e.g. "
                   "scale_by_learning_rate or a clip) rescales its updates: "
                   "put it inside the wrapped optimizer; an optimizer that "
                   "keeps its own copy of the weights outside the pruning "
                   "state (optax.lookahead) is not supported")
    if report.nonfinite:
      hints.append("for non-finite weights, wrap the optimizer in "
                   "optax.apply_if_finite")
    raise SparsityError(
        "check_sparse: the exact-zero contract is broken: "
        + "; ".join(report.problems()) + ". Hint: " + "; ".join(hints) + ".")
  return report


# ----------------------------------------------------------------------------
# N:M verification.


def _nm_filter(path: str, leaf) -> bool:
  """Default leaves checked: float or bool arrays with ndim >= 2."""
  del path
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    return False
  return len(leaf.shape) >= 2 and (jnp.issubdtype(leaf.dtype, jnp.floating)
                                   or leaf.dtype == jnp.bool_)


def nm_violations(tree: Any, n: int, m: int, *,
                  skip_incompatible: bool = False,
                  filter_fn: trees.FilterFn | None = None,
                  axis: int = -2) -> dict[str, int]:
  """Number of groups of M along ``axis`` with more than ``n`` nonzeros.

  Args:
    tree: params (nonzero = value != 0) or a mask tree (nonzero = True;
      ``None`` leaves are skipped).
    n, m: the pattern (as :func:`flipout_jax.structure.n_m`).
    skip_incompatible: ignore leaves whose ``axis`` is not divisible by
      ``m``; otherwise they raise.
    filter_fn: ``(path, leaf) -> bool``, which leaves to check (default:
      float or bool leaves with ndim >= 2).
    axis: the contraction axis.

  Returns:
    ``{path: violating groups}`` for every checked leaf (0 = N:M holds).

  Raises:
    ValueError: for bad ``n``/``m`` or, without ``skip_incompatible``, an
      indivisible leaf (named).
  """
  n, m = structure_lib.check_nm_args(n, m)
  filter_fn = _nm_filter if filter_fn is None else filter_fn
  out = {}
  for path, leaf in trees.leaves_with_paths(tree):
    if not filter_fn(path, leaf):
      continue
    if not structure_lib.nm_compatible(leaf.shape, m, axis):
      if skip_incompatible:
        continue
      raise structure_lib.incompatible_layer(path, leaf.shape, m, axis)
    counts = np.asarray(structure_lib.nm_group_counts(leaf, m, axis))
    out[path] = int(np.sum(counts > n))
  return out


def check_nm(tree: Any, n: int, m: int, *, skip_incompatible: bool = False,
             filter_fn: trees.FilterFn | None = None, axis: int = -2) -> bool:
  """True iff every group of M along ``axis`` holds at most N nonzeros.

  Checks the leaves :func:`nm_violations` checks (arguments as there; host
  side, not jittable).
  """
  return all(v == 0 for v in nm_violations(
      tree, n, m, skip_incompatible=skip_incompatible, filter_fn=filter_fn,
      axis=axis).values())
