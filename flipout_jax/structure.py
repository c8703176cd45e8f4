"""Sparsity structures: which masks a method may produce, counted in units.

Every method takes ``structure=``, one of:

* :func:`unstructured` (the default): any weight may be pruned; counts are
  in weights.
* :func:`n_m`: N:M along the contraction axis (2:4 for sparse tensor cores):
  every group of M consecutive weights along ``axis`` keeps at most N;
  counts are weights per group.
* :func:`units`: whole output units (neurons of a Dense kernel, filters of
  a Conv kernel: slices along ``axis``, the last by default); counts are in
  units, every layer keeps at least ``min_per_layer`` of them, and the
  classifier's units (``exclude``) stay whole.

A :class:`Structure` owns everything the pattern decides, so that every
method works with every structure:

* which prunable leaves it applies to (:attr:`Structure.layout`: N:M needs a
  divisible axis; ``units`` leaves the output layer whole);
* how a sparsity target becomes counts (:attr:`Structure.budget`), in its
  own units;
* shrinking masks to a count (:attr:`Structure.shrink`), drop-and-grow at a
  constant count (:attr:`Structure.drop_and_grow`) and random masks
  (:attr:`Structure.random`), all exact, ties broken by position.

**Counting convention** (one, for every structure): a group of ``n`` units
at sparsity ``s`` keeps ``n − round(s·n)`` of them (NumPy ``round``: half to
even), see :func:`flipout_jax.distributions.budget`; N:M keeps
``clip(round((1 − s)·M), N, M)`` per group of M, so a schedule's
intermediate targets go dense → ``(M−1):M`` → … → ``N:M`` and a target
above ``1 − N/M`` is clipped to N:M (never sparser).

Scores are per weight (a method's score function); ``units`` reduces them
over each unit (``reduce``: sum, mean, max or L2 norm).

The operations work on the lists of prunable leaves (``trees.prunable_leaves``
order) with a static :class:`Layout`; this module depends on nothing above
:mod:`flipout_jax.selection`.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flipout_jax import distributions as distributions_lib
from flipout_jax import prng
from flipout_jax import selection
from flipout_jax import validate

Leaves = list  # list[jax.Array], one per prunable leaf
# Largest M: the compact export stores positions within a group as uint8,
# with the value M marking an empty slot.
MAX_M = 255
REDUCE = ("sum", "mean", "max", "l2")


class Layout(NamedTuple):
  """The static view a structure takes of a model's prunable leaves.

  Attributes:
    paths: the prunable leaves' paths.
    shapes: their shapes.
    active: per leaf, whether the structure prunes it; an inactive leaf
      (an N:M-incompatible layer skipped, the output layer of ``units``)
      keeps its mask and is in no budget group.
  """
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  active: tuple[bool, ...]


class Structure(NamedTuple):
  """A sparsity pattern: see the module docstring.

  Attributes:
    name: e.g. ``"unstructured"``, ``"2:4"``, ``"units"``.
    kind: ``"unstructured"``, ``"n_m"`` or ``"units"``.
    options: the keyword arguments it was built with (``fj.<kind>(**options)``
      rebuilds it).
    layout: ``(paths, shapes) -> Layout``; raises ValueError naming a layer
      the pattern cannot hold (when it is not skipped).
    budget: ``(distribution, layout, sparsities, final) -> (groups, table)``:
      the groups of leaf indices ranked together and the int32 table
      ``[len(sparsities), num_groups]`` of counts, in the structure's units.
    shrink: ``(layout, masks, scores, groups, keep) -> masks``: keeps the
      ``keep[g]`` best alive units of group g (masks only shrink).
    drop_and_grow: ``(layout, masks, magnitudes, grow_scores, groups, keep,
      fraction) -> (masks, grown)``: drops a ``fraction`` of the alive units
      of least magnitude and grows as many of highest grow score, the count
      of every group conserved; ``grown`` marks the weights alive after the
      event that were not kept through it.
    random: ``(layout, key, groups, keep) -> masks``: uniformly random
      masks with exactly the counts ``keep``.
    threshold: ``(layout, weights, sparsity, *, divisors=None, hint=None)
      -> Threshold``: the selection of a soft-thresholding method (ST-3) at
      a *traced* sparsity, from the magnitudes ``|w|/d``
      (:func:`flipout_jax.selection.magnitude_scores`; ``divisors`` static,
      one per leaf, default 1), every active leaf ranked in one group per
      the structure (unstructured: one global ranking). ``hint``: None or
      the previous selection's ``thresholds`` (a list, in score units),
      which may speed it up but never changes it.
  """
  name: str
  kind: str
  options: dict
  layout: Callable[..., Layout]
  budget: Callable[..., tuple]
  shrink: Callable[..., Leaves]
  drop_and_grow: Callable[..., tuple]
  random: Callable[..., Leaves]
  threshold: Callable[..., "Threshold"]


class Threshold(NamedTuple):
  """A soft-threshold selection (lists matching the leaves).

  Attributes:
    masks: bool like each leaf: the kept entries.
    taus: float32 broadcastable to the leaf, in score units: entry ``e`` is
      soft-thresholded to ``max(score_e − τ_e, 0)`` (a kept entry at exactly
      ``τ_e`` gets 0; a pruned one is 0 anyway). Continuous in the weights:
      an entry reaching the threshold reaches 0.
    thresholds: float32, the compact form a method stores: ``[]`` per leaf
      (one τ), or one τ per group of M for N:M. Shapes are static.
  """
  masks: list
  taus: list
  thresholds: list


def check(structure: Any, name: str = "structure") -> Structure:
  """``structure`` if it is a :class:`Structure` (None: :func:`unstructured`),
  else a ValueError naming ``name``."""
  if structure is None:
    return unstructured()
  if not isinstance(structure, Structure):
    raise ValueError(
        f"{name}: expected a flipout_jax structure (fj.unstructured(), "
        f"fj.n_m(n, m) or fj.units(...)), got {structure!r}.")
  return structure


def num_to_drop(active: jax.Array, fraction: jax.Array) -> jax.Array:
  """``⌊fraction·active⌋`` as int32 (the drop count of drop-and-grow)."""
  return jnp.floor(jnp.asarray(fraction, jnp.float32)
                   * active.astype(jnp.float32)).astype(jnp.int32)


def _group_sums(xs: Sequence[jax.Array], groups) -> jax.Array:
  """int32 ``[num_groups]``: the number of True entries of each group."""
  if not groups:
    return jnp.zeros((0,), jnp.int32)
  return jnp.stack([sum((jnp.sum(xs[i], dtype=jnp.int32) for i in g),
                        jnp.int32(0)) for g in groups])


def _dist_key(distribution):
  return (tuple(sorted(distribution.items()))
          if isinstance(distribution, dict) else distribution)


def _table(budgets) -> tuple:
  groups = budgets[0].groups if budgets else ((),)
  table = (np.stack([b.keep for b in budgets]) if budgets
           else np.zeros((0, max(len(groups), 1))))
  if table.size and table.max() >= 2**31:
    raise ValueError("params: a group holds 2**31 or more weights; counts "
                     "are int32.")
  return groups, table.astype(np.int32)


def _remap(groups, index) -> tuple[tuple[int, ...], ...]:
  """Groups over a sub-list of leaves, as indices into the full list."""
  return tuple(tuple(index[i] for i in g) for g in groups)


@functools.lru_cache(maxsize=128)
def _counted_budget(distribution_key, paths, shapes, sparsities, final):
  """Budgets of ``distributions.budget`` for each target (cached)."""
  distribution = (dict(distribution_key) if isinstance(distribution_key, tuple)
                  else distribution_key)
  return _table([distributions_lib.budget(distribution, paths, shapes, s,
                                          final) for s in sparsities])


# ----------------------------------------------------------------------------
# Unstructured.


def unstructured() -> Structure:
  """Any weight may be pruned; budgets count weights (the default).

  ``distribution`` (``"global"``, ``"uniform"``, ``"erk"`` or ``{path: s}``)
  splits the count over the leaves as in
  :func:`flipout_jax.distributions.budget`; selections are exact top-k over
  each group (:func:`flipout_jax.selection.top_k_masks`).
  """

  def layout(paths, shapes):
    return Layout(tuple(paths), tuple(tuple(s) for s in shapes),
                  (True,) * len(paths))

  def budget(distribution, lay, sparsities, final):
    return _counted_budget(_dist_key(distribution), lay.paths, lay.shapes,
                           tuple(sparsities), final)

  def shrink(lay, masks, scores, groups, keep):
    del lay
    keep = jnp.minimum(jnp.asarray(keep, jnp.int32), _group_sums(masks, groups))
    return selection.top_k_masks(scores, groups, keep, masks)

  def drop_and_grow(lay, masks, magnitudes, grow_scores, groups, keep,
                    fraction):
    del lay, keep  # the count in force is conserved
    active = _group_sums(masks, groups)
    n = num_to_drop(active, fraction)
    kept = selection.top_k_masks(magnitudes, groups, active - n, masks)
    grown = selection.top_k_masks(grow_scores, groups, n, [~k for k in kept])
    return [k | g for k, g in zip(kept, grown)], grown

  def random(lay, key, groups, keep):
    return _random_top_k(key, lay.shapes, groups, keep)

  def threshold(lay, weights, sparsity, *, divisors=None, hint=None):
    del lay
    n = sum(math.prod(x.shape) for x in weights)
    k_pruned = num_pruned(sparsity, n)
    # Exactly k = round(sN) pruned: the N − k largest scores are kept, ties
    # broken by position; τ is the largest pruned score (the cut, 0 when
    # nothing is pruned). One radix select finds both (the tied positions
    # only when a tie straddles the cut), warm-started by the hint.
    masks, cut = selection.magnitude_top_k(
        weights, [list(range(len(weights)))],
        jnp.reshape(n - k_pruned, (1,)), divisors=divisors,
        hint=None if not hint else selection.sortable_key(
            jnp.reshape(jnp.asarray(hint[0], jnp.float32), (1,))))
    tau = jnp.where(k_pruned == 0, jnp.float32(0.0),
                    selection.key_to_float(cut[0]))
    taus = [tau for _ in weights]
    return Threshold(masks, taus, taus)

  return Structure("unstructured", "unstructured", {}, layout, budget, shrink,
                   drop_and_grow, random, threshold)


def num_pruned(sparsity, n: int) -> jax.Array:
  """``round(s·n)`` as int32 for a traced ``s``: the library's one count
  convention (half to even, as the budgets' NumPy ``round``), here on the
  float32 product (the same count for ``n < 2^24`` unless ``s·n`` lies
  within float32 rounding of a half-integer)."""
  k = jnp.round(jnp.asarray(sparsity, jnp.float32) * jnp.float32(n))
  return jnp.clip(k, 0, n).astype(jnp.int32)


# Bits of a uniform float32 draw's mantissa: ``jax.random.uniform`` maps the
# top 23 of 32 random bits monotonically and one-to-one onto [0, 1), so
# ranking those bits ranks the draws, ties included.
_UNIFORM_BITS = 23
# Entries per row of the random masks' draws (a leaf takes ceil(size/C) rows).
_RANDOM_CHUNK = 1024


def _by_size(leaves, sizes) -> dict[int, list[int]]:
  out: dict[int, list[int]] = {}
  for leaf in leaves:
    out.setdefault(sizes[leaf], []).append(leaf)
  return out


def _chunked_bits(key, num, chunk_leaf, chunk_start, chunk,
                  sizes) -> jax.Array:
  """uint32 ``[num_chunks, chunk]``: row c holds entries ``chunk_start[c] +
  j`` of ``jax.random.bits(split(key, num)[chunk_leaf[c]], (size,))`` (past
  a leaf's end: unused draws; each leaf's rows contiguous).

  With the default partitionable threefry (entry j of a draw is the hash of
  the counter ``(0, j)`` under its key, key i of a split the hash of ``(0,
  i)``) every row's key and every leaf's draw are one
  :func:`flipout_jax.prng.threefry2x32` each over all the counters: two
  fused kernels whatever the shapes. Any other PRNG (or the original
  threefry layout) draws once per leaf size, batched over the leaves of
  that size, and pads the rows with zeros.
  """
  if not prng.hashed(key):
    # One draw per leaf (batched over the leaves of one size), padded to
    # whole rows.
    keys = jax.random.split(key, max(num, 1))
    leaves = list(dict.fromkeys(chunk_leaf.tolist()))
    rows = {}
    for n, members in _by_size(leaves, sizes).items():
      bits = jax.vmap(lambda k, n=n: jax.random.bits(k, (n,), jnp.uint32))(
          keys[np.asarray(members)])
      bits = jnp.pad(bits, ((0, 0), (0, -n % chunk)))
      for j, leaf in enumerate(members):
        rows[leaf] = bits[j].reshape(-1, chunk)
    return jnp.concatenate([rows[leaf] for leaf in leaves])
  if int(np.max(chunk_start, initial=0)) + chunk > 2**32:
    raise ValueError("params: a leaf of 2**32 or more entries.")
  data = prng.key_data(key)
  k1, k2 = prng.threefry2x32(data[..., 0], data[..., 1], jnp.uint32(0),
                             jnp.asarray(chunk_leaf, jnp.uint32))
  count = (jnp.asarray(chunk_start, jnp.uint32)[:, None]
           + jax.lax.broadcasted_iota(jnp.uint32, (len(chunk_leaf), chunk), 1))
  b1, b2 = prng.threefry2x32(k1[:, None], k2[:, None], jnp.uint32(0), count)
  return b1 ^ b2


class _Rows(NamedTuple):
  """The static layout of :func:`_random_top_k`'s draws: every leaf cut into
  rows of ``chunk`` entries, the rows of a group contiguous and in group
  order (then the leaves in no group), so that a group's rows read
  row-major are its draws in tie order."""
  chunk: int
  leaf: np.ndarray   # [rows] the leaf of each row
  start: np.ndarray  # [rows] the row's first position in its leaf
  first: np.ndarray  # [leaves] each leaf's first row
  per: np.ndarray    # [leaves] rows per leaf
  size: np.ndarray   # [leaves] entries per leaf


@functools.lru_cache(maxsize=64)
def _rows(shapes, groups) -> _Rows:
  num = len(shapes)
  sizes = [math.prod(s) for s in shapes]
  grouped = [i for g in groups for i in g]
  order = np.asarray(grouped + [i for i in range(num) if i not in
                                set(grouped)], np.int64)
  chunk = min(_RANDOM_CHUNK, 1 << max(max(sizes, default=1) - 1, 0)
              .bit_length())
  per = np.asarray([-(-n // chunk) for n in sizes], np.int64)
  leaf = np.repeat(order, per[order]) if num else np.zeros((0,), np.int64)
  first = np.zeros((num,), np.int64)
  first[order] = np.concatenate([[0], np.cumsum(per[order])[:-1]])
  start = (np.arange(len(leaf)) - first[leaf]) * chunk
  return _Rows(chunk, leaf.astype(np.int32), start, first, per,
               np.asarray(sizes, np.int64))


def _random_top_k(key, shapes, groups, keep, guard=0) -> list[jax.Array]:
  """Random exact-count masks: each group keeps its ``keep[g]`` highest draws.

  Leaf ``i`` draws ``jax.random.uniform(split(key)[i], shapes[i])``; group
  ``g`` keeps the ``keep[g]`` highest draws of its leaves (concatenated in
  group order, row-major), ties broken by position (earlier first): the
  masks of :func:`flipout_jax.selection.top_k_masks` on those draws.
  ``guard``: each leaf's ``min(guard, size)`` highest draws rank above every
  other draw of the group (``keep`` already counts them).

  Init-only, one compiled program per layout whose kernels do not depend on
  the number of leaves (:func:`_top_k_rows`); ``keep`` may be traced. With
  a concrete key and counts the program returns the rows of every leaf and
  each leaf is cut out of them on the host (NumPy views, then one transfer
  per leaf): a cut inside the program is one more output buffer, fusion
  and copy per leaf (~1 ms of compile each, 0.2 s at 147 leaves). Under a
  trace (``jit`` or ``vmap`` of init) the leaves are cut in the program.
  """
  shapes = tuple(tuple(s) for s in shapes)
  groups = tuple(tuple(g) for g in groups)
  rows = _rows(shapes, groups)
  if isinstance(key, jax.core.Tracer) or isinstance(keep, jax.core.Tracer):
    # Each leaf is cut at a traced offset: XLA:CPU compiles a slice at a
    # constant offset as a kernel of its own (~15 ms each), the same slice
    # at a traced offset once per shape.
    offsets = tuple(np.int32(r) for r in rows.first)
    return _random_top_k_leaves(key, keep, offsets, shapes, groups, guard)
  kept = np.asarray(_random_top_k_rows(key, keep, shapes, groups, guard))
  # (device_put, not jnp.asarray: that compiles a staging program per shape.)
  return [jax.device_put(_leaf_of_rows(kept, rows, i, shape, math.prod(shape)))
          for i, shape in enumerate(shapes)]


def _leaf_of_rows(kept: np.ndarray, rows: _Rows, i: int, shape, size: int):
  """Leaf ``i``'s entries of the host rows ``kept`` (a NumPy view)."""
  return kept[rows.first[i]:rows.first[i] + rows.per[i]].reshape(-1)[
      :size].reshape(shape)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _random_top_k_rows(key, keep, shapes, groups, guard) -> jax.Array:
  """bool ``[rows, C]``: :func:`_random_top_k`'s masks in the layout
  :func:`_rows`."""
  return _kept_rows(key, keep, shapes, groups, guard)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _random_top_k_leaves(key, keep, offsets, shapes, groups, guard):
  """:func:`_random_top_k`'s masks, each cut out of the rows at its traced
  first row ``offsets[i]``."""
  kept = _kept_rows(key, keep, shapes, groups, guard)
  rows = _rows(shapes, groups)
  return [jax.lax.dynamic_slice_in_dim(kept, offsets[i], int(rows.per[i]))
          .reshape(-1)[:math.prod(shape)].reshape(shape)
          for i, shape in enumerate(shapes)]


def _kept_rows(key, keep, shapes, groups, guard) -> jax.Array:
  """The rows of :func:`_random_top_k_rows` (traced)."""
  keep = jnp.asarray(keep, jnp.int32)
  num = len(shapes)
  sizes = [math.prod(s) for s in shapes]
  rows = _rows(shapes, groups)
  chunk = rows.chunk
  # int32 ranks of the draws (the uniform's 23 mantissa bits); -1 past a
  # leaf's end (never kept, never a tie).
  position = (jnp.asarray(rows.start, jnp.int32)[:, None]
              + jax.lax.broadcasted_iota(jnp.int32, (len(rows.leaf), chunk),
                                         1))
  inside = position < jnp.asarray(sizes, jnp.int32)[rows.leaf][:, None]
  draws = jnp.where(inside, jax.lax.shift_right_logical(
      _chunked_bits(key, num, rows.leaf, rows.start, chunk, sizes),
      jnp.uint32(32 - _UNIFORM_BITS)).astype(jnp.int32), -1)
  if guard:
    counts = jnp.asarray([min(guard, n) for n in sizes], jnp.int32)
    guarded = _top_k_rows(draws, rows, tuple((i,) for i in range(num)),
                          counts)
    draws = jnp.where(guarded, jnp.int32(1 << _UNIFORM_BITS), draws)
  return _top_k_rows(draws, rows, groups, keep)


def _top_k_rows(values, rows: _Rows, groups, k) -> jax.Array:
  """bool like ``values`` (int32 ``[rows, C]``, ``>= -1``, in the layout
  ``rows``): each group keeps the ``k[g]`` highest values of its leaves,
  ties by (group order, position); leaves in no group keep nothing.

  Group g keeps ``v > t_g`` and the ties ``v == t_g`` at positions ``p <=
  q_g``, where ``p`` counts the group's entries row-major (its leaves'
  rows are contiguous, in group order), ``t_g`` is the largest t with
  ``#{v >= t} >= k_g`` and ``q_g`` the largest q with ``#{v > t_g} +
  #{v == t_g, p < q} < k_g``. One loop finds both by bisection, ``t`` over
  the 24 bits of the values, then ``q`` over the bits of the positions; its
  body counts ``#{v > a_g or (v == a_g and p < b_g)}`` for every group at
  once: one compare over ``values``, a sum per row and a segment sum per
  group. The loop keeps its candidates per row (each row's group's), so
  that the body is a handful of kernels whatever the number of groups.
  """
  num_groups = len(groups)
  chunk = rows.chunk
  big = np.iinfo(np.int32).max
  leaf_group = np.full((len(rows.per),), num_groups, np.int32)  # none: last
  group_first = np.zeros((num_groups + 1,), np.int64)
  span = 1
  for g, members in enumerate(groups):
    leaf_group[list(members)] = g
    if members:
      group_first[g] = rows.first[members[0]]
      span = max(span, int(sum(rows.per[i] for i in members)) * chunk)
  if span > 2**31:
    raise ValueError("params: a group of 2**31 or more weights (positions "
                     "are int32).")
  row_group = leaf_group[rows.leaf]
  pos_bits = (span - 1).bit_length()
  # An entry's position in its group's row-major order is its row's base
  # plus its column: `p < b` is compared as `column < b - base`.
  base = jnp.asarray((np.arange(len(rows.leaf)) - group_first[row_group])
                     * chunk, jnp.int32)[:, None]
  # (Made where it is read: a loop operand would be a 4-byte-per-entry buffer.)
  column = lambda: jax.lax.broadcasted_iota(jnp.int32, values.shape, 1)
  # Rows of no group: k = big and t = big (never taken: nothing counts,
  # nothing is kept).
  k_row = jnp.concatenate([jnp.asarray(k, jnp.int32), jnp.full((1,), big)]
                          )[row_group][:, None]
  # Counts by runs of `sub` entries (XLA:CPU fuses a reduction of <= 32
  # elements into the compare; a longer one becomes an unfused compare, a
  # reduce-window and a reduce), then a segment sum of the runs per group.
  sub = min(32, chunk)
  runs = chunk // sub
  run_group = jnp.broadcast_to(jnp.asarray(row_group)[:, None],
                               (len(row_group), runs)).reshape(-1)
  group_sum = lambda hit: jax.ops.segment_sum(
      jnp.sum(hit.reshape(-1, sub), axis=1, dtype=jnp.int32), run_group,
      num_segments=num_groups + 1)
  bits = _UNIFORM_BITS + 1  # the guard's 1 << 23 is a value too

  # The loop state: per row, (t, q) of its group, one array so that one
  # kernel updates it. (A fixed trip count: skipping the positions' steps
  # when no count falls inside a tie saved less run time than its check
  # cost to compile.)
  def step_fn(step, st):
    t, q = st[:, 0:1], st[:, 1:2]
    on_t = step < bits
    bit = lambda b: jnp.int32(1) << jnp.clip(b, 0, 30)
    a = jnp.where(on_t, t | bit(bits - 1 - step), t)
    b = jnp.where(on_t, big, q | bit(bits + pos_bits - 1 - step))
    hit = (values > a) | ((values == a) & (column() < b - base))
    c = group_sum(hit)[row_group][:, None]
    return jnp.concatenate([jnp.where(on_t & (c >= k_row), a, t),
                            jnp.where(~on_t & (c < k_row), b, q)], axis=1)

  init = np.stack([np.where(row_group < num_groups, 0, big),
                   np.zeros(len(row_group))], axis=1)
  st = jax.lax.fori_loop(0, bits + pos_bits, step_fn,
                         jnp.asarray(init, jnp.int32))
  # (A group that keeps all its ties, or all its entries, ends with q past
  # its last tie.)
  t, q = st[:, 0:1], st[:, 1:2]
  return (values > t) | ((values == t) & (column() <= q - base))


# ----------------------------------------------------------------------------
# N:M along the contraction axis.


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_nm_args(n, m, *, allow_dense: bool = True) -> tuple[int, int]:
  """``(n, m)`` as ints: ``1 <= m <= 255`` and ``0 <= n <= m`` (``n < m``
  unless ``allow_dense``); ValueError naming the argument otherwise."""
  if not _is_int(m) or not 1 <= m <= MAX_M:
    raise ValueError(f"m: must be an int in [1, {MAX_M}] (the group size), "
                     f"got {m!r}.")
  high = m if allow_dense else m - 1
  if not _is_int(n) or not 0 <= n <= high:
    raise ValueError(f"n: must be an int in [0, {high}] (weights kept per "
                     f"group of m={m}), got {n!r}.")
  return int(n), int(m)


def nm_compatible(shape, m: int, axis: int = -2) -> bool:
  """Whether a leaf of ``shape`` can hold an N:M pattern along ``axis``."""
  shape = tuple(shape)
  if len(shape) < 2 or not -len(shape) <= axis < len(shape):
    return False
  return shape[axis] > 0 and shape[axis] % m == 0


def grouped_shape(shape, m: int, axis: int) -> tuple[int, ...]:
  """``(..., in, ...) -> (..., in/m, m, ...)`` (``axis`` non-negative)."""
  return shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:]


