"""Tests for exact top-k selection (flipout_jax.selection).

Every mask is compared with a stable descending sort of the group's keys in
NumPy. Most tests shrink the streaming chunk so that small
arrays exercise the chunk loop and its remainder; one test
runs at the real chunk size. Must stay well under a minute on two slow CPUs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipout_jax import selection


@pytest.fixture(params=[False, True], ids=["contiguous", "strided"])
def small_chunks(monkeypatch, request):
  """Blocks of about 256 entries, contiguous (one device) or strided
  (several devices), whatever this process's device count (the blocking
  is a static argument of the jitted implementation, so these tests get
  their own compiled programs)."""
  monkeypatch.setattr(selection, "_blocking",
                      lambda: selection._Blocking(256, request.param))


def _ref_keys(scores, eligible=None):
  keys = np.asarray(selection.sortable_key(jnp.asarray(scores))).astype(np.int64)
  if eligible is not None:
    keys = np.where(np.asarray(eligible), keys, 0)
  return keys


def _reference(scores, groups, k, eligible=None):
  """Stable descending sort of each group's keys (NaN as -inf, -0 < +0)."""
  out = [None] * len(scores)
  for g, members in enumerate(groups):
    keys = np.concatenate([
        _ref_keys(scores[i], None if eligible is None else eligible[i]).ravel()
        for i in members])
    order = np.argsort(-keys, kind="stable")
    flat = np.zeros(keys.size, bool)
    flat[order[:max(int(k[g]), 0)]] = True
    offset = 0
    for i in members:
      size = np.size(scores[i])
      out[i] = flat[offset:offset + size].reshape(np.shape(scores[i]))
      offset += size
  return out


def _assert_matches(scores, groups, k, eligible=None):
  got = selection.top_k_masks([jnp.asarray(s) for s in scores], groups,
                              jnp.asarray(k, jnp.int32),
                              None if eligible is None
                              else [jnp.asarray(e) for e in eligible])
  want = _reference(scores, groups, k, eligible)
  for g, members in enumerate(groups):
    kept = sum(int(np.sum(np.asarray(got[i]))) for i in members)
    total = sum(np.size(scores[i]) for i in members)
    assert kept == min(max(int(k[g]), 0), total)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), b)


# Shapes crossing the small chunk size (256): 1-D and 4-D views, a whole
# tensor of exactly one chunk, and (4, 263) without divisors that fill a
# block (the contiguous fallback with a remainder).
SHAPES = [(700,), (3, 100), (1,), (256,), (4, 263), (2, 3, 8, 10)]
ALL = list(range(len(SHAPES)))


def _draw(kind, rng, shape):
  if kind == "random":
    return rng.normal(size=shape).astype(np.float32)
  if kind == "tied":
    return rng.integers(0, 4, shape).astype(np.float32)
  if kind == "equal":
    return np.full(shape, 0.5, np.float32)
  if kind == "extreme":
    values = np.array([-np.inf, np.inf, -0.0, 0.0, -1.0, 3.0, -1e-30, 1e30],
                      np.float32)
    return rng.choice(values, shape)
  raise ValueError(kind)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("kind", ["random", "tied", "equal", "extreme"])
