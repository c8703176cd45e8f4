"""Exact top-k selection over one or many tensors, without sorting.

"Keep the k highest scores" is the one selection rule every method uses: a
global ranking is one *group* holding every prunable tensor, a layer-wise
ranking is one group per tensor. Selection is exact in count: it keeps exactly
``k`` entries of each group, breaking ties by position (earlier tensors first,
then row-major order), so the same scores always give the same mask.

**Algorithm: radix select on order-preserving keys.** Scores are mapped to
``uint32`` keys with the same order (:func:`sortable_key`). The k-th largest
key ``t`` of a group is found one *digit* at a time, most significant first:
a histogram of the digit over the entries whose higher digits equal the
prefix found so far, then a suffix sum over the histogram picks the digit
value where the count of larger entries crosses ``k``. Each digit is one
streaming pass over the data (a scatter-add): 2 passes of 16 bits when the
histograms (``G·2^16`` int32 for G groups) fit in a quarter of the scores'
bytes (or 1 MiB), else 4 of 8 bits (or 8 of 4), instead of the 32
compare-and-count passes of a bit-by-bit bisection.

The last key pass also yields ``above = #{key > t}`` and ``ties = #{key ==
t}``. The mask is ``key > t`` plus the first ``k − above`` entries with
``key == t`` in group order. When every tie is kept (``k − above = ties``,
the usual case for continuous scores) that is ``key >= t``. Otherwise the
same loop runs on: the radix select continues over *position digits*, i.e.
it ranks the composite key ``(key, 2^b − 2 − p)`` (``p`` the entry's flat
index in its group, ``2^b >= size + 2``) among the entries with ``key ==
t``, which takes ``ceil(b/w)`` more passes (1 or 2) and only runs when some
group must cut its ties. No cumulative sum over the entries is ever formed.

All groups share the passes: each pass fills one ``[G, 2^w]`` histogram
(every tensor scatters into its group's row) and one batched suffix sum
picks every group's digit; the passes are one ``while_loop`` over one traced
body, and the tensors of one shape and dtype one loop inside it, so the
compiled program holds one scatter per distinct tensor shape, whatever the
number of tensors, groups and passes (a GPT of any depth: a handful).

**Memory.** Keys are never stored: each pass recomputes them from the scores
block by block (``lax.fori_loop`` over blocks of about 2^16 entries per
device, cut from a reshaped view, never flattened), so the temporaries are
one block's keys and digits and
the histograms (at most ``max(n/4, 2^18)`` int32 words), whatever n is.
Peak memory is the scores plus the boolean masks (n bytes) plus O(2^16)
words, not the O(n) keys, ranks and cumulative sums of a sort or of a
cumsum-based tie break; tensors that share their shape with another are
also stacked once (a copy of their scores and eligibility) for their loop.

**Sharding.** Nothing is flattened or gathered by this module. With several
devices a block takes evenly spaced entries along every axis (strided
blocks, see :func:`_stream`), so it holds an equal share of every shard of
a tensor sharded along any of its axes (``out`` for column-parallel
layers, ``in`` for FSDP or row-parallel ones, or both); each device streams
its own shards, each pass scatters into a local histogram combined by an
all-reduce of ``G·2^w`` ints, and the masks, elementwise in the tensors'
own shapes, come out sharded like the scores. On one device blocks are
contiguous, the fastest access.

Ineligible entries (e.g. weights already pruned, which must never be revived)
are ranked strictly below every eligible one, whatever their score.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flipout_jax import trees

# NumPy, not jnp: a jnp constant at import would start the XLA backend and
# block a later jax.distributed.initialize().
_SIGN = np.uint32(0x80000000)

# Entries per streamed chunk. Each chunk's keys and digits are the only
# per-entry temporaries. On XLA:CPU 2^15..2^17 measured alike; 2^14 pays the
# loop overhead, and one unchunked scatter over 10^6 entries is ~3x slower
# (its index and update operands, 2x the scores, leave the cache).
_CHUNK = 1 << 16
# At most this many devices' worth of entries per block (see _chunk).
_MAX_CHUNK_DEVICES = 64
# Histogram words always allowed (1 MiB), however small the scores.
_HIST_FLOOR_WORDS = 1 << 18


class _Blocking(NamedTuple):
  """How tensors are cut into streamed blocks (a static argument).

  Attributes:
    chunk: entries per block, about.
    spread: strided blocks that span every shard of a sharded tensor (for
      programs on several devices), else contiguous blocks (one device:
      the fastest memory access).
  """
  chunk: int
  spread: bool


def _blocking() -> _Blocking:
  """``_CHUNK`` entries per device, strided if there are several devices.

  The devices are those of the mesh set by ``jax.set_mesh`` if any, else all
  of the process's (at most ``_MAX_CHUNK_DEVICES`` count): a block spread
  over D shards then holds about ``_CHUNK`` entries of each, and a block of
  replicated scores stays small next to the scores themselves.
  """
  mesh = jax.sharding.get_abstract_mesh()
  devices = jax.device_count() if mesh.empty else mesh.size
  return _Blocking(_CHUNK * max(1, min(devices, _MAX_CHUNK_DEVICES)),
                   devices > 1)


def sortable_key(scores: jax.Array) -> jax.Array:
  """Maps float scores to uint32 keys with the same order.

  NaN is treated as ``-inf``. The smallest key a score can map to is that of
  ``-inf`` (0x007FFFFF), so keys 0 .. 0x007FFFFE are free to mark ineligible
  entries; the largest is that of ``+inf`` (0xFF800000).

  Args:
    scores: a float array (any float dtype; computed in float32).

  Returns:
    ``uint32`` array of the same shape; ``a < b`` iff ``key(a) < key(b)``
    (with ``-0.0 < +0.0``).
  """
  x = jnp.asarray(scores, jnp.float32)
  x = jnp.where(jnp.isnan(x), -jnp.inf, x)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_to_float(key: jax.Array) -> jax.Array:
  """Inverse of :func:`sortable_key` (float32)."""
  # Keys of non-negative floats have the sign bit set and hold the float's
  # bits below it; keys of negative floats are the complement of the bits.
  bits = jnp.where(key & _SIGN, key ^ _SIGN, ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _keys(scores, eligible):
  key = sortable_key(scores)
  if eligible is None:
    return key
  return jnp.where(eligible, key, jnp.uint32(0))


# ----------------------------------------------------------------------------
# Streaming: a source is a flat view of one tensor plus how to key a chunk.


class _Source:
  """One tensor: its arrays and ``key_fn(index, *blocks) -> uint32 keys``.

  ``index`` holds the int32 row-major flat index (within the tensor) of
  every entry of the blocks; XLA drops it when ``key_fn`` ignores it.
  """

  def __init__(self, arrays, key_fn: Callable[..., jax.Array], shape,
               blocking: _Blocking):
    self.shape = tuple(shape)
    self.arrays = [jnp.reshape(a, (1,)) if not self.shape else a
                   for a in arrays]
    self.key_fn = key_fn
    self.size = int(np.prod(self.shape, dtype=np.int64))
    self.chunk, self.spread = blocking

  @property
  def block_shape(self):
    return self.shape or (1,)

  def keys(self) -> jax.Array:
    """All keys, in the tensor's shape (elementwise, so sharding-preserving)."""
    shape = self.block_shape
    index = _flat_index(shape, (0,) * len(shape), shape, self.arrays[0])
    return jnp.reshape(self.key_fn(index, *self.arrays), self.shape)


