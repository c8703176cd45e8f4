"""Tests for flipout_jax.sparse_init: the fan-in rescale of a sparse start."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj


def _params():
  rng = np.random.default_rng(0)
  return {"dense0": {"kernel": jnp.asarray(rng.normal(size=(20, 8)), jnp.float32),
                     "bias": jnp.zeros((8,), jnp.float32)},
          "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)}}


def _grads(params, scale):
  return jax.tree.map(lambda p: jnp.full_like(p, scale), params)


class SparseInitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_first_update_rescales_kept_weights_to_their_fan_in(self):
    params = _params()
    lr = 0.1
    tx = fj.sparse_init(fj.rigl(optax.sgd(lr), sparsity=0.8, every=10,
                                end_step=100, distribution="uniform", seed=1))
    update = self.variant(tx.update)
    state = tx.init(params)
    grads = _grads(params, 0.5)
    updates, state = update(grads, state, params)
    new = optax.apply_updates(params, updates)
    masks = fj.get_masks(state)
    for name in ("dense0", "conv"):
      p = np.asarray(params[name]["kernel"])
      m = np.asarray(masks[name]["kernel"])
      fan_in = int(np.prod(p.shape[:-1]))
      kept = m.reshape(-1, p.shape[-1]).sum(axis=0)
      want = np.where(m, p * np.sqrt(fan_in / np.maximum(kept, 1)) - lr * 0.5, 0.0)
      np.testing.assert_allclose(np.asarray(new[name]["kernel"]), want,
                                 rtol=1e-6, atol=1e-6)
      # Pruned weights are exactly 0.0.
      assert np.all(np.asarray(new[name]["kernel"])[~m] == 0.0)
    # The bias is not prunable: an ordinary step.
    chex.assert_trees_all_close(new["dense0"]["bias"],
                                params["dense0"]["bias"] - lr * 0.5)
    # Later updates are the wrapped transformation's, unchanged.
    plain = fj.rigl(optax.sgd(lr), sparsity=0.8, every=10,
                    end_step=100, distribution="uniform", seed=1)
    u_wrapped, _ = update(grads, state, new)
    u_plain, _ = plain.update(grads, state, new)
    chex.assert_trees_all_equal(u_wrapped, u_plain)

  def test_state_and_masks_are_the_wrapped_transformations(self):
    params = _params()
    inner = fj.set_(optax.sgd(0.1), sparsity=0.9, every=5, end_step=50)
    chex.assert_trees_all_equal(fj.sparse_init(inner).init(params),
                                inner.init(params))

  def test_needs_a_pruning_transformation(self):
    with pytest.raises(ValueError, match="tx: sparse_init needs"):
      fj.sparse_init(optax.sgd(0.1)).init(_params())