def test_global_group_matches_stable_sort(kind):
  rng = np.random.default_rng(0)
  scores = [_draw(kind, rng, s) for s in SHAPES]
  total = sum(np.size(s) for s in scores)
  for k in (0, 1, 17, total // 3, total // 2 + 1, total - 1, total):
    _assert_matches(scores, [ALL], [k])


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("kind", ["random", "tied"])
def test_per_tensor_and_mixed_groups(kind):
  rng = np.random.default_rng(1)
  scores = [_draw(kind, rng, s) for s in SHAPES]
  _assert_matches(scores, [[i] for i in ALL], [350, 0, 1, 255, 600, 77])
  _assert_matches(scores, [[2, 0, 5], [3, 1, 4]], [300, 900])


@pytest.mark.usefixtures("small_chunks")
def test_eligible_ranked_last_and_never_preferred():
  rng = np.random.default_rng(2)
  scores = [_draw("tied", rng, s) for s in SHAPES]
  eligible = [rng.random(s) < 0.6 for s in SHAPES]
  n_eligible = sum(int(e.sum()) for e in eligible)
  for k in (10, n_eligible - 3, n_eligible, n_eligible + 5):
    _assert_matches(scores, [ALL], [k], eligible)


@pytest.mark.usefixtures("small_chunks")
def test_k_outside_range():
  s = np.arange(300, dtype=np.float32)
  _assert_matches([s], [[0]], [-3])      # keeps nothing
  _assert_matches([s], [[0]], [10_000])  # keeps everything


def test_real_chunk_size_with_tie_cut_across_tensors():
  # 2 full chunks + remainder in the first tensor; the k-th score is tied
  # across both tensors, so the position pass runs over real chunks.
  rng = np.random.default_rng(3)
  a = rng.integers(0, 8, (2 * selection._CHUNK + 1000,)).astype(np.float32)
  b = rng.integers(0, 8, (5, 999)).astype(np.float32)
  total = a.size + b.size
  _assert_matches([a, b], [[0, 1]], [total // 2])
  _assert_matches([a, b], [[1, 0]], [total // 8 + 3])


@pytest.mark.parametrize("shape", [(700,), (4096, 4096), (3, 3, 512, 512),
                                   (784, 300), (6000,), (8, 8, 16, 12)])
@pytest.mark.parametrize("chunk", [256, 65536, 8 * 65536])
def test_block_views_tile_the_tensor(shape, chunk):
  size = int(np.prod(shape))
  for view_fn in (selection._strided_view, selection._contiguous_view):
    view = view_fn(shape, chunk)
    if view is None:
      continue
    assert tuple(r * q * l for r, q, l in view) == shape
    block = int(np.prod([r * l for r, _, l in view]))
    assert chunk // selection._MIN_FILL <= block <= chunk or size <= chunk
    if view_fn is selection._contiguous_view:
      assert all(r == 1 for r, _, _ in view)
  # Strided blocks keep the power of two of big axes (shard counts), e.g.
  # 4096 x 4096 over 8 devices: >= 256 evenly spaced rows and columns.
  if shape == (4096, 4096) and chunk == 8 * 65536:
    (r0, _, _), (r1, _, _) = selection._strided_view(shape, chunk)
    assert r0 % 256 == 0 and r1 % 256 == 0


def test_nan_ranks_as_minus_inf_and_signed_zero_order():
  s = jnp.array([-3.0, jnp.nan, -jnp.inf, 2.0, -0.0, 0.0, jnp.inf, -1e-30])
  np.testing.assert_array_equal(
      selection.top_k_mask(s, 5), [False, False, False, True, True, True,
                                   True, True])
  # +0.0 above -0.0; NaN ties with -inf and comes first by position.
  np.testing.assert_array_equal(selection.top_k_mask(s, 3)[4:6], [False, True])
  np.testing.assert_array_equal(selection.top_k_mask(s, 7)[1:3], [True, False])


@pytest.mark.usefixtures("small_chunks")
def test_kth_largest_keys_matches_sort():
  rng = np.random.default_rng(4)
  scores = [_draw("tied", rng, (300,)), _draw("random", rng, (7, 50))]
  keys = [selection.sortable_key(jnp.asarray(s)) for s in scores]
  flat = np.sort(np.concatenate([np.asarray(x).ravel() for x in keys]))[::-1]
  for k in (1, 2, 299, 650):
    t = selection.kth_largest_keys(keys, [[0, 1]], jnp.array([k]))
    assert int(t[0]) == int(flat[k - 1])
  t = selection.kth_largest_keys(keys, [[0], [1]], jnp.array([0, 351]))
  assert int(t[0]) == 0xFFFFFFFF  # k = 0: above every key
  assert int(t[1]) == 0           # k > size: below every key


@pytest.mark.usefixtures("small_chunks")
def test_jit_with_traced_k_and_vmap():
  rng = np.random.default_rng(5)
  s = jnp.asarray(_draw("tied", rng, (2, 300)))

  @jax.jit
  def f(s, k):
    return selection.top_k_masks([s[0], s[1]], [[0, 1]], k[None])

  for k in (5, 333):
    got = f(s, jnp.int32(k))
    want = _reference([np.asarray(s[0]), np.asarray(s[1])], [[0, 1]], [k])
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), b)
  batched = jax.vmap(lambda x, k: selection.top_k_mask(x, k))(
      s, jnp.array([3, 100]))
  np.testing.assert_array_equal(batched.sum(axis=1), [3, 100])


def _magnitude_reference(weights, groups, k, divisors=None):
  """Masks and cut of ``magnitude_top_k`` by a stable sort of the keys."""
  divisors = [1.0] * len(weights) if divisors is None else divisors
  scores = [np.abs(w).astype(np.float32) / np.float32(d)
            for w, d in zip(weights, divisors)]
  masks = _reference(scores, groups, k)
  cut = []
  for g, members in enumerate(groups):
    keys = np.concatenate([_ref_keys(scores[i]).ravel() for i in members])
    dropped = np.sort(keys)[::-1][int(k[g]):]
    cut.append(int(dropped[0]) if dropped.size else 0)
  return masks, cut


def _hints(rng, cut):
  """Hints from the exact cut to garbage: the result must not change."""
  cut = np.asarray(cut, np.int64)
  return [cut, cut + 1, np.maximum(cut - 70_000, 0), cut + 200_000,
          np.zeros_like(cut), np.full_like(cut, 0xFFFFFFFF),
          rng.integers(0, 2**32, cut.shape)]


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("kind", ["random", "tied", "equal", "extreme"])
def test_magnitude_top_k_matches_sort_whatever_the_hint(kind):
  rng = np.random.default_rng(6)
  weights = [_draw(kind, rng, s) for s in SHAPES]
  divisors = [1.0, 0.5, 1.0, 3.0, 1.0, 0.1]
  total = sum(np.size(w) for w in weights)
  # (groups, k, divisors): one compiled program per groups and divisors.
  cases = [([ALL], [k], divisors) for k in (0, 1, total // 3, total - 1,
                                            total)]
  cases.append(([[2, 0, 5], [3, 1, 4]], [300, 900], None))
  cases.append(([[i] for i in ALL], [350, 0, 1, 255, 600, 77], None))
  for groups, k, div in cases:
    want_masks, want_cut = _magnitude_reference(weights, groups, k, div)
    # Unhinted only for the k = 0 case (a program of its own).
    for hint in _hints(rng, want_cut) if k[0] else [None]:
      masks, cut = selection.magnitude_top_k(
          [jnp.asarray(w) for w in weights], groups, jnp.asarray(k),
          divisors=div, hint=None if hint is None else jnp.asarray(
              hint.astype(np.uint32)))
      np.testing.assert_array_equal(np.asarray(cut), want_cut)
      for a, b in zip(masks, want_masks):
        np.testing.assert_array_equal(np.asarray(a), b)
    host_masks, host_cut = selection.magnitude_top_k_host(
        weights, groups, k, div)
    np.testing.assert_array_equal(host_cut, want_cut)
    for a, b in zip(host_masks, want_masks):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("host", [False, True])
def test_magnitude_top_k_refuses_bad_divisors_and_k(host):
  # The device and host selections share their checks: each error names
  # its argument.
  select = (selection.magnitude_top_k_host if host else
            lambda w, g, k, divisors=None: selection.magnitude_top_k(
                [jnp.asarray(x) for x in w], g, k, divisors=divisors))
  weights = [np.ones((4, 3), np.float32), np.ones((5,), np.float32)]
  with pytest.raises(ValueError, match="^divisors: 1 for 2 weights"):
    select(weights, [[0, 1]], [3], divisors=[2.0])
  with pytest.raises(ValueError, match="^k: must hold integers"):
    select(weights, [[0, 1]], [2.5])
  with pytest.raises(ValueError, match=r"^k: needs one count per group \(2\)"):
    select(weights, [[0], [1]], [1])


def test_hinted_first_pass_resolves_two_digits_near_the_hint():
  # The point of the hint: with the answer's first digit within the window,
  # the first pass also yields the second digit (p = 2, one pass saved);
  # far from it, the loop goes on from the second pass (p = 1). Either way
  # its counts are those of the passes it stands for.
  rng = np.random.default_rng(7)
  w = jnp.asarray(rng.normal(size=(3000,)).astype(np.float32))
  key_fn = selection._magnitude_key(1.0)
  buckets = selection._buckets([[w]], key_fn, ((0,),))
  blocking = selection._Blocking(256, False)
  k = jnp.array([1234], jnp.int32)
  keys = np.sort(np.asarray(key_fn(None, w)))[::-1]
  t = int(keys[1233])
  stream = lambda add, h: selection._stream_bucket(
      buckets[0], blocking, functools.partial(add, key_fn=key_fn), h)
  scatter = lambda h, i: h.at[i.astype(jnp.uint32)].add(1, mode="drop")
  radius = selection._hint_radius(w.size, 1, 16)
  assert radius >= 1
  for hint, passes in ((t, 2), (t + (1 << 16), 2), (t >> 1, 1), (0, 1)):
    p, prefix, above, ties = selection._hinted_first_pass(
        stream, scatter, 1, 16, 32, radius, k, jnp.array([hint], jnp.uint32))
    assert int(p) == passes, hex(hint)
    shift = 32 - 16 * passes
    assert int(prefix[0]) == t >> shift
    assert int(above[0]) == int(np.sum((keys >> shift) > (t >> shift)))
    assert int(ties[0]) == int(np.sum((keys >> shift) == (t >> shift)))


def test_memory_stays_below_scores():
  n = 1 << 22
  spec = jax.ShapeDtypeStruct((n,), jnp.float32)
  mem = jax.jit(lambda s: selection.top_k_mask(s, n // 10)).lower(
      spec).compile().memory_analysis()
  # Temporaries: O(chunk) + histogram, not O(n) keys.
  assert mem.temp_size_in_bytes < 0.1 * 4 * n
  assert mem.output_size_in_bytes == n  # the bool mask


def test_digit_width_respects_memory_budget():
  # The fewest passes within the budget, each digit as narrow as that allows.
  assert selection._digit_width(10**6, 1, 32) == 16
  assert selection._digit_width(10, 1, 32) == 16  # the 1 MiB floor
  assert selection._digit_width(10**6, 20, 32) == 11  # 20·2^16 > 2^18 words
  assert selection._digit_width(10**8, 20, 32) == 16
  assert selection._digit_width(10**3, 5000, 32) == 5  # 5000·2^6 > 2^18
  assert selection._digit_width(10**6, 1, 9) == 9  # one pass for 9 bits
  assert selection._digit_width(10**6, 1, 8) == 8
  assert selection._digit_width(10**6, 1, 4) == 4
  assert selection._digit_width(10**6, 1, 3) == 4  # at least 4
  for n, groups in ((10**6, 1), (10**7, 50), (10**8, 1000), (10**6, 75)):
    width = selection._digit_width(n, groups, 32)
    assert (groups << width) <= max(n // 4, 1 << 18)
    # One pass fewer would need a wider digit than the budget holds.
    passes = -(-32 // width)
    if passes > 2:
      assert (groups << -(-32 // (passes - 1))) > max(n // 4, 1 << 18)


def test_argument_errors():
  s = jnp.ones((4,))
  with pytest.raises(ValueError, match="groups"):
    selection.top_k_masks([s], [[0, 1]], jnp.array([1]))
  with pytest.raises(ValueError, match="k:"):
    selection.top_k_masks([s], [[0]], jnp.array([1, 2]))
  with pytest.raises(ValueError, match="k:"):
    selection.top_k_masks([s], [[0]], jnp.array([1.5]))
  with pytest.raises(ValueError, match="eligible"):
    selection.top_k_masks([s], [[0]], jnp.array([1]), [jnp.ones((3,), bool)])
  with pytest.raises(ValueError, match="keys"):
    selection.kth_largest_keys([s], [[0]], jnp.array([1]))
