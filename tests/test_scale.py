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


def test_random_initial_masks_program_does_not_grow_with_leaves():
  counts = []
  for n in (2, 6):
    tx = fj.rigl(optax.sgd(0.1), sparsity=0.5, every=1, end_step=10)
    counts.append(_ops(jax.jit(tx.init).lower(_params(n)).as_text()))
  assert counts[0] == counts[1], counts


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