def _select_in_groups(keys: jax.Array, count: jax.Array, m: int,
                      axis: int) -> jax.Array:
  """Keeps the ``count`` largest keys of each group of ``m`` along ``axis``.

  Entry i of a group is kept iff its rank ``#{j: key_j > key_i} + #{j < i:
  key_j == key_i}`` is below ``count`` (an int32 scalar, or one count per
  group broadcastable to the grouped shape). M elementwise compares, no sort
  and no reduction.
  """
  shape = keys.shape
  grouped = keys.reshape(grouped_shape(shape, m, axis))
  g_axis = axis + 1
  position = jax.lax.broadcasted_iota(jnp.int32, grouped.shape, g_axis)
  rank = jnp.zeros(grouped.shape, jnp.int32)
  for j in range(m):
    other = jax.lax.slice_in_dim(grouped, j, j + 1, axis=g_axis)
    beats = (other > grouped) | ((other == grouped) & (j < position))
    rank = rank + beats.astype(jnp.int32)
  return (rank < count).reshape(shape)


def nm_masks(scores: jax.Array, n, m: int, *,
             eligible: jax.Array | None = None, axis: int = -2) -> jax.Array:
  """Keeps the ``n`` highest scores of every group of ``m`` along ``axis``.

  Math: view ``scores`` as ``(..., in/m, m, ...)``; in each group keep the
  entries of rank ``< n``, rank = number of entries with a higher score plus
  those with an equal score at a lower position (NaN lowest, ``-0.0`` below
  ``+0.0``, as :func:`flipout_jax.selection.sortable_key`).

  Args:
    scores: float array, ``ndim >= 2``, ``shape[axis] % m == 0``.
    n: kept per group: an int in ``[0, m]`` or a traced int32.
    m: the group size, an int in ``[1, 255]``.
    eligible: optional bool like ``scores``: ineligible entries are never
      kept (a group with fewer than ``n`` eligible keeps just those).
    axis: the contraction axis (default -2, Flax's ``in``).

  Returns:
    bool like ``scores``: each group holds exactly ``min(n, #eligible)``.
  """
  scores = jnp.asarray(scores)
  if not _is_int(m) or not 1 <= m <= MAX_M:
    raise ValueError(f"m: must be an int in [1, {MAX_M}], got {m!r}.")
  if _is_int(n) and not 0 <= n <= m:
    raise ValueError(f"n: must be an int in [0, {m}], got {n!r}.")
  if not _is_int(axis) or not -scores.ndim <= axis < scores.ndim:
    raise ValueError(f"axis: must be an int in [-{scores.ndim}, "
                     f"{scores.ndim}), got {axis!r}.")
  if not nm_compatible(scores.shape, m, axis):
    raise ValueError(f"scores: shape {scores.shape} has no axis {axis} "
                     f"divisible by m={m} (ndim >= 2 needed).")
  if eligible is not None and jnp.shape(eligible) != scores.shape:
    raise ValueError(f"eligible: shape {jnp.shape(eligible)} differs from "
                     f"scores {scores.shape}.")
  return _nm_masks(scores, jnp.asarray(n, jnp.int32), eligible, m,
                   axis % scores.ndim)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _nm_masks(scores, n, eligible, m, axis):
  keys = selection.sortable_key(jnp.asarray(scores, jnp.float32))
  if eligible is None:
    return _select_in_groups(keys, n, m, axis)
  # Ineligible entries get key 0, below every real key, so they rank last.
  keys = jnp.where(eligible, keys, jnp.uint32(0))
  return _select_in_groups(keys, n, m, axis) & eligible


