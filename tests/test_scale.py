"""The compiled program grows with the distinct tensor shapes, not the tensors.

Per-leaf work that is heavy to compile (the selection's histogram scatters,
the noise's random draws and inverse CDF, the random initial masks) runs as
one loop per (shape, dtype) group of leaves. These tests count those ops in
the lowered programs of a model with 2 and with 6 same-shape layers (the
counts must not move) and check that the batched noise and random masks are
the numbers of one draw per leaf.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import prng


def _params(n):
  return {f"l{i}": {"kernel": jnp.arange(128.0).reshape(16, 8) * (i + 1) - 40,
                    "bias": jnp.ones((32,)) * i} for i in range(n)}


def _ops(text):
  """Histogram scatters, inverse CDFs and random draws of >= 16 words (the
  draws of tensors; a split of the <= 12 leaves' keys draws fewer)."""
  draws = re.findall(r"call @threefry2x32\w*\(.*?tensor<ui32>, tensor<ui32>, "
                     r"tensor<([\dx]+)xui32>", text)
  return {"scatter": text.count("stablehlo.scatter"),
          "erf_inv": text.count("erf_inv"),
          "draws": sum(math.prod(int(d) for d in s.split("x")) >= 16
                       for s in draws)}


METHODS = {
    "global_magnitude": lambda: fj.global_magnitude(
        optax.sgd(0.1), sparsity=0.5, every=1),
    "flipout": lambda: fj.flipout(optax.sgd(0.1), sparsity=0.5, every=1),
    "layerwise magnitude": lambda: fj.global_magnitude(
        optax.sgd(0.1), sparsity=0.5, every=1, distribution="uniform"),
    "rigl": lambda: fj.rigl(optax.sgd(0.1), sparsity=0.5, every=1,
                            end_step=10),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_update_program_does_not_grow_with_same_shape_leaves(name):
  counts = []
  for n in (2, 6):
    params = _params(n)
    tx = METHODS[name]()
    state = tx.init(params)
    grads = jax.tree.map(lambda p: p * 0.01, params)
    counts.append(_ops(jax.jit(tx.update).lower(grads, state, params)
                       .as_text()))
  assert counts[0] == counts[1], counts
  assert counts[0]["scatter"] >= 1  # the selection is in there


def _init_ops(text):
  """The heavy ops of a random-mask init: hash calls, loops, sorts,
  scatters and reductions."""
  return {"threefry": len(re.findall(r"call @threefry2x32", text)),
          "while": text.count("stablehlo.while"),
          "sort": text.count("stablehlo.sort"),
          "scatter": text.count("stablehlo.scatter"),
          "reduce": text.count("stablehlo.reduce")}


@pytest.mark.parametrize("name", ["rigl", "dst_ee", "set_"])
def test_random_initial_masks_program_does_not_grow_with_leaves(name):
  counts = []
  for n in (2, 6):
    tx = fj.registry.build(name, optax.sgd(0.1), sparsity=0.5, every=1,
                           end_step=10)
    params = _params(n)
    jax.clear_caches()
    # The random masks' own program (init runs it on the leaves' layout).
    text = None
    real = fj.structure._random_top_k_rows

    def spy(*args):
      nonlocal text
      text = real.lower(*args).as_text()
      return real(*args)

    fj.structure._random_top_k_rows = spy
    try:
      tx.init(params)
    finally:
      fj.structure._random_top_k_rows = real
    assert text is not None, "init did not run the random masks' program"
    counts.append((_ops(text), _init_ops(text)))
  assert counts[0] == counts[1], counts
  # The key split and every leaf's draws are fused hashes (prng.threefry2x32),
  # not calls of the threefry primitive; one loop bisects every group.
  assert counts[0][1]["threefry"] == 0
  assert counts[0][1]["while"] == 1
  assert counts[0][1]["sort"] == 0


@pytest.mark.parametrize("exact", [False, True])
def test_grouped_noise_is_the_per_leaf_draw(exact):
  grads = {"a": jnp.ones((4, 6)), "b": jnp.full((4, 6), 2.0),
           "c": jnp.full((4, 6), -3.0), "d": jnp.ones((5,)),
           "e": jnp.full((5,), 0.5), "f": jnp.ones((3, 2), jnp.bfloat16),
           "i": jnp.ones((4, 6), jnp.int32)}
  selected = {k: k != "e" for k in grads}
  key = jax.random.PRNGKey(7)
  out = jax.jit(lambda g, k: fj.noise.add_gradient_noise(
      g, k, 0.5, selected, exact=exact))(grads, key)
  # The reference: one draw per leaf, each leaf's own key (as before the
  # grouping), in one program.
  def per_leaf(grads, key):
    keys = optax.tree.split_key_like(key, grads)

    def one(g, k, sel):
      if not sel or not jnp.issubdtype(g.dtype, jnp.floating):
        return g
      e = (jax.random.normal(k, g.shape, jnp.float32) if exact
           else fj.noise.normal16(k, g.shape))
      return (g + fj.noise.noise_std(g, 0.5) * e).astype(g.dtype)

    return jax.tree.map(one, grads, keys, selected)

  want = jax.jit(per_leaf)(grads, key)
  for name, g in grads.items():
    assert out[name].dtype == g.dtype
    np.testing.assert_array_equal(np.asarray(out[name], np.float32),
                                  np.asarray(want[name], np.float32),
                                  err_msg=name)
    assert selected[name] != np.array_equal(out[name], g) or name == "i"


def test_grouped_random_masks_are_the_per_leaf_draws():
  # Uniform draws per leaf (leaf i with key split(key)[i]), the `keep`
  # highest of each layer kept: the same masks as ranking a per-leaf draw.
  shapes = ((16, 8), (16, 8), (8,), (16, 8))
  key = jax.random.PRNGKey(3)
  keep = (40, 100, 3, 7)
  masks = fj.structure._random_top_k(key, shapes, ((0,), (1,), (2,), (3,)),
                                     keep)
  keys = jax.random.split(key, len(shapes))
  for i, (shape, k) in enumerate(zip(shapes, keep)):
    u = np.asarray(jax.random.uniform(keys[i], shape)).ravel()
    order = np.argsort(-u, kind="stable")
    want = np.zeros(u.size, bool)
    want[order[:k]] = True
    np.testing.assert_array_equal(np.asarray(masks[i]).ravel(), want)


def _reference_masks(key, shapes, groups, keep, guard=0):
  """Stable descending sort of each group's per-leaf uniform draws (NumPy),
  each leaf's min(guard, size) highest draws first."""
  keys = jax.random.split(key, len(shapes))
  draws = [np.asarray(jax.random.uniform(k, s)).ravel()
           for k, s in zip(keys, shapes)]
  if guard:
    for i, u in enumerate(draws):
      top = np.argsort(-u, kind="stable")[:min(guard, u.size)]
      u = u.copy()
      u[top] = 2.0
      draws[i] = u
  out = [np.zeros(u.size, bool) for u in draws]
  for g, members in enumerate(groups):
    cat = np.concatenate([draws[i] for i in members])
    kept = np.zeros(cat.size, bool)
    kept[np.argsort(-cat, kind="stable")[:max(int(keep[g]), 0)]] = True
    start = 0
    for i in members:
      out[i] = kept[start:start + draws[i].size]
      start += draws[i].size
  return [m.reshape(s) for m, s in zip(out, shapes)]


@pytest.mark.parametrize("case", ["per_leaf", "spanning", "guard", "ties"])
def test_random_masks_match_a_sorted_reference(case):
  # Leaves of one and several chunks (1024 entries), padded rows, groups in
  # any leaf order and spanning shapes, counts 0 and whole-group.
  shapes = ((40, 64), (3000,), (40, 64), (7,), (5, 3), (40, 64))
  groups = {"per_leaf": ((0,), (1,), (2,), (3,), (4,), (5,)),
            "spanning": ((5, 1, 0), (3,), (2, 4)),
            "guard": ((5, 1, 0), (3,), (2, 4)),
            "ties": ((0, 2, 5), (1, 3, 4))}[case]
  keep = {"per_leaf": (700, 2999, 0, 7, 1, 2560),
          "spanning": (1234, 3, 0),
          "guard": (1234, 3, 40),
          "ties": (7000, 1500)}[case]
  guard = 9 if case == "guard" else 0
  key = jax.random.PRNGKey(11 if case != "ties" else 5)
  if case == "ties":
    # Many-entry leaves, whose 23-bit draws tie: each group's count is
    # chosen to cut through a tie (the earlier entries of it are kept).
    shapes = ((128, 96), (256, 64), (20,), (128, 96), (100, 100), (128, 96))
    keys = jax.random.split(key, len(shapes))
    keep = []
    for members in groups:
      u = np.sort(np.concatenate([np.asarray(jax.random.uniform(
          keys[i], shapes[i])).ravel() for i in members]))[::-1]
      ties = np.flatnonzero(u[1:] == u[:-1])
      keep.append(int(ties[len(ties) // 2]) + 1)
    keep = tuple(keep)
  got = fj.structure._random_top_k(key, shapes, groups, keep, guard)
  # Traced (as under jit(tx.init)), the leaves are cut inside the program.
  traced = jax.jit(lambda k: fj.structure._random_top_k(
      k, shapes, groups, keep, guard))(key)
  want = _reference_masks(key, shapes, groups, keep, guard)
  for i, (g, t, w) in enumerate(zip(got, traced, want)):
    assert g.shape == t.shape == shapes[i]
    assert g.dtype == t.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(g), w, err_msg=str(i))
    np.testing.assert_array_equal(np.asarray(t), w, err_msg=str(i))
  for g, members in enumerate(groups):
    total = sum(math.prod(shapes[i]) for i in members)
    assert sum(int(np.sum(got[i])) for i in members) == min(keep[g], total)


def test_random_masks_of_a_typed_key_are_the_raw_keys():
  shapes, groups, keep = ((16, 8), (5,)), ((0,), (1,)), (30, 2)
  raw = fj.structure._random_top_k(jax.random.PRNGKey(4), shapes, groups, keep)
  typed = fj.structure._random_top_k(jax.random.key(4), shapes, groups, keep)
  for a, b in zip(raw, typed):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_random_masks_of_another_prng_match_the_reference():
  # A key that is not the partitionable threefry (here 'rbg') draws once per
  # leaf size with jax.random.bits (vmapped over the leaves of that size,
  # which under 'rbg' is the per-leaf draw only for the first of them: one
  # leaf per size here).
  shapes = ((40, 64), (3000,), (20, 64), (7,))
  groups, keep = ((0, 1), (2,), (3,)), (900, 1000, 3)
  key = jax.random.key(3, impl="rbg")
  assert not prng.hashed(key)
  got = fj.structure._random_top_k(key, shapes, groups, keep)
  want = _reference_masks(key, shapes, groups, keep)
  for i, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(np.asarray(g), w, err_msg=str(i))
