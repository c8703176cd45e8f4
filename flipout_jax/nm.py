"""N:M structured sparsity along the contraction dimension.

**Pattern.** A kernel is N:M sparse when every *group* of M consecutive
entries along its contraction (input) axis holds at most N nonzeros. Flax
kernels are ``Dense: (in, out)`` and ``Conv: (kh, kw, in, out)``, so the
groups run along axis -2 (``in``), one group per ``in/M`` block and per
output (and spatial) position: the kernel is viewed as
``(..., in/M, M, out)`` and the constraint holds along the ``M`` axis. This
is the layout sparse tensor cores use for ``y = x @ W`` (2:4 on NVIDIA
Ampere+): each output sums, per block of M inputs, at most N products.

**Selection.** :func:`nm_masks` keeps the N highest scores of every group,
exactly, ties broken by position (the lower input index first), NaN ranked
as ``-inf`` and ``-0.0`` below ``+0.0`` (the order of
:func:`flipout_jax.selection.sortable_key`). It is elementwise: M compares
per entry, no sort and no reduction.

**Gradual schedule.** Pruning goes dense → N:M through intermediate
``n_t:M`` patterns. The rule reads the schedule's sparsity ``s`` from the
keep-count the core hands it (``s = 1 − keep_g/size_g`` of the group) and
keeps ``n_t = clip(round((1 − s)·M), N, M)`` entries per group (half to
even). So *any* :class:`flipout_jax.schedules.Schedule` drives it: events
that do not change ``n_t`` keep the masks, ``s >= 1 − N/M`` gives exactly
N:M and a higher ``s`` is clipped to N:M (never sparser).
:func:`nm_schedule` gives the natural one: one event per ``n_t = M−1, …,
N``, evenly spaced from ``start_step`` to ``end_step``. Masks only shrink:
an entry pruned earlier is never revived by a later event.

**Indivisible layers.** A prunable leaf whose axis -2 is not a multiple of M
(or whose ndim < 2) cannot be N:M. By default that is a ``ValueError``
naming the layer (at ``init`` for the constructors here, at the first
traced update for :func:`nm_mask_rule` used directly). With
``skip_incompatible=True`` such layers are *skipped*: their masks are left
unchanged (dense from a dense start) and :func:`check_nm` ignores them.

**Methods.** :func:`nm_magnitude` (gradual magnitude pruning),
:func:`nm_flipout` (FlipOut's saliency and noise) and :func:`nm_dst`
(drop-and-grow inside each group, RigL / DST-EE / SET growth) are
:func:`flipout_jax.core.prune` with :func:`nm_mask_rule` or
:func:`nm_drop_and_grow`. :func:`nm_st3` is :func:`flipout_jax.st3` with
:func:`nm_threshold_rule` as its selection hook: ST-3's soft threshold and
rescale (:func:`flipout_jax.methods.st3.soft_threshold_rescale`) with the
threshold taken per group (the largest pruned magnitude of the group)
instead of globally, and ``n_t`` from ST-3's cubic schedule;
:func:`nm_soft_threshold` is the same computation on one kernel as a pure
function (e.g. to export raw ST-3 weights as N:M).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flipout_jax import core
from flipout_jax import schedules as schedules_lib
from flipout_jax import scores as scores_lib
from flipout_jax import selection
from flipout_jax import trees
from flipout_jax import validate
from flipout_jax.methods import dst as dst_lib
from flipout_jax.methods import flipout as flipout_lib
from flipout_jax.methods import st3 as st3_lib

PyTree = Any

# Largest M: the compact export stores positions within a group as uint8,
# with the value M marking an empty slot.
MAX_M = 255


# ----------------------------------------------------------------------------
# Arguments and shapes.


def _is_int(value) -> bool:
  try:
    validate.integer(value, "value")
  except ValueError:
    return False
  return True


def check_nm_args(n, m) -> tuple[int, int]:
  """Validates ``n`` and ``m``: ints with ``1 <= m <= 255`` and ``0 <= n <= m``.

  Raises:
    ValueError: naming ``n`` or ``m``.
  """
  m = validate.integer(m, "m", low=1, high=MAX_M)
  if not _is_int(n) or not 0 <= n <= m:
    raise ValueError(f"n: must be an int in [0, m={m}] (entries kept per "
                     f"group), got {n!r}.")
  return int(n), m


def check_nm_pattern(n, m) -> tuple[int, int]:
  """``n`` and ``m`` of a pruning method: ``1 <= n < m <= 255`` (``n = 0``
  would prune every weight, ``n = m`` none).

  Raises:
    ValueError: naming ``n`` or ``m``.
  """
  n, m = check_nm_args(n, m)
  if n == 0:
    raise ValueError(f"n: n == 0 prunes every weight; use 1 <= n < m={m}.")
  if n == m:
    raise ValueError(f"n: n == m == {m} prunes nothing; use 1 <= n < m.")
  return n, m


def _check_axis(axis: int, ndim: int, name: str = "axis") -> int:
  if not _is_int(axis) or not -ndim <= axis < ndim:
    raise ValueError(f"{name}: {axis!r} is not an axis of a {ndim}-d array.")
  return axis % ndim


def _check_kernel_args(x: jax.Array, n, m: int, axis: int, name: str):
  """Validates an N:M call on the kernel ``x`` (argument ``name``).

  ``n`` is an int in ``[0, m]`` or a traced count; ``x`` needs ndim >= 2
  and ``x.shape[axis]`` divisible by ``m``. Returns ``(n, axis)`` with the
  axis made non-negative.

  Raises:
    ValueError: naming ``n``, ``m``, ``axis`` or ``name``.
  """
  if _is_int(n):
    n, m = check_nm_args(n, m)
  else:
    check_nm_args(0, m)
  if x.ndim < 2:
    raise ValueError(f"{name}: N:M needs ndim >= 2 (a kernel), got shape "
                     f"{x.shape}.")
  axis = _check_axis(axis, x.ndim)
  if x.shape[axis] % m:
    raise ValueError(f"{name}: axis {axis} has size {x.shape[axis]}, not "
                     f"divisible by m={m}.")
  return n, axis


def nm_compatible(shape, m: int, axis: int = -2) -> bool:
  """Whether a kernel of ``shape`` can be N:M along ``axis`` (default -2).

  True iff ``len(shape) >= 2`` and ``shape[axis]`` is a positive multiple
  of ``m``.
  """
  shape = tuple(shape)
  if len(shape) < 2 or not -len(shape) <= axis < len(shape):
    return False
  size = shape[axis]
  return size > 0 and size % m == 0


def _grouped_shape(shape, m: int, axis: int) -> tuple[int, ...]:
  """``(..., in, ...)`` → ``(..., in/m, m, ...)`` with the group axis at
  ``axis + 1`` (``axis`` non-negative)."""
  return shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:]


class IncompatibleLayerError(ValueError):
  """A prunable layer whose contraction axis is not divisible by M."""


def _incompatible_error(path: str, shape, m: int,
                        axis: int) -> IncompatibleLayerError:
  return IncompatibleLayerError(
      f"params: layer {path!r} with shape {tuple(shape)} cannot be N:M with "
      f"m={m}: its contraction axis {axis} must have a size divisible by m "
      "(and the leaf ndim >= 2). Pass skip_incompatible=True to leave such "
      "layers unchanged, or a filter_fn that excludes them.")


# ----------------------------------------------------------------------------
# Selection within groups.


def _select_in_groups(keys: jax.Array, count: jax.Array, m: int,
                      axis: int) -> jax.Array:
  """Keeps the ``count`` largest keys of each group of ``m`` along ``axis``.

  Args:
    keys: uint32 keys, ``keys.shape[axis] % m == 0``; ``axis`` >= 0.
    count: int32, broadcastable to the grouped shape ``(..., in/m, 1, ...)``
      (a scalar, or one count per group).
    m: the group size.
    axis: the contraction axis (non-negative).

  Returns:
    bool, shaped like ``keys``. Entry i of a group is kept iff its rank
    ``#{j: key_j > key_i} + #{j < i: key_j == key_i}`` is below ``count``.
  """
  shape = keys.shape
  grouped = keys.reshape(_grouped_shape(shape, m, axis))
  g_axis = axis + 1
  position = jax.lax.broadcasted_iota(jnp.int32, grouped.shape, g_axis)
  rank = jnp.zeros(grouped.shape, jnp.int32)
  # M elementwise compares (fused by XLA), no sort and no reduction: for
  # M <= 16 this is a handful of vector ops per entry.
  for j in range(m):
    other = jax.lax.slice_in_dim(grouped, j, j + 1, axis=g_axis)
    beats = (other > grouped) | ((other == grouped) & (j < position))
    rank = rank + beats.astype(jnp.int32)
  return (rank < count).reshape(shape)


def nm_masks(scores: jax.Array, n, m: int, *,
             eligible: jax.Array | None = None, axis: int = -2) -> jax.Array:
  """Keeps the ``n`` highest scores of every group of ``m`` along ``axis``.

  Math: view ``scores`` as ``(..., in/m, m, ...)``; in each group keep the
  entries of rank ``< n``, rank = number of entries with a higher score
  plus those with an equal score at a lower position.

  Args:
    scores: float array, ``ndim >= 2``, ``shape[axis] % m == 0``.
    n: entries kept per group; a Python int in ``[0, m]`` or a traced int32
      (e.g. the current ``n_t`` of a gradual schedule), or an int array
      broadcastable to the grouped shape with a size-1 group axis (one count
      per group).
    m: the group size, an int in ``[1, 255]``.
    eligible: optional bool like ``scores``; ineligible entries (e.g.
      already pruned) are never kept, so a group with fewer than ``n``
      eligible entries keeps just those.
    axis: the contraction axis (default -2, Flax's ``in``).

  Returns:
    bool array like ``scores``: each group holds exactly
    ``min(n, #eligible)`` True entries.

  Raises:
    ValueError: for bad ``n``/``m``/``axis`` or an indivisible axis.
  """
  scores = jnp.asarray(scores)
  n, axis = _check_kernel_args(scores, n, m, axis, "scores")
  if eligible is not None and jnp.shape(eligible) != scores.shape:
    raise ValueError(f"eligible: shape {jnp.shape(eligible)} differs from "
                     f"scores {scores.shape}.")
  return _nm_masks(scores, jnp.asarray(n, jnp.int32), eligible, m, axis)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _nm_masks(scores, n, eligible, m, axis):
  # Jitted so that eager calls (export, checks, tests) run as one program
  # instead of ~4·M dispatched ops.
  keys = selection.sortable_key(scores)
  if eligible is None:
    return _select_in_groups(keys, n, m, axis)
  # Ineligible entries get key 0, below every real key (>= 0x007FFFFF), so
  # they rank last; the final `& eligible` drops those a group with fewer
  # than n eligible entries would otherwise keep.
  keys = jnp.where(eligible, keys, jnp.uint32(0))
  return _select_in_groups(keys, n, m, axis) & eligible


def nm_group_counts(x: jax.Array, m: int, axis: int = -2) -> jax.Array:
  """Nonzeros (or True entries) of every group: int32 ``(..., in/m, ...)``."""
  x = jnp.asarray(x)
  axis = _check_axis(axis, x.ndim)
  nonzero = x if x.dtype == jnp.bool_ else x != 0
  return jnp.sum(nonzero.reshape(_grouped_shape(x.shape, m, axis)),
                 axis=axis + 1, dtype=jnp.int32)


# ----------------------------------------------------------------------------
# Verification.


def _nm_filter(path: str, leaf) -> bool:
  """Default leaves checked: float or bool arrays with ndim >= 2."""
  del path
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    return False
  return len(leaf.shape) >= 2 and (jnp.issubdtype(leaf.dtype, jnp.floating)
                                   or leaf.dtype == jnp.bool_)


def nm_violations(tree: PyTree, n: int, m: int, *,
                  skip_incompatible: bool = False,
                  filter_fn: trees.FilterFn | None = None,
                  axis: int = -2) -> dict[str, int]:
  """Number of groups with more than ``n`` nonzeros, per checked leaf.

  Args:
    tree: params (nonzero = value != 0) or a mask tree (nonzero = True;
      ``None`` leaves are skipped).
    n, m: the pattern.
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
  n, m = check_nm_args(n, m)
  filter_fn = _nm_filter if filter_fn is None else filter_fn
  out = {}
  for path, leaf in trees.leaves_with_paths(tree):
    if not filter_fn(path, leaf):
      continue
    if not nm_compatible(leaf.shape, m, axis):
      if skip_incompatible:
        continue
      raise _incompatible_error(path, leaf.shape, m, axis)
    counts = np.asarray(nm_group_counts(leaf, m, axis))
    out[path] = int(np.sum(counts > n))
  return out


def check_nm(tree: PyTree, n: int, m: int, *, skip_incompatible: bool = False,
             filter_fn: trees.FilterFn | None = None, axis: int = -2) -> bool:
  """True iff every group of M along ``axis`` holds at most N nonzeros.

  Checks the leaves :func:`nm_violations` checks (arguments as there; host
  side, not jittable).
  """
  return all(v == 0 for v in nm_violations(
      tree, n, m, skip_incompatible=skip_incompatible, filter_fn=filter_fn,
      axis=axis).values())


# ----------------------------------------------------------------------------
# Schedule and mask rule.


def nm_schedule(n: int, m: int, *, start_step: int = 0,
                end_step: int | None = None) -> schedules_lib.Schedule:
  """Dense → N:M in ``M − N`` events, one per ``n_t = M−1, M−2, …, N``.

  Event i (of ``c = M − N``) is at ``start_step + round(i·(end_step −
  start_step)/(c − 1))`` with sparsity ``1 − n_t/M`` (with one event, or
  ``end_step=None``, a single event at ``end_step`` or ``start_step``).

  Raises:
    ValueError: for bad ``n``/``m``, ``n == m`` (nothing to prune),
      ``start_step < 0`` or ``end_step`` too close to ``start_step`` for
      distinct event steps.
  """
  n, m = check_nm_pattern(n, m)
  start_step = validate.step(start_step, "start_step")
  values = list(range(m - 1, n - 1, -1))
  if end_step is None:  # one-shot, straight to N:M
    return schedules_lib.Schedule((start_step,), (1.0 - n / m,))
  end_step = validate.step(end_step, "end_step")
  if end_step < start_step + len(values) - 1:
    raise ValueError(
        f"end_step: must be an int >= start_step + {len(values) - 1} "
        f"({len(values)} events n_t = {m - 1}..{n}), got {end_step!r}.")
  if len(values) == 1:
    return schedules_lib.Schedule((int(end_step),), (1.0 - n / m,))
  span = end_step - start_step
  steps = tuple(int(start_step + round(i * span / (len(values) - 1)))
                for i in range(len(values)))
  return schedules_lib.Schedule(steps, tuple(1.0 - v / m for v in values))


def n_for_density(density: jax.Array, n: int, m: int) -> jax.Array:
  """``clip(round(density·M), N, M)`` as int32: entries kept per group."""
  t = jnp.round(jnp.asarray(density, jnp.float32) * jnp.float32(m))
  return jnp.clip(t, n, m).astype(jnp.int32)


def _prunable_info(masks: PyTree, m: int, axis: int, skip_incompatible: bool):
  """Paths, shapes and N:M eligibility of the prunable leaves (static)."""
  flat = trees.leaves_with_paths(masks)
  info = []
  for path, leaf in flat:
    ok = nm_compatible(leaf.shape, m, axis)
    if not ok and not skip_incompatible:
      raise _incompatible_error(path, leaf.shape, m, axis)
    info.append((path, tuple(leaf.shape), ok))
  return info


def nm_mask_rule(n: int, m: int, *, skip_incompatible: bool = False,
                 axis: int = -2) -> core.MaskRule:
  """A :data:`flipout_jax.core.MaskRule` that prunes to ``n_t:M`` per event.

  On an event, group g of the core's budget keeps ``keep[g]`` of its
  ``size_g`` weights; the rule turns that density into
  ``n_t = clip(round(M·keep[g]/size_g), N, M)`` and, in every N:M-compatible
  tensor of the group, keeps the ``n_t`` highest-scoring *alive* weights of
  each group of M along ``axis`` (:func:`nm_masks` with ``eligible =`` the
  current mask: masks only shrink). Use ``distribution="uniform"`` or
  ``"global"`` in ``core.prune`` so every layer sees the schedule's density.

  Args:
    n, m: the final pattern (e.g. 2, 4).
    skip_incompatible: leave layers whose ``axis`` is not divisible by ``m``
      unchanged instead of raising.
    axis: the contraction axis (default -2).

  Returns:
    ``rule(ctx, scores, groups, keep) -> MaskUpdate`` (nothing restarts).

  Raises:
    ValueError: for bad ``n``/``m`` here; at trace time, naming the layer,
      for an indivisible prunable layer without ``skip_incompatible``.
  """
  n, m = check_nm_args(n, m)

  def rule(ctx: scores_lib.ScoreContext, scores: PyTree, groups, keep):
    masks = ctx.masks
    info = _prunable_info(masks, m, axis, skip_incompatible)
    mask_l = trees.prunable_leaves(masks, masks)
    score_l = trees.prunable_leaves(masks, scores)
    new = list(mask_l)
    for g, members in enumerate(groups):
      size = sum(math.prod(info[i][1]) for i in members)
      density = keep[g].astype(jnp.float32) / jnp.float32(max(size, 1))
      n_t = n_for_density(density, n, m)
      for i in members:
        if info[i][2]:
          new[i] = nm_masks(jnp.asarray(score_l[i], jnp.float32), n_t, m,
                            eligible=mask_l[i], axis=axis)
    return core.MaskUpdate(trees.unflatten_prunable(masks, new))

  return rule


def _validating(tx: optax.GradientTransformationExtraArgs, m: int, axis: int,
                skip_incompatible: bool, filter_fn) -> optax.GradientTransformationExtraArgs:
  """Checks the layers' N:M compatibility at ``init`` (not first update)."""
  if not _is_int(axis):
    raise ValueError(f"axis: must be an int (the contraction axis), got "
                     f"{axis!r}.")
  validate.boolean(skip_incompatible, "skip_incompatible")

  def init_fn(params):
    prunable = trees.prunable_tree(params, filter_fn)
    _prunable_info(trees.mask_like(params, prunable), m, axis,
                   skip_incompatible)
    return tx.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, tx.update)


def _nm_schedule_arg(n, m, schedule, start_step, end_step):
  if schedule is not None:
    if end_step is not None:
      raise ValueError("schedule: give either schedule or start_step/end_step.")
    return schedules_lib.as_schedule(schedule)
  return nm_schedule(n, m, start_step=start_step, end_step=end_step)


# ----------------------------------------------------------------------------
# Constructors.


def nm_magnitude(inner: optax.GradientTransformation, *, n: int, m: int,
                 start_step: int = 0, end_step: int | None = None,
                 schedule: schedules_lib.Schedule | None = None,
                 skip_incompatible: bool = False,
                 filter_fn: trees.FilterFn | None = None, axis: int = -2,
                 seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Gradual N:M magnitude pruning (e.g. 2:4) as an optax transformation.

  :func:`flipout_jax.core.prune` with score ``|θ|`` and
  :func:`nm_mask_rule`: on each event, every group of M weights along the
  contraction axis keeps its ``n_t`` largest-magnitude alive weights; pruned
  weights land on exactly 0.0 and get no gradient.

  Args:
    inner: the optimizer to wrap.
    n, m: the final pattern, ``0 <= n < m <= 255``.
    start_step, end_step: the default schedule, :func:`nm_schedule` (one
      event per ``n_t = M−1..N`` from ``start_step`` to ``end_step``; with
      ``end_step=None`` one-shot N:M at ``start_step``).
    schedule: any schedule instead (its sparsity s maps to
      ``n_t = clip(round((1−s)·M), N, M)``); excludes ``end_step``.
    skip_incompatible: leave layers with indivisible contraction axis dense
      instead of raising at ``init``.
    filter_fn: which leaves are prunable (default: float leaves, ndim >= 2).
    axis: the contraction axis (default -2: Flax Dense/Conv ``in``).
    seed: PRNG seed kept in the state (unused by magnitude pruning).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state: a ``PruneState``;
    ``flipout_jax.get_masks`` gives the masks).

  Raises:
    ValueError: for bad arguments, or at ``init`` for an indivisible layer
      (named) without ``skip_incompatible``.
  """
  n, m = check_nm_pattern(n, m)
  tx = core.prune(
      inner, score_fn=scores_lib.magnitude,
      schedule=_nm_schedule_arg(n, m, schedule, start_step, end_step),
      mask_rule=nm_mask_rule(n, m, skip_incompatible=skip_incompatible,
                             axis=axis),
      distribution="uniform", filter_fn=filter_fn, seed=seed,
      name="nm_magnitude")
  return _validating(tx, m, axis, skip_incompatible, filter_fn)


def nm_flipout(inner: optax.GradientTransformation, *, n: int, m: int,
               start_step: int = 0, end_step: int | None = None,
               schedule: schedules_lib.Schedule | None = None, p: float = 2.0,
               noise_scale: float = 1.0, noise_on: str = "all",
               skip_incompatible: bool = False,
               filter_fn: trees.FilterFn | None = None, axis: int = -2,
               seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """FlipOut's saliency ``|θ|^p/(flips + 1)`` and gradient noise, pruning
  to N:M (schedule and arguments as :func:`nm_magnitude`; ``p``,
  ``noise_scale``, ``noise_on`` as :func:`flipout_jax.flipout`)."""
  n, m = check_nm_pattern(n, m)
  p = validate.number(p, "p", low=0, low_open=True, traceable=True)
  tx = core.prune(
      inner, score_fn=scores_lib.flipout_saliency(p),
      schedule=_nm_schedule_arg(n, m, schedule, start_step, end_step),
      mask_rule=nm_mask_rule(n, m, skip_incompatible=skip_incompatible,
                             axis=axis),
      distribution="uniform", noise_scale=noise_scale, noise_on=noise_on,
      tracker=flipout_lib.flip_counter(), filter_fn=filter_fn, seed=seed,
      name="nm_flipout")
  return _validating(tx, m, axis, skip_incompatible, filter_fn)


def random_nm_masks(n: int, m: int, *, skip_incompatible: bool = False,
                    axis: int = -2) -> Callable:
  """An ``initial_masks`` function: a uniformly random N:M mask per layer.

  Every group of every compatible prunable layer keeps N entries chosen
  uniformly at random; skipped layers stay dense.
  """
  n, m = check_nm_args(n, m)

  def init(params, dense_masks, key):
    del params
    info = _prunable_info(dense_masks, m, axis, skip_incompatible)
    leaves = trees.prunable_leaves(dense_masks, dense_masks)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for (path, shape, ok), leaf, k in zip(info, leaves, keys):
      del path
      out.append(nm_masks(jax.random.uniform(k, shape), n, m, axis=axis)
                 if ok else leaf)
    return trees.unflatten_prunable(dense_masks, out)

  return init


def nm_drop_and_grow(n: int, m: int, drop_fraction: float, end_step: int, *,
                     skip_incompatible: bool = False,
                     axis: int = -2) -> core.MaskRule:
  """DST's drop-and-grow that keeps every group at exactly N of M.

  Per N:M layer with ``a`` active weights: drop the ``⌊d_t·a⌋`` active
  weights of smallest ``|θ|`` in the layer (exact, ties by position), with
  DST's cosine fraction ``d_t``; then every group of M regrows as many
  weights as it lost, those of highest grow score among its weights
  inactive after the drop (just-dropped ones included). Skipped layers keep
  their masks. Assumes every group starts with N active weights (e.g.
  :func:`random_nm_masks`).
  """
  n, m = check_nm_args(n, m)

  def rule(ctx: scores_lib.ScoreContext, grow_scores, groups, keep):
    del groups, keep  # N:M fixes the count of every group
    masks = ctx.masks
    info = _prunable_info(masks, m, axis, skip_incompatible)
    alive = trees.prunable_leaves(masks, masks)
    params = trees.prunable_leaves(masks, ctx.params)
    grow = trees.prunable_leaves(masks, grow_scores)
    fraction = dst_lib.cosine_drop_fraction(ctx.step, drop_fraction, end_step)
    layers = [i for i, (_, _, ok) in enumerate(info) if ok]
    new = list(alive)
    restart = [jnp.zeros_like(a, dtype=jnp.bool_) for a in alive]
    if not layers:
      return core.MaskUpdate(masks, trees.unflatten_prunable(masks, restart))
    active = jnp.stack([jnp.sum(alive[i], dtype=jnp.int32) for i in layers])
    drop = dst_lib.num_to_drop(active, fraction)
    # One exact top-k call for all layers (one group each): keep the
    # active − drop largest |θ| among the active weights of every layer.
    kept = selection.top_k_masks(
        [jnp.abs(params[i].astype(jnp.float32)) for i in layers],
        [[j] for j in range(len(layers))], active - drop,
        [alive[i] for i in layers])
    for i, kept_i in zip(layers, kept):
      ax = axis % len(info[i][1])
      lost = n - jnp.expand_dims(nm_group_counts(kept_i, m, ax), ax + 1)
      # Kept entries get key 0, below every real key (sortable_key >=
      # 0x007FFFFF), so the `lost` best of each group are all inactive ones.
      keys = jnp.where(kept_i, jnp.uint32(0), selection.sortable_key(
          jnp.asarray(grow[i], jnp.float32)))
      grown = _select_in_groups(keys, jnp.maximum(lost, 0), m, ax) & ~kept_i
      new[i] = kept_i | grown
      restart[i] = grown & alive[i]  # dropped and grown back: restart at 0
    return core.MaskUpdate(trees.unflatten_prunable(masks, new),
                           trees.unflatten_prunable(masks, restart))

  return rule


def nm_dst(inner: optax.GradientTransformation, *, n: int, m: int,
           update_every: int, end_step: int, grow: str = "rigl",
           drop_fraction: float | None = None,
           exploration: float = dst_lib.DEFAULT_EXPLORATION,
           epsilon: float = 1.0, skip_incompatible: bool = False,
           filter_fn: trees.FilterFn | None = None, axis: int = -2,
           seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Dynamic sparse training at a constant N:M pattern.

  A random N:M start (:func:`random_nm_masks`), then every ``update_every``
  steps before ``end_step`` :func:`nm_drop_and_grow` with the grow score of
  ``grow`` (``"rigl"`` |g|, ``"dst_ee"`` |g| + c·ln(t+1)/(N_i + ε),
  ``"random"`` SET); grown weights start at 0.0 with zeroed moments.
  Arguments as :func:`flipout_jax.dst` plus ``n, m, skip_incompatible,
  axis``.
  """
  n, m = check_nm_pattern(n, m)
  grow = validate.choice(grow, "grow", dst_lib.GROW)
  drop_fraction = dst_lib.check_drop_fraction(drop_fraction, grow)
  if grow == "dst_ee":
    score_fn = dst_lib.dst_ee_score(exploration, epsilon)
    tracker = dst_lib.coverage_counter()
  elif grow == "rigl":
    score_fn, tracker = dst_lib.rigl_score, None
  else:
    score_fn, tracker = scores_lib.random, None
  tx = core.prune(
      inner, score_fn=score_fn,
      schedule=dst_lib.dst_schedule(1.0 - n / m, update_every, end_step),
      mask_rule=nm_drop_and_grow(n, m, drop_fraction, end_step,
                                 skip_incompatible=skip_incompatible,
                                 axis=axis),
      distribution="uniform", tracker=tracker, reset_moments="grown",
      filter_fn=filter_fn,
      initial_masks=random_nm_masks(n, m, skip_incompatible=skip_incompatible,
                                    axis=axis),
      seed=seed, name=f"nm_{grow}")
  return _validating(tx, m, axis, skip_incompatible, filter_fn)


# ----------------------------------------------------------------------------
# ST-3 with a per-group threshold.


def _compact_group_shape(shape, m: int, axis: int) -> tuple[int, ...]:
  """``(..., in, ...)`` → ``(..., in/m, ...)``: one entry per group."""
  return shape[:axis] + (shape[axis] // m,) + shape[axis + 1:]


def _nm_group_threshold(w: jax.Array, n, m: int, axis: int):
  """N:M selection of one kernel for ST-3 (``axis`` non-negative).

  Returns:
    ``(mask, tau, tau_groups)``: :func:`nm_masks` of ``|w|`` with ``n``
    kept per group; float32 ``τ_g`` (the group's largest pruned magnitude,
    0 if it prunes nothing) broadcast to ``w.shape``; and ``τ_g`` per group,
    float32 ``(..., in/m, ...)``.
  """
  a = jax.lax.stop_gradient(jnp.abs(w).astype(jnp.float32))
  mask = nm_masks(a, n, m, axis=axis)
  grouped = jnp.where(mask, -jnp.inf, a).reshape(
      _grouped_shape(w.shape, m, axis))
  tau = jnp.maximum(jnp.max(grouped, axis=axis + 1, keepdims=True), 0.0)
  full = jnp.broadcast_to(tau, grouped.shape).reshape(w.shape)
  return mask, full, jnp.squeeze(tau, axis + 1)


def nm_threshold_rule(n: int, m: int, *, skip_incompatible: bool = False,
                      axis: int = -2):
  """ST-3's selection rule for N:M (a :class:`flipout_jax.methods.st3.ThresholdRule`).

  At sparsity ``s`` every group of M along ``axis`` keeps
  ``n_t = clip(round((1 − s)·M), N, M)`` entries (:func:`n_for_density`),
  those of largest ``|w|`` (:func:`nm_masks`: exact, ties by position), and
  is soft-thresholded by ``τ_g``, its largest pruned magnitude (0 when
  ``n_t = M``). The masks are recomputed from the raw weights at each call
  (not monotone). Skipped (indivisible) layers keep everything with τ = 0,
  i.e. stay dense and unscaled.

  A kept entry can tie with its group's largest pruned magnitude; it is then
  kept by the mask and soft-thresholded to exactly 0 (the pattern holds
  either way). With continuous weights this does not happen in practice.

  Thresholds stored (``ST3State.thresholds``): float32 ``τ_g`` per group,
  shape ``(..., in/M, ...)`` (the kernel's shape with ``axis`` divided by
  M), and float32 ``[]`` (always 0) for a skipped layer.

  Raises:
    ValueError: for bad ``n``/``m``/``axis`` here; at ``init``, naming the
      layer, for an indivisible prunable layer without ``skip_incompatible``.
  """
  n, m = check_nm_args(n, m)
  if not _is_int(axis):
    raise ValueError(f"axis: must be an int (the contraction axis), got "
                     f"{axis!r}.")
  validate.boolean(skip_incompatible, "skip_incompatible")

  def leaf_axis(shape):
    """The non-negative axis of a compatible leaf, else None (skipped)."""
    if len(shape) >= 2:
      ax = _check_axis(axis, len(shape))
      if nm_compatible(shape, m, ax):
        return ax
    return None

  def init(leaves):
    out = []
    for path, leaf in leaves:
      shape = tuple(leaf.shape)
      ax = leaf_axis(shape)
      if ax is None:
        if not skip_incompatible:
          raise _incompatible_error(path, shape, m, axis)
        out.append(jnp.zeros([], jnp.float32))
      else:
        out.append(jnp.zeros(_compact_group_shape(shape, m, ax), jnp.float32))
    return out

  def select(raw, sparsity):
    n_t = n_for_density(1.0 - jnp.asarray(sparsity, jnp.float32), n, m)
    masks, taus, thresholds = [], [], []
    for w in raw:
      ax = leaf_axis(tuple(w.shape))
      if ax is None:
        if not skip_incompatible:  # init raised already; direct calls
          raise _incompatible_error("?", w.shape, m, axis)
        masks.append(jnp.ones(w.shape, jnp.bool_))
        taus.append(jnp.zeros([], jnp.float32))
        thresholds.append(jnp.zeros([], jnp.float32))
        continue
      mask, tau, tau_g = _nm_group_threshold(w, n_t, m, ax)
      masks.append(mask)
      taus.append(tau)
      thresholds.append(tau_g)
    return st3_lib.ThresholdSelection(masks, taus, thresholds)

  return st3_lib.ThresholdRule(init, select)


def nm_st3(inner: optax.GradientTransformation, *, n: int, m: int,
           start_step: int, end_step: int, power: float = 3.0,
           rescale: bool = True, freeze_step: int | None = None,
           skip_incompatible: bool = False,
           filter_fn: trees.FilterFn | None = None,
           axis: int = -2) -> optax.GradientTransformationExtraArgs:
  """ST-3 (soft threshold + straight-through) ending at an exact N:M pattern.

  :func:`flipout_jax.st3` with :func:`nm_threshold_rule`: the cubic schedule
  ``s_t`` ramps from 0 (update count ``start_step``) to ``1 − N/M`` (count
  ``end_step``); each update keeps ``n_t = clip(round((1 − s_t)·M), N, M)``
  raw weights of largest magnitude per group of M along ``axis``, soft-
  thresholds them by the group's largest pruned magnitude ``τ_g``, applies
  ST-3's per-output-channel rescale, and hands the model these effective
  weights (pruned entries exactly 0.0). Masks are recomputed from the raw
  weights every update (pruned weights get the straight-through gradient and
  can come back), so the pattern moves during training but every update
  from count ``end_step`` on is exactly N:M (every group holds N kept
  entries: :func:`check_nm` holds on the params and on the masks).

  Args:
    inner: the optimizer of the raw weights (weight decay inside it).
    n, m: the final pattern, ``1 <= n < m <= 255`` (e.g. 2, 4).
    start_step, end_step: the ramp, ``0 <= start_step < end_step``.
    power: exponent of the ramp (3: cubic).
    rescale: ST-3's per-output-channel rescale.
    freeze_step: None or an int ``> end_step``: from this update count on,
      fine-tune under the N:M masks of update ``freeze_step − 1`` (see
      :func:`flipout_jax.st3`).
    skip_incompatible: leave layers whose ``axis`` is not divisible by ``m``
      (or ``ndim < 2``) dense instead of raising at ``init``.
    filter_fn: which leaves are prunable (default: float leaves, ndim >= 2).
    axis: the contraction axis (default -2: Flax Dense/Conv ``in``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    :func:`flipout_jax.st3`'s (``ST3State.thresholds``: float32 ``τ_g`` per
    group, shape ``(..., in/M, ...)``; ``[]`` for skipped layers). Must be
    the last transformation of a chain, as :func:`flipout_jax.st3`.

  Raises:
    ValueError: naming the argument, for bad ``n``/``m`` (``n`` must be in
      ``[1, m)``), steps, ``power`` or ``freeze_step``; at ``init``, naming
      the layer, for an indivisible layer without ``skip_incompatible``.
  """
  n, m = check_nm_pattern(n, m)
  rule = nm_threshold_rule(n, m, skip_incompatible=skip_incompatible,
                           axis=axis)
  return st3_lib.st3(inner, sparsity=1.0 - n / m, start_step=start_step,
                     end_step=end_step, power=power, rescale=rescale,
                     freeze_step=freeze_step, filter_fn=filter_fn,
                     threshold_rule=rule)


def nm_soft_threshold(w: jax.Array, n, m: int, *, rescale: bool = True,
                      axis: int = -2):
  """ST-3's effective weights with an N:M mask and per-group thresholds.

  With ``mask`` = :func:`nm_masks` of ``|w|`` and, per group of M,
  ``τ_g`` = the largest pruned magnitude (0 if ``n == M``)::

      w_soft = sign(w)·max(|w| − τ_g, 0)·mask
      w_eff  = scale_c·w_soft   (ST-3's per-output-channel rescale)

  The selection of one :func:`nm_st3` update (:func:`nm_threshold_rule`)
  followed by :func:`flipout_jax.methods.st3.soft_threshold_rescale`, the
  same math as ST-3's global rule with the global τ replaced by the
  group's: ``w_eff`` is continuous in ``w`` and exactly 0 where pruned.

  Args:
    w: a kernel (ndim >= 2, ``shape[axis] % m == 0``).
    n: entries kept per group (int or traced int32).
    m: group size.
    rescale: apply ``scale_c = 1.01/(r_c + 0.01)``, ``r_c`` the kept share
      of channel c's mean magnitude (1 where a channel lost nothing).
    axis: the contraction axis.

  Returns:
    ``(effective, mask, tau, scale)``: effective weights (``w.dtype``), the
    bool mask, float32 ``τ_g`` broadcast to ``w.shape`` and float32 scales
    ``[out]``.

  Raises:
    ValueError: for bad ``n``/``m``/``axis`` or an indivisible axis.
  """
  w = jnp.asarray(w)
  n, ax = _check_kernel_args(w, n, m, axis, "w")
  mask, tau, _ = _nm_group_threshold(w, n, m, ax)
  eff, scale = st3_lib.soft_threshold_rescale(w, mask, tau, rescale=rescale)
  return eff, mask, tau, scale