def nm_group_counts(x: jax.Array, m: int, axis: int = -2) -> jax.Array:
  """int32 nonzeros of each group of ``m`` along ``axis``: ``(..., in/m, ...)``."""
  x = jnp.asarray(x)
  axis = axis % x.ndim
  grouped = (x != 0).reshape(grouped_shape(x.shape, m, axis))
  return jnp.sum(grouped, axis=axis + 1, dtype=jnp.int32)


def n_for_density(density, n: int, m: int) -> jax.Array:
  """``clip(round(density·M), N, M)`` as int32: entries kept per group."""
  t = jnp.round(jnp.asarray(density, jnp.float32) * jnp.float32(m))
  return jnp.clip(t, n, m).astype(jnp.int32)


class IncompatibleLayerError(ValueError):
  """A prunable layer cannot hold the requested N:M pattern."""


def incompatible_layer(path: str, shape, m: int, axis: int) -> IncompatibleLayerError:
  return IncompatibleLayerError(
      f"structure: layer {path!r} of shape {tuple(shape)} cannot be N:M with "
      f"m={m} along axis {axis} (needs ndim >= 2 and shape[{axis}] divisible "
      f"by {m}); pass fj.n_m(..., skip_incompatible=True) to leave it dense, "
      "or exclude it with filter_fn.")