class _Bucket(NamedTuple):
  """Same-shape tensors streamed by one loop: the unit of compiled code.

  Attributes:
    arrays: the members' arrays, each list stacked on a new leading axis.
    key_fn: as :class:`_Source`'s, for one member's blocks.
    shape: one member's shape.
    members: the indices of the member tensors (in the caller's list).
    groups: each member's group, int32 ``[B]`` (a NumPy constant).
    offsets: each member's first position within its group, int32 ``[B]``.
  """
  arrays: list
  key_fn: Callable[..., jax.Array]
  shape: tuple
  members: tuple
  groups: np.ndarray
  offsets: np.ndarray

  def source(self, m, blocking: _Blocking) -> _Source:
    """Member ``m`` (a traced or Python int) as a :class:`_Source`."""
    if len(self.members) == 1:
      arrays = [a[0] for a in self.arrays]
    else:
      arrays = [jax.lax.dynamic_index_in_dim(a, m, keepdims=False)
                for a in self.arrays]
    return _Source(arrays, self.key_fn, self.shape, blocking)


def _buckets(arrays: Sequence[Sequence[jax.Array]], key_fn, groups
             ) -> list[_Bucket]:
  """The grouped tensors of ``arrays[i]`` (each a list of like-shaped arrays:
  scores, eligibility) bucketed by shape and dtypes, in first-seen order.

  ``key_fn`` is one function for every tensor, or a list of one per tensor
  (then a bucket also shares its key function).

  Every tensor of a bucket has the same compiled code (one loop over the
  stacked members), so a program grows with the distinct shapes of the
  tensors, not with their number. Stacking copies the members once.
  """
  if callable(key_fn):
    key_fn = [key_fn] * len(arrays)
  group_of, offset_of = {}, {}
  for g, members in enumerate(groups):
    start = 0
    for i in members:
      group_of[i], offset_of[i] = g, start
      start += int(np.prod(jnp.shape(arrays[i][0]), dtype=np.int64))
  grouped = sorted(group_of)
  out = []
  # By the scores' shape and dtype (eligibility, when given, is bool of the
  # scores' shape for every tensor), then by key function.
  for same in trees.same_shape_groups([arrays[i][0] for i in grouped]):
    by_fn = {}
    for j in same:
      by_fn.setdefault(key_fn[grouped[j]], []).append(grouped[j])
    for fn, members in by_fn.items():
      out.append(_bucket(arrays, fn, members, group_of, offset_of))
  return out


def _bucket(arrays, key_fn, members, group_of, offset_of) -> _Bucket:
  """The :class:`_Bucket` of tensors ``members`` (same shape and dtype)."""
  stacked = [jnp.stack([arrays[i][j] for i in members])
             for j in range(len(arrays[members[0]]))]
  return _Bucket(
      stacked, key_fn, tuple(jnp.shape(arrays[members[0]][0])),
      tuple(members), np.asarray([group_of[i] for i in members], np.int32),
      np.asarray([offset_of[i] for i in members], np.int32))


def _stream_bucket(bucket: _Bucket, blocking: _Blocking, fn, carry):
  """Folds ``carry = fn(carry, index, parts, g, offset)`` over every block
  of every member of ``bucket`` (``g`` and ``offset``: the member's group
  and position offset, traced int32 scalars when the bucket is a loop)."""
  if len(bucket.members) == 1:
    return _stream(bucket.source(0, blocking),
                   functools.partial(fn, g=int(bucket.groups[0]),
                                     offset=int(bucket.offsets[0])), carry)
  groups, offsets = jnp.asarray(bucket.groups), jnp.asarray(bucket.offsets)

  def member(m, c):
    return _stream(bucket.source(m, blocking),
                   functools.partial(fn, g=groups[m], offset=offsets[m]), c)

  return jax.lax.fori_loop(0, len(bucket.members), member, carry)


def _flat_index(shape, starts, sizes, like: jax.Array) -> jax.Array:
  """Row-major flat indices (int32) of the block ``starts``/``sizes``.

  ``like`` is a block of the data: starting from ``zeros_like(like)`` gives
  the indices its sharding, which explicit-axes meshes require of operands
  combined with it (XLA folds the zeros away).
  """
  strides = [int(np.prod(shape[d + 1:], dtype=np.int64))
             for d in range(len(shape))]
  index = jnp.zeros_like(like, dtype=jnp.int32)
  for d, (start, stride) in enumerate(zip(starts, strides)):
    coord = jax.lax.broadcasted_iota(jnp.int32, sizes, d) + start
    index = index + coord * stride
  return index


