"""Exact top-k selection over one or many tensors, without sorting.

"Keep the k highest scores" is the one selection rule every method uses: a
global ranking is one *group* holding every prunable tensor, a layer-wise
ranking is one group per tensor. Selection is exact in count: it keeps exactly
``k`` entries of each group, breaking ties by position (earlier tensors first,
then row-major order), so the same scores always give the same mask.

The k-th largest score is found by bisection on the bits of the scores mapped
to order-preserving unsigned integers: 32 counting passes over the data, each
an elementwise compare and a sum. This costs O(32·n) with O(n) memory and no
sort, and the passes are plain reductions, so under ``jax.sharding`` each
device counts its own shard and only scalars cross devices.

Ineligible entries (e.g. weights already pruned, which must never be revived)
are ranked strictly below every eligible one, whatever their score.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

_SIGN = jnp.uint32(0x80000000)


def sortable_key(scores: jax.Array) -> jax.Array:
  """Maps float scores to uint32 keys with the same order.

  NaN is treated as ``-inf``. The smallest key a score can map to is that of
  ``-inf`` (0x007FFFFF), so keys 0 .. 0x007FFFFE are free to mark ineligible
  entries.

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


def _keys(scores, eligible):
  key = sortable_key(scores)
  if eligible is None:
    return key
  return jnp.where(eligible, key, jnp.uint32(0))


def kth_largest_keys(keys: Sequence[jax.Array],
                     groups: Sequence[Sequence[int]],
                     k: jax.Array) -> jax.Array:
  """Per group, the largest key ``t`` with ``#{key >= t} >= k``.

  Args:
    keys: uint32 key arrays.
    groups: for each group, the indices into ``keys`` of its tensors.
    k: int32 ``[num_groups]``, how many entries each group keeps.

  Returns:
    uint32 ``[num_groups]``: the k-th largest key of each group (for
    ``k == 0`` the all-ones key, above every entry).
  """
  k = jnp.asarray(k, jnp.int32)

  def count_at_least(cand):
    return jnp.stack([
        sum(jnp.sum(keys[i] >= cand[g], dtype=jnp.int32) for i in members)
        for g, members in enumerate(groups)
    ])

  def body(bit, prefix):
    cand = prefix | jnp.left_shift(jnp.uint32(1), (31 - bit).astype(jnp.uint32))
    return jnp.where(count_at_least(cand) >= k, cand, prefix)

  prefix = jnp.zeros((len(groups),), jnp.uint32)
  return jax.lax.fori_loop(0, 32, body, prefix)


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
    k: int ``[num_groups]``: entries to keep per group, ``0 <= k[g] <= size``.
    eligible: optional bool arrays like ``scores``; ineligible entries rank
      below all eligible ones (kept only if ``k`` exceeds the eligible count).

  Returns:
    A list of bool arrays shaped like ``scores``, True where kept. Each group
    holds exactly ``k[g]`` True entries; among equal scores the earlier ones
    (by tensor order in the group, then row-major) are kept.
  """
  if eligible is None:
    keys = [sortable_key(s) for s in scores]
  else:
    keys = [_keys(s, e) for s, e in zip(scores, eligible)]
  k = jnp.asarray(k, jnp.int32)
  threshold = kth_largest_keys(keys, groups, k)
  masks = [None] * len(keys)
  for g, members in enumerate(groups):
    t = threshold[g]
    above = sum(jnp.sum(keys[i] > t, dtype=jnp.int32) for i in members)
    ties_to_keep = k[g] - above
    ties_before = jnp.int32(0)
    for i in members:
      tie = keys[i] == t
      rank = jnp.cumsum(tie.ravel(), dtype=jnp.int32).reshape(tie.shape)
      rank = rank + ties_before  # 1-based rank of each tie within the group
      masks[i] = (keys[i] > t) | (tie & (rank <= ties_to_keep))
      ties_before = ties_before + jnp.sum(tie, dtype=jnp.int32)
  return masks


def top_k_mask(scores: jax.Array, k: jax.Array,
               eligible: jax.Array | None = None) -> jax.Array:
  """Single-tensor :func:`top_k_masks`: keeps exactly ``k`` entries."""
  return top_k_masks([scores], [[0]], jnp.reshape(k, (1,)),
                     None if eligible is None else [eligible])[0]