def n_m(n: int, m: int, *, axis: int = -2,
        skip_incompatible: bool = False) -> Structure:
  """N:M sparsity along the contraction axis (e.g. ``fj.n_m(2, 4)``).

  Flax kernels are ``Dense: (in, out)`` and ``Conv: (kh, kw, in, out)``, so
  the groups run along axis -2: every group of M consecutive inputs of an
  output keeps at most N weights (the layout of NVIDIA's 2:4 sparse tensor
  cores for ``y = x @ W``).

  A schedule target ``s`` keeps ``n_t = clip(round((1 − s)·M), N, M)`` per
  group (so the method's ``sparsity`` should be at least ``1 − N/M`` for the
  pattern to be reached; a higher one is clipped to N:M). ``distribution``
  has no effect: every group of M is counted on its own. Drop-and-grow drops ``⌊d·a⌋`` of a layer's ``a`` alive weights
  by magnitude, then every group of M regrows what it lost by grow score.

  Args:
    n, m: the pattern, ``1 <= n < m <= 255``.
    axis: the contraction axis (default -2).
    skip_incompatible: leave layers whose ``axis`` is not divisible by ``m``
      (or with ``ndim < 2``) as they are, instead of a ValueError at
      ``init`` naming the layer.

  Returns:
    A :class:`Structure`.
  """
  n, m = check_nm_args(n, m, allow_dense=False)
  if n == 0:
    raise ValueError(f"n: must be an int in [1, {m - 1}] (n = 0 prunes every "
                     "weight), got 0.")
  if not _is_int(axis):
    raise ValueError(f"axis: must be an int (the contraction axis), got "
                     f"{axis!r}.")
  skip_incompatible = validate.boolean(skip_incompatible, "skip_incompatible")

  def layout(paths, shapes):
    active = []
    for path, shape in zip(paths, shapes):
      ok = nm_compatible(shape, m, axis)
      if not ok and not skip_incompatible:
        raise incompatible_layer(path, shape, m, axis)
      active.append(ok)
    return Layout(tuple(paths), tuple(tuple(s) for s in shapes), tuple(active))

  def budget(distribution, lay, sparsities, final):
    # A schedule without events (e.g. DST whose end comes before its first
    # update) prunes nothing: only a schedule that prunes must reach N:M.
    if sparsities and final is not None and not math.isclose(
        final, 1.0 - n / m, abs_tol=1e-6):
      raise ValueError(
          f"sparsity: with structure n_m({n}, {m}) the final sparsity is "
          f"1 - {n}/{m} = {1.0 - n / m:g}; got {final:g}.")
    del distribution  # every group of M is counted on its own
    groups = tuple((i,) for i, a in enumerate(lay.active) if a)
    row = [int(np.clip(np.round((1.0 - s) * m), n, m)) for s in sparsities]
    table = np.repeat(np.array(row, np.int32)[:, None], max(len(groups), 1),
                      axis=1)
    return (groups or ((),)), table

  def _axis(shape):
    return axis % len(shape)

  def shrink(lay, masks, scores, groups, keep):
    out = list(masks)
    for g, members in enumerate(groups):
      for i in members:
        out[i] = _nm_masks(scores[i], keep[g], masks[i], m,
                           _axis(lay.shapes[i]))
    return out

  def drop_and_grow(lay, masks, magnitudes, grow_scores, groups, keep,
                    fraction):
    out, grown = list(masks), [jnp.zeros_like(x) for x in masks]
    members = [i for g in groups for i in g]
    if not members:
      return out, grown
    active = jnp.stack([jnp.sum(masks[i], dtype=jnp.int32) for i in members])
    drop = num_to_drop(active, fraction)
    # One exact top-k for all layers (one group each): keep the active − drop
    # largest magnitudes among the active weights of every layer.
    kept = selection.top_k_masks([magnitudes[i] for i in members],
                                 [[j] for j in range(len(members))],
                                 active - drop, [masks[i] for i in members])
    count_of = {i: keep[g] for g, mem in enumerate(groups) for i in mem}
    for i, kept_i in zip(members, kept):
      ax = _axis(lay.shapes[i])
      lost = count_of[i] - jnp.expand_dims(nm_group_counts(kept_i, m, ax),
                                           ax + 1)
      # Kept entries get key 0, so the `lost` best of a group are dead ones.
      keys = jnp.where(kept_i, jnp.uint32(0), selection.sortable_key(
          jnp.asarray(grow_scores[i], jnp.float32)))
      grown[i] = _select_in_groups(keys, jnp.maximum(lost, 0), m, ax) & ~kept_i
      out[i] = kept_i | grown[i]
    return out, grown

  def random(lay, key, groups, keep):
    keys = jax.random.split(key, max(len(lay.shapes), 1))
    out = [jnp.ones(s, jnp.bool_) for s in lay.shapes]
    for g, members in enumerate(groups):
      for i in members:
        out[i] = _nm_masks(jax.random.uniform(keys[i], lay.shapes[i]),
                           jnp.int32(keep[g]), None, m, _axis(lay.shapes[i]))
    return out

  def threshold(lay, weights, sparsity, *, divisors=None, hint=None):
    del hint  # each group of M is ranked on its own, without passes
    scores = selection.magnitude_scores(weights, divisors)
    n_t = n_for_density(1.0 - jnp.asarray(sparsity, jnp.float32), n, m)
    masks, taus, thresholds = [], [], []
    for shape, active, x in zip(lay.shapes, lay.active, scores):
      if not active:  # skipped: dense, unthresholded
        masks.append(jnp.ones(shape, jnp.bool_))
        taus.append(jnp.zeros([], jnp.float32))
        thresholds.append(jnp.zeros([], jnp.float32))
        continue
      ax = _axis(shape)
      mask = _nm_masks(x, n_t, None, m, ax)
      # τ_g: the group's largest pruned score (0 if it prunes nothing).
      grouped = jnp.where(mask, -jnp.inf, x).reshape(
          grouped_shape(shape, m, ax))
      tau = jnp.maximum(jnp.max(grouped, axis=ax + 1, keepdims=True), 0.0)
      masks.append(mask)
      taus.append(jnp.broadcast_to(tau, grouped.shape).reshape(shape))
      thresholds.append(jnp.squeeze(tau, ax + 1))
    return Threshold(masks, taus, thresholds)

  return Structure(f"{n}:{m}", "n_m",
                   dict(n=n, m=m, axis=axis,
                        skip_incompatible=skip_incompatible),
                   layout, budget, shrink, drop_and_grow, random, threshold)