def _explicit_spec(x: jax.Array):
  """``(mesh, spec)`` if ``x`` is sharded over explicit mesh axes, else None.

  ``spec`` has one entry per axis of ``x`` (None: not sharded). Under
  explicit axes the shardings are part of the types, so ops that change
  shapes must name their output sharding; GSPMD (auto axes) infers it.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(axis is None for axis in spec):
    return None
  return sharding.mesh, tuple(spec) + (None,) * (jnp.ndim(x) - len(spec))


def _replicated_if_explicit(x: jax.Array):
  """``P()`` if ``x`` is sharded over explicit mesh axes, else None.

  On explicit-axes meshes a scatter of sharded indices into the replicated
  histogram must name its output sharding (the partial histograms are then
  summed across devices); elsewhere GSPMD infers it.
  """
  return None if _explicit_spec(x) is None else jax.sharding.PartitionSpec()


def _explicit_view_spec(x: jax.Array, split):
  """The spec of ``x``'s view ``split`` under explicit axes.

  Returns ``None`` if ``x`` is not explicitly sharded (GSPMD infers the
  view's sharding), the view's ``PartitionSpec`` if every sharded axis's
  shard count divides its ``r``, else ``False`` (no such view).
  """
  explicit = _explicit_spec(x)
  if explicit is None:
    return None
  mesh, spec = explicit
  view_spec = []
  for entry, (r, _, _) in zip(spec, split):
    names = () if entry is None else (
        (entry,) if isinstance(entry, str) else tuple(entry))
    if r % math.prod(mesh.shape[n] for n in names):
      return False
    view_spec += [entry, None, None]
  return jax.sharding.PartitionSpec(*view_spec)



@functools.lru_cache(maxsize=None)
def _divisors(n: int) -> tuple[int, ...]:
  """The divisors of ``n >= 1``, ascending."""
  small, large = [], []
  i = 1
  while i * i <= n:
    if n % i == 0:
      small.append(i)
      if i * i != n:
        large.append(n // i)
    i += 1
  return tuple(small + large[::-1])


# A strided block is used only if it holds at least chunk/_MIN_FILL entries;
# shapes without such divisors (e.g. a prime-sized axis) are cut contiguously.
_MIN_FILL = 16
# A cut last axis is taken in _RUNS_PER_AXIS evenly spaced runs of contiguous
# entries (so a block still spans up to that many shards of the axis); the
# runs are as long as that allows (e.g. 256 for an extent of 65536), which
# keeps the memory access of large blocks cache-friendly.
_RUNS_PER_AXIS = 256
# Shard counts are powers of two in practice: block extents keep the power of
# two of their axis, up to 2^_POW2_BITS, whenever the budget allows.
_POW2_BITS = 8


def _pow2_part(n: int) -> int:
  """``2^min(v, _POW2_BITS)``, ``2^v`` the largest power of two dividing n."""
  return min(n & -n, 1 << _POW2_BITS)


def _best_divisor(n: int, limit: int, multiple_of: int) -> int:
  """The largest divisor of ``n`` at most ``limit`` that is a multiple of
  ``multiple_of``; the largest divisor at most ``limit`` if there is none
  (1 at the least; ``limit >= 1``)."""
  fits = [x for x in _divisors(n) if x <= limit]
  preferred = [x for x in fits if x % multiple_of == 0]
  return (preferred or fits)[-1]


@functools.lru_cache(maxsize=None)
def _strided_view(shape: tuple[int, ...], chunk: int):
  """The ``(r, q, l)`` split of every axis for strided blocks, or None.

  Axis ``d`` of size ``s`` is viewed as ``(r, q, l)`` (``s = r·q·l``; the
  original index is ``c·q·l + j·l + i``) and a block takes all ``r·l``
  entries at one ``j``: ``r`` evenly spaced runs of ``l`` contiguous
  entries, i.e. an equal share of each of ``D`` shards of the axis whenever
  ``D`` divides ``r``. The extents ``e = r·l`` are divisors of the axis
  sizes with ``prod(e) <= chunk``, found by repeatedly shrinking the largest
  extent (the earlier axis among equals, so the last, contiguous axis stays
  whole longest) to its next smaller divisor, preferring divisors that keep
  the axis's power of two; then the largest axes grow back where the budget
  allows. ``l > 1`` only on a cut last axis.

  Returns None when the best such block holds fewer than
  ``chunk/_MIN_FILL`` entries (sizes without suitable divisors).
  """
  extent = list(shape)
  while math.prod(extent) > chunk:
    d = max(range(len(extent)), key=lambda i: (extent[i], -i))
    extent[d] = _best_divisor(shape[d], extent[d] - 1, _pow2_part(shape[d]))
  for d in sorted(range(len(shape)), key=lambda i: (-shape[i], i)):
    limit = chunk // (math.prod(extent) // extent[d])
    grown = _best_divisor(shape[d], limit, _pow2_part(shape[d]))
    if grown > extent[d] and (grown % _pow2_part(shape[d]) == 0
                              or extent[d] % _pow2_part(shape[d])):
      extent[d] = grown
  if math.prod(extent) * _MIN_FILL < chunk:
    return None
  split = [(e, s // e, 1) for s, e in zip(shape, extent)]
  e, s = extent[-1], shape[-1]
  if e < s:  # a cut last axis: runs of l contiguous entries, e/l of them
    runs = [x for x in _divisors(e) if x <= max(1, e // _RUNS_PER_AXIS)
            and (e // x) % _pow2_part(e) == 0]
    run = runs[-1] if runs else 1
    split[-1] = (e // run, s // e, run)
  return tuple(split)


@functools.lru_cache(maxsize=None)
def _contiguous_view(shape: tuple[int, ...], chunk: int):
  """The ``(r, q, l)`` split of every axis for contiguous blocks, or None.

  As :func:`_strided_view` with ``r = 1``: a block is the trailing axes
  that fit in ``chunk`` whole, a run of ``l`` (the largest divisor of the
  axis that fits) of the axis before them, and one index of every earlier
  axis, i.e. one contiguous run of memory. None when that run holds fewer
  than ``chunk/_MIN_FILL`` entries.
  """
  split, budget, cut = [], chunk, False
  for s in reversed(shape):
    if cut:
      split.append((1, s, 1))
    elif s <= budget:
      split.append((1, 1, s))
      budget //= s
    else:
      run = max(x for x in _divisors(s) if x <= budget)
      split.append((1, s // run, run))
      cut = True
  split = tuple(split[::-1])
  if math.prod(l for _, _, l in split) * _MIN_FILL < chunk:
    return None
  return split


def _stream(src: _Source, fn, carry):
  """Folds ``carry = fn(carry, index, parts)`` over blocks of ``src``.

  ``parts`` are the blocks of ``src.arrays`` (about ``src.chunk`` entries)
  and ``index`` their entries' flat indices in the tensor. Tensors of at
  most ``chunk`` entries are one block; larger ones are streamed through a
  ``fori_loop`` of ``dynamic_slice``s of a view (one traced body, O(chunk)
  temporaries), never flattened.

  **Several devices** (``src.spread``): strided blocks
  (:func:`_strided_view`) span every axis with evenly spaced entries, so a
  block holds an equal share of each shard of a sharded axis whose shard
  count divides the block's ``r`` on that axis: under GSPMD each device
  streams its own shards (the sliced ``q`` axes are never sharded) and no
  tensor is gathered, whichever axes are sharded (``in`` for FSDP or
  row-parallel layers, ``out`` for column-parallel ones).

  **One device**: contiguous blocks (:func:`_contiguous_view`), the fastest
  memory access (strided blocks measured ~1.6x slower on XLA:CPU).

  Sizes without suitable divisors (e.g. a prime-sized axis) fall back to
  contiguous blocks cut along the leading axes with a remainder block
  (:func:`_stream_contiguous`); a sharded axis at or before the cut is then
  gathered block by block.

  **Explicit mesh axes** (sharding in the types): the view is reshaped with
  its sharding named (each sharded axis's spec on its ``r``); if a shard
  count does not divide its ``r``, the tensor is processed as one block
  (elementwise and sharded, O(size) temporaries) instead.
  """
  shape = src.block_shape
  if src.size <= src.chunk:
    whole = _flat_index(shape, (0,) * len(shape), shape, src.arrays[0])
    return fn(carry, whole, src.arrays)
  view = (_strided_view if src.spread else _contiguous_view)(shape, src.chunk)
  view_spec = None if view is None else _explicit_view_spec(src.arrays[0], view)
  if view is not None and view_spec is not False:
    return _stream_view(src, view, view_spec, fn, carry)
  if _explicit_spec(src.arrays[0]) is not None:
    # Explicit axes reject slicing a sharded axis unevenly: one block.
    whole = _flat_index(shape, (0,) * len(shape), shape, src.arrays[0])
    return fn(carry, whole, src.arrays)
  return _stream_contiguous(src, fn, carry)


def _stream_view(src: _Source, split, view_spec, fn, carry):
  """:func:`_stream` over the blocks of a view (``split``: ``(r, q, l)`` per
  axis; a block is all ``r·l`` entries at one ``q`` index of every axis).
  ``view_spec``: the view's sharding under explicit axes, else None."""
  view_shape = tuple(x for axis in split for x in axis)
  views = [jax.lax.reshape(x, view_shape, out_sharding=view_spec)
           for x in src.arrays]
  sizes = tuple(x for r, _, l in split for x in (r, 1, l))
  qs = [q for _, q, _ in split]
  strides = [math.prod(src.block_shape[d + 1:]) for d in range(len(split))]

  def body(j, c):
    js, rem = [], j
    for q in reversed(qs):  # unravel the block number over the q axes
      js.append(rem % q)
      rem = rem // q
    js = js[::-1]
    starts = [x for jd in js for x in (jnp.int32(0), jd, jnp.int32(0))]
    parts = [jax.lax.dynamic_slice(v, starts, sizes) for v in views]
    index = jnp.zeros_like(parts[0], dtype=jnp.int32)
    for d, ((r, q, l), jd, stride) in enumerate(zip(split, js, strides)):
      coord = (jax.lax.broadcasted_iota(jnp.int32, sizes, 3 * d) * (q * l)
               + jd * l + jax.lax.broadcasted_iota(jnp.int32, sizes, 3 * d + 2))
      index = index + coord * stride
    return fn(c, index, parts)

  return jax.lax.fori_loop(0, math.prod(qs), body, carry)


def _stream_contiguous(src: _Source, fn, carry):
  """:func:`_stream` over contiguous blocks cut along the leading axes, the
  last one a remainder (any sizes)."""
  shape = src.block_shape
  a = next(d for d in range(len(shape))
           if np.prod(shape[d + 1:], dtype=np.int64) <= src.chunk)
  inner = int(np.prod(shape[a + 1:], dtype=np.int64))
  r = max(1, min(shape[a], src.chunk // inner))
  lead = shape[:a]
  num_lead = int(np.prod(lead, dtype=np.int64))
  full, rest = divmod(shape[a], r)

  def block(j_lead, start_a, size_a):
    starts, rem = [], j_lead
    for d in reversed(lead):  # unravel j_lead over the leading axes
      starts.append(rem % d)
      rem = rem // d
    starts = starts[::-1] + [start_a] + [0] * (len(shape) - a - 1)
    starts = [jnp.asarray(x, jnp.int32) for x in starts]
    sizes = (1,) * a + (size_a,) + shape[a + 1:]
    parts = [jax.lax.dynamic_slice(x, starts, sizes) for x in src.arrays]
    return _flat_index(shape, starts, sizes, parts[0]), parts

  def loop(count, body, carry):
    if count == 1:
      return body(jnp.int32(0), carry)
    return jax.lax.fori_loop(0, count, body, carry)

  if full:
    carry = loop(num_lead * full,
                 lambda j, c: fn(c, *block(j // full, (j % full) * r, r)),
                 carry)
  if rest:
    carry = loop(num_lead,
                 lambda j, c: fn(c, *block(j, full * r, rest)), carry)
  return carry


def _digit_width(n: int, num_groups: int, bits: int) -> int:
  """Bits per digit (4 to 16) for ``num_groups`` groups of ``n`` entries.

  The fewest passes over ``bits``-bit keys whose histograms
  (``num_groups·2^w`` int32) fit in ``max(n/4, 2^18)`` words (at most a
  quarter of float32 scores' bytes, or 1 MiB for small models), with the
  narrowest digit that takes that many: ``ceil(bits/p)`` for ``p`` passes
  (16 bits: 2 passes; 11: 3; 8: 4), at least 4.
  """
  budget = max(n // 4, _HIST_FLOOR_WORDS)
  for passes in range(1, max(bits, 1) + 1):
    width = max(-(-bits // passes), 4)
    if width <= 16 and num_groups << width <= budget:
      return width
  return 4


def _suffix_sum(x: jax.Array) -> jax.Array:
  """``s[..., i] = sum_{j >= i} x[..., j]`` for short int32 rows.

  A masked [m, m] sum, not ``cumsum``: XLA:CPU lowers cumsum to
  reduce-windows that cost ~0.5 ms for 2^16 entries; at m <= 256 this is a
  few microseconds.
  """
  i = jnp.arange(x.shape[-1])
  upper = i[None, :] >= i[:, None]
  return jnp.sum(jnp.where(upper, x[..., None, :], 0), axis=-1,
                 dtype=jnp.int32)


def _select_digit(hist: jax.Array, k: jax.Array, above: jax.Array):
  """Per group, the digit where the count of larger entries crosses ``k``.

  Args:
    hist: int32 ``[G, 2^w]``, counts of each digit value among the entries
      whose higher digits equal the group's prefix.
    k: int32 ``[G]``.
    above: int32 ``[G]``, entries whose higher digits exceed the prefix.

  Returns:
    ``(d, above_d, ties_d)``, each ``[G]``: ``d`` the largest digit with
    ``above + #{digit >= d} >= k`` (0 if none), ``above_d = above +
    #{digit > d}`` and ``ties_d = hist[d]``.
  """
  num_groups, bins = hist.shape
  w = bins.bit_length() - 1
  cols = 1 << (w // 2)
  # Two levels (rows of `cols` bins) so the suffix sums stay short.
  table = hist.reshape(num_groups, bins // cols, cols)
  row_total = jnp.sum(table, axis=2, dtype=jnp.int32)
  ge_row = above[:, None] + _suffix_sum(row_total)  # non-increasing
  r = jnp.maximum(jnp.sum(ge_row >= k[:, None], axis=1, dtype=jnp.int32) - 1, 0)
  take = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]
  row = jnp.take_along_axis(table, r[:, None, None], axis=1)[:, 0]
  ge = (take(ge_row, r) - take(row_total, r))[:, None] + _suffix_sum(row)
  c = jnp.maximum(jnp.sum(ge >= k[:, None], axis=1, dtype=jnp.int32) - 1, 0)
  ties = take(row, c)
  return (r * cols + c).astype(jnp.uint32), take(ge, c) - ties, ties


class _Cut(NamedTuple):
  """What :func:`_radix_select` finds, per group (each ``[G]``).

  Attributes:
    key: uint32 ``t``, the largest key with ``#{key >= t} >= k``.
    position: uint32 ``q_t``, the tie cut: the entries with ``key > t`` or
      ``key == t and q >= q_t`` are the best ``k_keep`` (0: every tie,
      ``2^32 − 1``: none).
    above: int32 ``#{key > t}``.
    ties: int32 ``#{key == t}``.
  """
  key: jax.Array
  position: jax.Array
  above: jax.Array
  ties: jax.Array


# The first pass of a hinted selection resolves two digits for the groups
# whose answer lies within this many first-digit values of the hint's.
_HINT_RADIUS = 2


def _hint_radius(n: int, num_groups: int, width: int) -> int:
  """Rows ``R`` of a hinted first pass (``-1``: none) within the budget.

  Its histogram holds ``G·2^w`` first-digit bins plus ``G·(2R+1)·2^w``
  second-digit bins, within :func:`_digit_width`'s budget.
  """
  budget = max(n // 4, _HIST_FLOOR_WORDS)
  rows = budget // (num_groups << width) - 1
  return min(_HINT_RADIUS, (rows - 1) // 2)


def _radix_select(buckets: Sequence[_Bucket], num_groups: int, k: jax.Array,
                  blocking: _Blocking, *, key_bits: int = 32,
                  position_bits: int = 0, k_keep: jax.Array | None = None,
                  hint: jax.Array | None = None) -> _Cut:
  """Per group, the k-th largest key and, if needed, the tie cut.

  Ranks entries by the composite key ``(key, q)`` with ``q = 2^b − 2 − p``
  (``p`` the entry's flat index in its group, ``b = position_bits``), i.e.
  by key, ties by position. The k-th largest key ``t`` is found one digit at
  a time (most significant first): per pass, a histogram of the digit over
  the entries matching the prefix found so far, then a suffix sum picks the
  digit where the count of larger entries crosses ``k``. Then, if some
  group keeps only some of its ties (``0 < k_keep − #{key > t} < #{key ==
  t}``), the same passes run on over the position digits of the entries
  with ``key == t``, ranked with ``k_keep``; otherwise every tie is kept
  (``q_t = 0``) or none is (``q_t = 2^32 − 1``, where ``k_keep − #{key >
  t} <= 0``).

  The key's digits take ``ceil(key_bits/w)`` passes, the positions'
  ``ceil(b/w)``. All groups share the passes: each fills one ``[G, 2^w]``
  histogram (every tensor scatters into its group's row) and one batched
  suffix sum picks every group's digit. The passes are one ``while_loop``
  over one traced body, and the tensors of a bucket one loop in it, so the
  program holds one scatter per distinct tensor shape however many tensors
  and passes there are.

  **Hint.** Given ``hint`` (uint32 ``[G]``, keys expected near ``t``, e.g.
  the previous step's), the first pass is replaced by one that also counts
  the second digit of the entries whose first digit lies within ``R`` of
  the hint's (``2R + 1`` more histogram rows per group, ``R`` from the
  memory budget): its first-digit histogram is the usual one (those rows'
  totals added back), and if every group's first digit falls within its
  window, the matching row is the second pass's histogram, which is then
  skipped. Otherwise the loop goes on from the second pass. The result is
  the same whatever ``hint`` holds; a good one saves a pass.

  Args:
    buckets: the grouped tensors, bucketed by shape (:func:`_buckets`);
      keys below ``2^key_bits``.
    num_groups: G.
    k: int32 ``[G]``, the rank of ``t``.
    blocking: how tensors are cut into streamed blocks.
    key_bits: bits of the keys.
    position_bits: ``b`` with ``2^b >= size + 2`` of every group, or 0 for
      no tie cut (then ``q_t`` is 0 or ``2^32 − 1``).
    k_keep: int32 ``[G]``, the entries the tie cut keeps (default ``k``).
    hint: optional uint32 ``[G]`` (see above).

  Returns:
    A :class:`_Cut`: ``t`` is all-ones for ``k <= 0`` and 0 if ``k``
    exceeds the group's size; with ``k_keep = k`` in ``[1, size]`` the
    entries with ``key > t`` or ``key == t and q >= q_t`` are exactly the
    ``k`` best.
  """
  n = sum(len(b.members) * math.prod(b.shape) for b in buckets)
  k_keep = k if k_keep is None else k_keep
  width = _digit_width(n, num_groups, max(key_bits, position_bits))
  bins = 1 << width
  key_passes = -(-key_bits // width)
  pos_passes = -(-position_bits // width)
  key_top, pos_top = key_passes * width, pos_passes * width
  q_top = jnp.uint32((1 << position_bits) - 2 if position_bits else 0)
  drop = num_groups * bins  # past the end: mode="drop" discards

  def scatter(h, index):
    # Unsigned indices: no wrapping of negative ones to compute.
    index = index.astype(jnp.uint32)
    return h.at[index].add(1, mode="drop",
                           out_sharding=_replicated_if_explicit(index))

  def stream(add_block, hist):
    for bucket in buckets:
      hist = _stream_bucket(
          bucket, blocking,
          functools.partial(add_block, key_fn=bucket.key_fn), hist)
    return hist

  def cut_found(p, above, ties):
    # After the last key digit: does any group keep only some of its ties?
    need = k_keep - above
    return (p == key_passes) & jnp.any((need > 0) & (need < ties))

  def one_pass(carry):
    p, prefix, q_prefix, above, ties, key_above, key_ties, partial = carry
    on_key = p < key_passes
    # Shifts of this pass (int32, clipped to [0, 32]: a uint32 shifted by
    # >= 32 is 0 in XLA, which is the empty prefix of a first pass).
    shift = jnp.clip(key_top - width - width * p, 0, 32).astype(jnp.uint32)
    q_shift = jnp.clip(pos_top - width - width * (p - key_passes), 0,
                       32).astype(jnp.uint32)

    def add_block(h, index, parts, key_fn, g, offset):
      key = key_fn(index, *parts)
      mask = jnp.uint32(bins - 1)
      if position_bits:
        q = (q_top - jnp.asarray(offset).astype(jnp.uint32)
             - index.astype(jnp.uint32))
        digit = jnp.where(on_key, (key >> shift) & mask,
                          (q >> q_shift) & mask)
        match = jnp.where(
            on_key, (key >> (shift + width)) == prefix[g],
            (key == prefix[g]) & ((q >> (q_shift + width)) == q_prefix[g]))
      else:
        digit = (key >> shift) & mask
        match = (key >> (shift + width)) == prefix[g]
      # Entries outside the group's prefix go past the end, which
      # mode="drop" discards: one scatter filters and counts.
      return scatter(h, jnp.where(match, digit.astype(jnp.int32) + g * bins,
                                  drop))

    hist = stream(add_block, jnp.zeros((num_groups * bins,), jnp.int32))
    # The position digits rank the ties with k_keep.
    digit, above, ties = _select_digit(hist.reshape(num_groups, bins),
                                       jnp.where(on_key, k, k_keep), above)
    prefix = jnp.where(on_key, (prefix << width) | digit, prefix)
    q_prefix = jnp.where(on_key, q_prefix, (q_prefix << width) | digit)
    key_above = jnp.where(on_key, above, key_above)
    key_ties = jnp.where(on_key, ties, key_ties)
    partial = partial | cut_found(p + 1, above, ties)
    return (p + 1, prefix, q_prefix, above, ties, key_above, key_ties,
            partial)

  def more(carry):
    p, partial = carry[0], carry[-1]
    return (p < key_passes) | ((p < key_passes + pos_passes) & partial)

  zeros = jnp.zeros((num_groups,), jnp.int32)
  uzeros = jnp.zeros((num_groups,), jnp.uint32)
  radius = -1 if hint is None or key_passes < 2 else _hint_radius(
      n, num_groups, width)
  if radius < 0:
    start = (jnp.int32(0), uzeros, zeros, zeros)
  else:
    start = _hinted_first_pass(stream, scatter, num_groups, width, key_top,
                               radius, k, hint)
  p, prefix, above, ties = start
  carry = (p, prefix, uzeros, above, ties, above, ties,
           cut_found(p, above, ties))
  _, t, q_t, _, _, key_above, key_ties, _ = jax.lax.while_loop(
      more, one_pass, carry)
  # No tie kept where k_keep <= #{key > t} (the loop leaves q_t = 0 there
  # when no position pass ran).
  q_t = jnp.where(k_keep - key_above <= 0, jnp.uint32(0xFFFFFFFF), q_t)
  return _Cut(t, q_t, key_above, key_ties)


def _hinted_first_pass(stream, scatter, num_groups: int, width: int,
                       key_top: int, radius: int, k, hint):
  """The first pass of a hinted :func:`_radix_select`: ``(p, prefix, above,
  ties)`` after one digit (``p = 1``) or, where every group's first digit
  is within ``radius`` of its hint's, after two (``p = 2``)."""
  bins, rows = 1 << width, 2 * radius + 1
  # Two or more key digits: the first digit's shift is below 32.
  shift, low_shift = key_top - width, key_top - 2 * width
  g_all = jnp.arange(num_groups)
  first = lambda key: key >> jnp.uint32(shift)
  # The window's first row: the hint's first digit − R, kept in range.
  row0 = jnp.clip(first(jnp.asarray(hint, jnp.uint32)).astype(jnp.int32)
                  - radius, 0, bins - rows).astype(jnp.uint32)

  def add_block(h, index, parts, key_fn, g, offset):
    del offset
    key = key_fn(index, *parts)
    digit = first(key)
    row = digit - row0[g]  # wraps below the window: > rows − 1
    low = (key >> jnp.uint32(low_shift)) & jnp.uint32(bins - 1)
    index = jnp.where(
        row < rows,
        num_groups * bins + ((g * rows + row.astype(jnp.int32)) * bins
                             + low.astype(jnp.int32)),
        g * bins + digit.astype(jnp.int32))
    return scatter(h, index)

  size = num_groups * bins * (rows + 1)
  hist = stream(add_block, jnp.zeros((size,), jnp.int32))
  coarse = hist[:num_groups * bins].reshape(num_groups, bins)
  fine = hist[num_groups * bins:].reshape(num_groups, rows, bins)
  coarse = coarse.at[g_all[:, None],
                     row0.astype(jnp.int32)[:, None] + jnp.arange(rows)].add(
                         jnp.sum(fine, axis=2, dtype=jnp.int32))
  zeros = jnp.zeros((num_groups,), jnp.int32)
  d1, above1, ties1 = _select_digit(coarse, k, zeros)
  rel = d1 - row0
  hit = jnp.all(rel < rows)
  row = fine[g_all, jnp.minimum(rel, rows - 1).astype(jnp.int32)]
  d2, above2, ties2 = _select_digit(row, k, above1)
  pick = lambda a, b: jnp.where(hit, a, b)
  return (pick(jnp.int32(2), jnp.int32(1)), pick((d1 << width) | d2, d1),
          pick(above2, above1), pick(ties2, ties1))


# ----------------------------------------------------------------------------
# Argument checks.


def _freeze_groups(groups, num_tensors: int) -> tuple[tuple[int, ...], ...]:
  try:
    frozen = tuple(tuple(int(i) for i in g) for g in groups)
  except TypeError:
    raise ValueError(
        f"groups: must be a sequence of sequences of tensor indices, got "
        f"{groups!r}.") from None
  for g in frozen:
    for i in g:
      if not 0 <= i < num_tensors:
        raise ValueError(
            f"groups: index {i} is out of range for {num_tensors} tensors.")
  return frozen


def _check_k(k, num_groups: int, xp=jnp) -> jax.Array:
  """int32 ``[num_groups]`` (a jnp or, with ``xp=np``, NumPy array)."""
  k = xp.asarray(k)
  if not jnp.issubdtype(k.dtype, jnp.integer):
    raise ValueError(f"k: must hold integers, got dtype {k.dtype}.")
  if k.size != num_groups:
    raise ValueError(
        f"k: needs one count per group ({num_groups}), got shape {k.shape}.")
  return xp.reshape(k.astype(xp.int32), (num_groups,))


def _check_divisors(divisors, num: int) -> tuple[float, ...]:
  """The static divisors of :func:`magnitude_top_k` (default 1 each)."""
  divisors = ((1.0,) * num if divisors is None
              else tuple(float(d) for d in divisors))
  if len(divisors) != num:
    raise ValueError(f"divisors: {len(divisors)} for {num} weights.")
  return divisors


# ----------------------------------------------------------------------------
# Public API.


def kth_largest_keys(keys: Sequence[jax.Array],
                     groups: Sequence[Sequence[int]],
                     k: jax.Array) -> jax.Array:
  """Per group, the largest key ``t`` with ``#{key >= t} >= k``.

  Args:
    keys: uint32 key arrays (e.g. from :func:`sortable_key`).
    groups: for each group, the indices into ``keys`` of its tensors.
    k: int32 ``[num_groups]``, how many entries each group keeps.

  Returns:
    uint32 ``[num_groups]``: the k-th largest key of each group (for
    ``k <= 0`` the all-ones key, above every entry; for ``k`` above the
    group's size, key 0).

  Raises:
    ValueError: if a key array is not uint32, ``groups`` indexes past
      ``keys``, or ``k`` does not hold one integer per group.
  """
  keys = list(keys)
  for i, key in enumerate(keys):
    if jnp.asarray(key).dtype != jnp.uint32:
      raise ValueError(
          f"keys: entry {i} has dtype {jnp.asarray(key).dtype}; pass uint32 "
          "keys, e.g. from sortable_key.")
  groups = _freeze_groups(groups, len(keys))
  return _kth_largest_keys(keys, groups, _check_k(k, len(groups)), _blocking())


@functools.partial(jax.jit, static_argnums=(1, 3))
def _kth_largest_keys(keys, groups, k, blocking):
  buckets = _buckets([[x] for x in keys], lambda index, x: x, groups)
  return _radix_select(buckets, len(groups), k, blocking).key


def top_k_masks(scores: Sequence[jax.Array],
                groups: Sequence[Sequence[int]],
                k: jax.Array,
                eligible: Sequence[jax.Array] | None = None) -> list[jax.Array]:
  """Boolean masks keeping exactly the ``k[g]`` highest scores of each group.

  Args:
    scores: float arrays, any shapes.
    groups: a partition of ``range(len(scores))``; each group is ranked on its
      own. ``[[0, 1, ..., n-1]]`` is a global ranking, ``[[0], [1], ...]`` a
      per-tensor one.
    k: int ``[num_groups]``: entries to keep per group, ``0 <= k[g] <= size``
      (``k[g] <= 0`` keeps nothing, ``k[g] >= size`` everything).
    eligible: optional bool arrays like ``scores``; ineligible entries rank
      below all eligible ones (kept only if ``k`` exceeds the eligible count).

  Returns:
    A list of bool arrays shaped like ``scores``, True where kept. Each group
    holds exactly ``clip(k[g], 0, size)`` True entries: the same entries as
    a stable descending sort of the group's scores (concatenated in group
    order, each tensor row-major) with NaN ranked as ``-inf`` and ``-0.0``
    below ``+0.0``; among equal scores the earlier ones are kept.

  Raises:
    ValueError: if ``groups`` indexes past ``scores``, ``eligible`` does not
      match ``scores``, or ``k`` does not hold one integer per group.
  """
  scores = list(scores)
  groups = _freeze_groups(groups, len(scores))
  if eligible is not None:
    eligible = list(eligible)
    if len(eligible) != len(scores):
      raise ValueError(
          f"eligible: {len(eligible)} arrays for {len(scores)} score arrays.")
    for i, (s, e) in enumerate(zip(scores, eligible)):
      if jnp.shape(s) != jnp.shape(e):
        raise ValueError(
            f"eligible: entry {i} has shape {jnp.shape(e)}, scores "
            f"{jnp.shape(s)}.")
  return _top_k_masks(scores, groups, _check_k(k, len(groups)), eligible,
                      _blocking())


@functools.partial(jax.jit, static_argnums=(1, 4))
def _top_k_masks(scores, groups, k, eligible, blocking):
  # The keys are recomputed from the scores in every pass; were the scores'
  # producer fused into each pass, XLA could evaluate it at a different
  # precision in each (float16 arithmetic is emulated in float32 on CPU) and
  # the passes would disagree on the count. The barrier makes every pass read
  # the same stored scores.
  scores = jax.lax.optimization_barrier(list(scores))
  if eligible is None:
    arrays = [[x] for x in scores]
    key_fn = lambda index, s: sortable_key(s)
  else:
    arrays = [[x, e] for x, e in zip(scores, eligible)]
    key_fn = lambda index, s, e: _keys(s, e)
  return _top_k(arrays, key_fn, groups, k, blocking)[0]


def _position_bits(arrays, groups) -> int:
  """``b`` with ``2^b >= size + 2`` of every group."""
  largest = max((sum(math.prod(jnp.shape(arrays[i][0])) for i in g)
                 for g in groups), default=0)
  return int(largest + 1).bit_length()


def _top_k(arrays, key_fn, groups, k, blocking, *, k_keep=None, hint=None,
           stacked_masks: bool = True):
  """``(masks, cut)``: the masks of the ``k_keep`` (default ``k``) best
  entries of each group and the :class:`_Cut` of rank ``k``.

  ``arrays[i]`` are tensor ``i``'s like-shaped arrays and ``key_fn(index,
  *blocks)`` their keys. With ``stacked_masks`` the masks of same-shaped
  tensors come from one loop over their stack (one loop body per shape);
  without, each mask is an elementwise expression of its tensor's own
  arrays, which XLA fuses into the mask's consumers (no stacked copy).
  """
  buckets = _buckets(arrays, key_fn, groups)
  key_fns = [key_fn] * len(arrays) if callable(key_fn) else list(key_fn)
  bits = _position_bits(arrays, groups)
  cut = _radix_select(buckets, len(groups), k, blocking, position_bits=bits,
                      k_keep=k_keep, hint=hint)
  t, q_t = cut.key, cut.position
  q_top = jnp.uint32((1 << bits) - 2)

  def member_masks(arrays, g, offset, key_fn):
    # Elementwise in the tensor's own shape (fused; keys recomputed, never
    # stored), so the mask keeps the scores' sharding.
    src = _Source(arrays, key_fn, jnp.shape(arrays[0]), blocking)
    key = src.keys()
    shape = src.block_shape
    index = jnp.reshape(
        _flat_index(shape, (0,) * len(shape), shape, src.arrays[0]), src.shape)
    q = q_top - jnp.asarray(offset).astype(jnp.uint32) - index.astype(
        jnp.uint32)
    return (key > t[g]) | ((key == t[g]) & (q >= q_t[g]))

  masks = [jnp.zeros(jnp.shape(x[0]), jnp.bool_) for x in arrays]
  for b in buckets:
    if len(b.members) == 1 or not stacked_masks:
      for m, i in enumerate(b.members):
        masks[i] = member_masks(arrays[i], int(b.groups[m]),
                                int(b.offsets[m]), key_fns[i])
      continue
    # One loop body per shape (sliced out of one batched expression, the
    # masks would be compiled once per tensor).
    stacked = jax.lax.map(
        lambda xs, b=b: member_masks(list(xs[:-2]), xs[-2], xs[-1], b.key_fn),
        (*b.arrays, jnp.asarray(b.groups), jnp.asarray(b.offsets)))
    for n, i in enumerate(b.members):
      masks[i] = stacked[n]
  return masks, cut


def _nonnegative_key(a: jax.Array) -> jax.Array:
  """:func:`sortable_key` of float32 scores that are ``>= +0`` or NaN.

  The same keys with fewer operations: the float's bits with the sign bit
  set, NaN as ``-inf``'s key.
  """
  return _nonnegative_key_of_bits(jax.lax.bitcast_convert_type(a, jnp.uint32))


def _nonnegative_key_of_bits(bits, xp=jnp):
  """:func:`_nonnegative_key` from the float32 bits (jnp or NumPy)."""
  return xp.where(bits > np.uint32(0x7F800000), np.uint32(0x007FFFFF),
                  bits | _SIGN)


def _magnitude(w, divisor: float, xp=jnp):
  """The float32 score ``|w|/d`` (``|w|`` for ``d = 1``), jnp or NumPy."""
  a = xp.abs(w).astype(xp.float32)
  return a if divisor == 1.0 else a / xp.float32(divisor)


@functools.lru_cache(maxsize=None)
def _magnitude_key(divisor: float) -> Callable[..., jax.Array]:
  """``key_fn`` of the scores ``|w|/d`` (float32; ``|w|`` for ``d = 1``)."""

  def key_fn(index, w):
    del index
    return _nonnegative_key(_magnitude(w, divisor))

  return key_fn


def magnitude_scores(weights: Sequence[jax.Array],
                     divisors: Sequence[float] | None = None
                     ) -> list[jax.Array]:
  """The float32 scores ``|w|/d`` that :func:`magnitude_top_k` ranks
  (``|w|`` where ``d = 1``)."""
  divisors = [1.0] * len(weights) if divisors is None else divisors
  return [_magnitude(w, d) for w, d in zip(weights, divisors)]


def magnitude_top_k(weights: Sequence[jax.Array],
                    groups: Sequence[Sequence[int]], k: jax.Array, *,
                    divisors: Sequence[float] | None = None,
                    hint: jax.Array | None = None
                    ) -> tuple[list[jax.Array], jax.Array]:
  """:func:`top_k_masks` of the magnitudes ``|w|/d``, and the cut: the key
  of the best score each group drops.

  The scores are never stored: every pass recomputes them from the weights
  (exactly rounded float32 arithmetic, the same in every pass), tensors of
  one shape, dtype and divisor are stacked once (a copy of the weights, not
  of float32 scores), and each mask is an elementwise expression of its own
  weights (fused into its consumers). One radix select finds the ``k +
  1``-th largest score, whose key is the cut, and, only where ties at it
  must be cut, the tied positions; so a threshold (ST-3's ``τ``, the largest
  pruned score) and the masks cost one selection.

  Args:
    weights: float arrays (e.g. raw weights).
    groups: a partition of ``range(len(weights))``, as in
      :func:`top_k_masks`.
    k: int ``[num_groups]``, ``0 <= k[g] <= size``: entries kept.
    divisors: optional static positive floats, one per tensor (default 1):
      the scores are ``|w|.astype(float32) / float32(d)``
      (:func:`magnitude_scores`).
    hint: optional uint32 ``[num_groups]``: keys expected near each group's
      ``k + 1``-th score (e.g. the previous step's cut); a close one saves a
      pass (:func:`_radix_select`). The results do not depend on it.

  Returns:
    ``(masks, cut)``: the masks of :func:`top_k_masks` on the scores
    (exactly ``k[g]`` kept, ties by position, the earlier kept) and uint32
    ``[num_groups]``, the :func:`sortable_key` of the largest score each
    group drops (0 where it drops nothing).
  """
  weights = list(weights)
  groups = _freeze_groups(groups, len(weights))
  divisors = _check_divisors(divisors, len(weights))
  k = _check_k(k, len(groups))
  if hint is not None:
    hint = jnp.reshape(jnp.asarray(hint, jnp.uint32), (len(groups),))
  return _magnitude_top_k(weights, groups, k, divisors, hint, _blocking())


@functools.partial(jax.jit, static_argnums=(1, 3, 5))
def _magnitude_top_k(weights, groups, k, divisors, hint, blocking):
  masks, cut = _top_k(
      [[w] for w in weights], [_magnitude_key(d) for d in divisors], groups,
      k + 1, blocking, k_keep=k, hint=hint, stacked_masks=False)
  return masks, cut.key


def magnitude_top_k_host(weights: Sequence[np.ndarray],
                         groups: Sequence[Sequence[int]], k,
                         divisors: Sequence[float] | None = None
                         ) -> tuple[list[np.ndarray], np.ndarray]:
  """:func:`magnitude_top_k` in NumPy, on the host: the same masks and cut.

  For a selection that runs once on concrete arrays (a method's ``init``):
  it compiles nothing. Per group, ``np.partition`` finds the ``k``-th
  largest key ``t``; the kept entries are those above ``t`` and the first
  ``k − #{key > t}`` entries equal to ``t`` in group order.

  Args:
    weights: NumPy (or host-readable) float arrays.
    groups, k, divisors: as :func:`magnitude_top_k`.

  Returns:
    ``(masks, cut)``: NumPy bool masks like ``weights`` (all False outside
    every group) and uint32 ``[num_groups]`` cut keys.
  """
  weights = [np.asarray(w) for w in weights]
  groups = _freeze_groups(groups, len(weights))
  k = _check_k(k, len(groups), np)
  divisors = _check_divisors(divisors, len(weights))
  keys = [_nonnegative_key_of_bits(_magnitude(w, d, np).view(np.uint32), np)
          for w, d in zip(weights, divisors)]
  masks = [np.zeros(np.shape(w), bool) for w in weights]
  cut = np.zeros(len(groups), np.uint32)
  for g, members in enumerate(groups):
    if not members:
      continue
    flat = np.concatenate([keys[i].ravel() for i in members])
    size = flat.size
    count = int(np.clip(k[g], 0, size))
    kept = np.zeros(size, bool)
    if count:
      t = np.partition(flat, size - count)[size - count]  # k-th largest
      kept = flat > t
      ties = np.flatnonzero(flat == t)[:count - int(kept.sum())]
      kept[ties] = True
    if count < size:
      cut[g] = flat[~kept].max()
    start = 0
    for i in members:
      n = keys[i].size
      masks[i] = kept[start:start + n].reshape(np.shape(weights[i]))
      start += n
  return masks, cut


def top_k_mask(scores: jax.Array, k: jax.Array,
               eligible: jax.Array | None = None) -> jax.Array:
  """Single-tensor :func:`top_k_masks`: keeps exactly ``k`` entries."""
  return top_k_masks([scores], [[0]], jnp.reshape(jnp.asarray(k), (1,)),
                     None if eligible is None else [eligible])[0]
