"""Every method × every structure: the pattern holds exactly, pruned weights
are exactly 0.0, through the method's real schedule (registry constructors)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import structure as st

STEPS = 10


def mlp_params(key=0):
  k = jax.random.split(jax.random.PRNGKey(key), 3)
  return {
      "fc1": {"kernel": 0.5 * jax.random.normal(k[0], (16, 8)),
              "bias": jnp.zeros((8,))},
      "fc2": {"kernel": 0.5 * jax.random.normal(k[1], (8, 12)),
              "bias": jnp.zeros((12,))},
      "fc3": {"kernel": 0.5 * jax.random.normal(k[2], (12, 4)),
              "bias": jnp.zeros((4,))},
  }


def forward(params, x):
  h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  h = jnp.tanh(h @ params["fc2"]["kernel"] + params["fc2"]["bias"])
  return h @ params["fc3"]["kernel"] + params["fc3"]["bias"]


X = jax.random.normal(jax.random.PRNGKey(7), (32, 16))
Y = jax.random.normal(jax.random.PRNGKey(8), (32, 4))


def loss(params, x=X, y=Y):
  return jnp.mean((forward(params, x) - y) ** 2)


# Keyword arguments that finish each method's schedule within STEPS updates
# at the pattern's sparsity (0.5 for 2:4).
METHODS = {
    "global_magnitude": dict(sparsity=0.5, every=2),
    "flipout": dict(sparsity=0.5, every=2),
    "random_pruning": dict(sparsity=0.5, every=2),
    "snip": dict(sparsity=0.5),
    "movement": dict(sparsity=0.5, start_step=0, end_step=6),
    "rigl": dict(sparsity=0.5, every=2, end_step=8),
    "set_": dict(sparsity=0.5, every=2, end_step=8),
    "dst_ee": dict(sparsity=0.5, every=2, end_step=8),
    "gradient_flow": dict(measure="magnitude", sparsity=0.5, rounds=2,
                          every=2),
    "st3": dict(sparsity=0.5, start_step=0, end_step=6),
}
SPARSE_TRAINING = ("rigl", "set_", "dst_ee")

STRUCTURES = {
    "2:4": lambda: fj.n_m(2, 4),
    "units": lambda: fj.units(),
}


@functools.lru_cache(maxsize=None)
def train(method, structure_name):
  kw = dict(METHODS[method])
  if method in SPARSE_TRAINING and structure_name == "units":
    kw["distribution"] = "uniform"  # their default, ERK, counts weights
  tx = fj.registry.build(method, optax.sgd(0.05), **kw,
                         structure=STRUCTURES[structure_name]())
  params = mlp_params()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(STEPS):
    params, state = step(params, state)
  return params, state


def kernels(tree):
  return [np.asarray(tree[f"fc{i}"]["kernel"]) for i in (1, 2, 3)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_n_m(method):
  params, state = train(method, "2:4")
  masks = fj.get_masks(state)
  for w, m in zip(kernels(params), kernels(masks)):
    counts = np.asarray(st.nm_group_counts(m, 4))
    assert np.all(counts == 2), (method, counts)
    assert np.all(w[~m] == 0.0)
    assert np.all(np.asarray(st.nm_group_counts(w, 4)) <= 2)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_units(method):
  params, state = train(method, "units")
  masks = fj.get_masks(state)
  ms = kernels(masks)
  assert ms[2].all(), "the classifier's units stay whole"
  alive = 0
  for w, m in zip(kernels(params), ms):
    assert np.all(m.all(axis=0) | ~m.any(axis=0)), "whole units only"
    assert np.all(w[~m] == 0.0)
    assert m.any(axis=0).sum() >= 1  # min_per_layer
  alive = sum(int(m.any(axis=0).sum()) for m in ms[:2])
  # 20 hidden units at 50 %: exactly 10 alive (sparse training conserves
  # the count of its random start, the same budget).
  assert alive == 10, (method, alive)