# ----------------------------------------------------------------------------
# Whole units (neurons, filters).


def _natural_key(path: str):
  """Sort key in which ``Dense_10`` comes after ``Dense_9``."""
  return [(0, int(t), "") if t.isdigit() else (1, 0, t)
          for t in re.split(r"(\d+)", path)]


def output_layer_paths(paths, ndims, exclude="auto") -> tuple[str, ...]:
  """The prunable paths whose units :func:`units` leaves whole.

  Args:
    paths: the prunable leaves' paths.
    ndims: their numbers of dimensions.
    exclude: ``"auto"``: the 2-D kernel whose path sorts last (numbers
      compared as numbers), unless it is the only prunable leaf; ``None``:
      none; a path: the leaves equal to it or below it (``"fc3"`` matches
      ``"fc3/kernel"``).

  Raises:
    ValueError: naming ``exclude`` if a path matches no prunable leaf, or all.
  """
  if exclude is None:
    return ()
  if exclude == "auto":
    dense = [p for p, d in zip(paths, ndims) if d == 2]
    if not dense or len(paths) < 2:
      return ()
    return (max(dense, key=_natural_key),)
  out = tuple(p for p in paths if p == exclude or p.startswith(exclude + "/"))
  if not out or len(out) == len(paths):
    raise ValueError(
        f"exclude: {exclude!r} must match some but not all of the prunable "
        f"leaves {list(paths)}.")
  return out


