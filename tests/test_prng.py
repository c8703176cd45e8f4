"""flipout_jax.prng: JAX's threefry, bit for bit, as elementwise operators."""

import jax
from jax.extend import random as jax_random_ext
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import prng


def _words(seed, n):
  return np.random.RandomState(seed).randint(0, 2**32, n, dtype=np.uint64
                                             ).astype(np.uint32)


def test_threefry2x32_is_the_primitive_on_jnp_and_numpy():
  k1, k2, x1, x2 = (_words(s, 1000) for s in range(4))
  k1[:3], k2[:3], x1[:3], x2[:3] = 0, 2**32 - 1, 2**32 - 1, 0  # edges
  want = jax.jit(jax_random_ext.threefry2x32_p.bind)(k1, k2, x1, x2)
  fused = jax.jit(prng.threefry2x32)(k1, k2, x1, x2)
  host = prng.threefry2x32(k1, k2, x1, x2)
  for w, f, h in zip(want, fused, host):
    assert f.dtype == jnp.uint32 and h.dtype == np.uint32
    np.testing.assert_array_equal(np.asarray(f), np.asarray(w))
    np.testing.assert_array_equal(h, np.asarray(w))


@pytest.mark.parametrize("make", [jax.random.PRNGKey, jax.random.key])
def test_split_data_is_jax_random_split(make):
  for seed in (0, 3, 2**31 + 7):
    key = make(seed)
    assert prng.hashed(key)
    want = jax.random.split(key, 37)
    if jnp.issubdtype(want.dtype, jax.dtypes.prng_key):
      want = jax.random.key_data(want)
    np.testing.assert_array_equal(np.asarray(prng.split_data(key, 37)),
                                  np.asarray(want))


def test_split_seed_is_split_of_prng_key():
  for seed in (0, 1, 12345, 2**31, 2**32 - 1):
    want = np.asarray(jax.random.split(jax.random.PRNGKey(seed), 5))
    got = prng.split_seed(seed, 5)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, want)
  # A seed whose key depends on x64 (its high word) is left to jax.random.
  assert prng.split_seed(2**32, 2) is None


@pytest.mark.parametrize("seed", [0, 9, 2**32 - 1, 2**32 + 5])
def test_init_keys_are_the_split_of_the_seed(seed):
  # The state's key and the random masks' key: split(PRNGKey(seed)).
  params = {"w": jnp.arange(64.0).reshape(8, 8)}
  state = fj.rigl(optax.sgd(0.1), sparsity=0.5, every=1, end_step=10,
                  seed=seed).init(params)
  init_key, key = jax.random.split(jax.random.PRNGKey(seed))
  np.testing.assert_array_equal(np.asarray(state.key), np.asarray(key))
  want = fj.core.random_masks(0.5, "erk")(
      params, {"w": jnp.ones((8, 8), bool)}, init_key)
  np.testing.assert_array_equal(np.asarray(state.masks["w"]),
                                np.asarray(want["w"]))