def _check_exclude(exclude):
  if exclude is None or exclude == "auto":
    return exclude
  if not isinstance(exclude, str) or not exclude:
    raise ValueError(
        "exclude: expected 'auto', None or the path of a prunable leaf (or "
        f"of its layer, e.g. 'fc3'), got {exclude!r}.")
  return exclude


def units(*, axis: int = -1, reduce: str = "sum", min_per_layer: int = 1,
          exclude: str | None = "auto") -> Structure:
  """Whole output units: neurons of a Dense kernel, filters of a Conv kernel.

  A unit of a kernel is its slice at one index of ``axis`` (the last axis:
  Flax's ``out``). A unit's score is the ``reduce`` of its weights' scores
  (``"sum"``, ``"mean"``, ``"max"`` or ``"l2"``); budgets count units
  (``distribution`` ``"global"``: one ranking of all units, ``"uniform"``,
  or ``{path: s}``; ``"erk"`` is not defined for units); every layer keeps
  its ``min_per_layer`` best alive units whatever the budget, so no layer is
  emptied, and the ``exclude`` layer (by default the classifier) is left
  whole and not counted. Drop-and-grow moves whole units. Masks are whole
  units as long as they start whole (a dense start, or :attr:`random`).

  Args:
    axis: the unit axis of a kernel (default -1).
    reduce: how a unit's weight scores combine into its score.
    min_per_layer: units every layer keeps at least (>= 1).
    exclude: ``"auto"`` (the last 2-D kernel by path), ``None`` (every
      layer's units are pruned) or a prunable path / layer name.

  Returns:
    A :class:`Structure`.
  """
  if not _is_int(axis):
    raise ValueError(f"axis: must be an int (the unit axis), got {axis!r}.")
  reduce = validate.choice(reduce, "reduce", REDUCE)
  min_per_layer = validate.integer(min_per_layer, "min_per_layer", low=1)
  exclude = _check_exclude(exclude)

  def layout(paths, shapes):
    shapes = tuple(tuple(s) for s in shapes)
    whole = output_layer_paths(paths, [len(s) for s in shapes], exclude)
    for path, shape in zip(paths, shapes):
      if path not in whole and not -len(shape) <= axis < max(len(shape), 1):
        raise ValueError(f"structure: layer {path!r} of shape {shape} has no "
                         f"unit axis {axis}.")
    return Layout(tuple(paths), shapes,
                  tuple(p not in whole and len(s) >= 1
                        for p, s in zip(paths, shapes)))

  def budget(distribution, lay, sparsities, final):
    if distribution == "erk":
      raise ValueError(
          "distribution: 'erk' is not defined for unit counts (structure="
          "fj.units()); use 'global', 'uniform' or a mapping path -> "
          "sparsity.")
    index = [i for i, a in enumerate(lay.active) if a]
    groups, table = _counted_budget(
        _dist_key(distribution), tuple(lay.paths[i] for i in index),
        tuple((lay.shapes[i][axis],) for i in index), tuple(sparsities),
        final)
    # The guard keeps min_per_layer units of every layer: the counts in
    # force are never below it.
    floor = np.array([sum(min(min_per_layer, lay.shapes[index[i]][axis])
                          for i in g) for g in groups], np.int32)
    return _remap(groups, index), np.maximum(table, floor[None, :len(groups)])

  def to_units(x):
    """``(..., F, ...) -> (rows, F)``: one column per unit."""
    x = jnp.moveaxis(x, axis, -1)
    return jnp.reshape(x, (-1, x.shape[-1]))

  def from_units(u, shape):
    """bool ``[F]`` broadcast back to the kernel's ``shape``."""
    moved = jnp.moveaxis(jnp.zeros(shape, jnp.bool_), axis, -1).shape
    return jnp.moveaxis(jnp.broadcast_to(u, moved), -1, axis % len(shape))

  def unit_scores(s):
    s = to_units(jnp.asarray(s, jnp.float32))
    if reduce == "sum":
      out = jnp.sum(s, axis=0)
    elif reduce == "mean":
      out = jnp.mean(s, axis=0)
    elif reduce == "max":
      out = jnp.max(s, axis=0)
    else:
      out = jnp.sqrt(jnp.sum(jnp.square(s), axis=0))
    # Finite, so that +inf marks guarded units strictly above all others
    # (NaN ranks lowest, as in selection).
    big = jnp.finfo(jnp.float32).max
    return jnp.nan_to_num(out, nan=-big, posinf=big, neginf=-big)

  def alive_units(mask):
    return jnp.any(to_units(mask), axis=0)

  def members_of(groups):
    """The leaves in ``groups`` and the groups as indices into that list."""
    idx = [i for g in groups for i in g]
    pos = {i: j for j, i in enumerate(idx)}
    return idx, tuple(tuple(pos[i] for i in g) for g in groups)

  def shrink(lay, masks, scores, groups, keep):
    del lay
    idx, sub = members_of(groups)
    if not idx:
      return list(masks)
    alive = [alive_units(masks[i]) for i in idx]
    fscores = [unit_scores(scores[i]) for i in idx]
    guarded = [selection.top_k_mask(s, min(min_per_layer, s.shape[0]), a) & a
               for s, a in zip(fscores, alive)]
    ranked = [jnp.where(gd, jnp.inf, s) for s, gd in zip(fscores, guarded)]
    k = jnp.minimum(jnp.maximum(jnp.asarray(keep, jnp.int32),
                                _group_sums(guarded, sub)),
                    _group_sums(alive, sub))
    kept = selection.top_k_masks(ranked, sub, k, alive)
    out = list(masks)
    for i, kf, a in zip(idx, kept, alive):
      out[i] = masks[i] & from_units(kf & a, masks[i].shape)
    return out

  def drop_and_grow(lay, masks, magnitudes, grow_scores, groups, keep,
                    fraction):
    del lay, keep
    idx, sub = members_of(groups)
    out, grown = list(masks), [jnp.zeros_like(x) for x in masks]
    if not idx:
      return out, grown
    alive = [alive_units(masks[i]) for i in idx]
    active = _group_sums(alive, sub)
    n = num_to_drop(active, fraction)
    kept = selection.top_k_masks([unit_scores(magnitudes[i]) for i in idx],
                                 sub, active - n, alive)
    new = selection.top_k_masks([unit_scores(grow_scores[i]) for i in idx],
                                sub, n, [~k for k in kept])
    for i, k, g in zip(idx, kept, new):
      grown[i] = from_units(g, masks[i].shape)
      out[i] = from_units(k | g, masks[i].shape)
    return out, grown

  def random(lay, key, groups, keep):
    idx, sub = members_of(groups)
    out = [jnp.ones(s, jnp.bool_) for s in lay.shapes]
    if not idx:
      return out
    kept = _random_top_k(key, tuple((lay.shapes[i][axis],) for i in idx), sub,
                         keep, min_per_layer)
    for i, kf in zip(idx, kept):
      out[i] = from_units(kf, lay.shapes[i])
    return out

  def threshold(lay, weights, sparsity, *, divisors=None, hint=None):
    del hint
    scores = selection.magnitude_scores(weights, divisors)
    # Per layer (the group of units ranked together is the layer): the
    # F − round(s·F) units of largest score are kept (at least min_per_layer),
    # τ is the largest pruned unit score, and a kept unit of score r is
    # shrunk by the factor (r − τ)/r (group soft-thresholding: per entry
    # τ_e = score_e·τ/r), continuous as a unit reaches the threshold.
    masks, taus, thresholds = [], [], []
    for shape, active, x in zip(lay.shapes, lay.active, scores):
      if not active:
        masks.append(jnp.ones(shape, jnp.bool_))
        taus.append(jnp.zeros([], jnp.float32))
        thresholds.append(jnp.zeros([], jnp.float32))
        continue
      r = unit_scores(x)
      f = r.shape[0]
      keep = jnp.maximum(f - num_pruned(sparsity, f), min(min_per_layer, f))
      kept = selection.top_k_mask(r, keep)
      tau = jnp.maximum(jnp.max(jnp.where(kept, -jnp.inf, r)), 0.0)
      tau = jnp.where(keep >= f, jnp.float32(0.0), tau)
      ratio = jnp.where(kept & (r > 0), tau / jnp.where(r > 0, r, 1.0), 1.0)
      masks.append(from_units(kept, shape))
      taus.append(jnp.asarray(x, jnp.float32) * from_units(ratio, shape))
      thresholds.append(tau)
    return Threshold(masks, taus, thresholds)

  return Structure("units", "units",
                   dict(axis=axis, reduce=reduce, min_per_layer=min_per_layer,
                        exclude=exclude),
                   layout, budget, shrink, drop_and_grow, random, threshold)
