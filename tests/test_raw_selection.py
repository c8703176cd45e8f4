"""The raw-weights methods' selection is the one it replaced, bit for bit.

ST-3's unstructured threshold and UniPTS's sparse training select their
masks with :func:`flipout_jax.selection.magnitude_top_k` (one radix select
for the masks and ST-3's τ, warm-started by the previous update's cut) and
build their step-0 state on the host. Here they run beside the previous
implementations, kept below as references (ST-3: the k+1-th key by
``kth_largest_keys``, strict masks, and ``top_k_masks`` when a tie
straddles the cut; UniPTS: the structure's ``shrink`` with every weight
alive), for many steps on weights kept on a coarse grid (so ties at the cut
happen at every step) and on ordinary weights, with small streamed blocks
(contiguous and strided): every state leaf and param must be bitwise equal
at every step. Tiny MLPs: the file must stay well under a minute.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import core
from flipout_jax import schedules
from flipout_jax import selection
from flipout_jax import structure as structure_lib
from flipout_jax import unipts
from flipout_jax.unipts import dst as unipts_dst

SIZES = (8, 12, 6, 3)
STEPS = 36


def _params(grid: bool, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2 * len(SIZES))
  params = {}
  for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    w = jax.random.normal(keys[2 * i], (a, b)) / math.sqrt(a)
    if grid:  # multiples of 1/16: many equal magnitudes
      w = jnp.round(w * 16) / 16
    params[f"dense_{i}"] = {"kernel": w,
                            "bias": 0.1 * jax.random.normal(keys[2 * i + 1],
                                                            (b,))}
  return params


def _loss(params, x, y):
  """Squared error of a tanh MLP's outputs against one-hot labels."""
  layers = [params[name] for name in sorted(params)]
  out = functools.reduce(
      lambda h, layer: jnp.tanh(h @ layer["kernel"] + layer["bias"]), layers, x)
  return jnp.mean((out - jax.nn.one_hot(y, SIZES[-1])) ** 2)


def _grid_sgd(step=1.0 / 32):
  """Sign-SGD by a power of two: weights on a grid stay on it (ties)."""

  def update(grads, state, params=None):
    del params
    return jax.tree.map(lambda g: -step * jnp.sign(g), grads), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def _old_st3_threshold(lay, weights, sparsity, *, divisors=None, hint=None):
  """ST-3's unstructured threshold before magnitude_top_k (the reference)."""
  del lay, hint
  scores = selection.magnitude_scores(weights, divisors)
  n = sum(math.prod(x.shape) for x in scores)
  k_pruned = structure_lib.num_pruned(sparsity, n)
  group = [list(range(len(scores)))]
  keep = jnp.reshape(n - k_pruned, (1,))
  keys = [selection.sortable_key(x) for x in scores]
  t = selection.kth_largest_keys(keys, group, keep + 1)[0]
  strict = [key > t for key in keys]
  kept = sum((jnp.sum(m, dtype=jnp.int32) for m in strict), jnp.int32(0))
  masks = jax.lax.cond(kept == keep[0], lambda: strict,
                       lambda: selection.top_k_masks(scores, group, keep))
  tau = jnp.where(k_pruned == 0, jnp.float32(0.0), selection.key_to_float(t))
  taus = [tau for _ in scores]
  return structure_lib.Threshold(masks, taus, taus)


def _old_hard_rule():
  """UniPTS's raw rule before magnitude_top_k: shrink with all alive."""
  structure = fj.unstructured()

  def masks_of(lay, raw, groups, keep):
    alive = [jnp.ones(w.shape, jnp.bool_) for w in raw]
    return structure.shrink(lay, alive, [jnp.abs(w.astype(jnp.float32))
                                         for w in raw], groups, keep)

  def select(lay, raw, sparsity, groups, keep, previous=None):
    del sparsity, previous
    masks = masks_of(lay, raw, groups, keep)
    return core.RawSelection([jnp.where(m, w, jnp.zeros_like(w))
                              for m, w in zip(masks, raw)], masks)

  init_masks = jax.jit(masks_of, static_argnums=(0, 2))

  def init(lay, raw, sparsity, groups, keep):
    del sparsity
    return init_masks(lay, raw, groups, jnp.asarray(keep, jnp.int32)), None

  return core.RawRule(init, select)


@pytest.fixture(params=[(32, False), (32, True)], ids=["contiguous", "strided"])
def small_blocks(monkeypatch, request):
  """Streamed blocks of about 32 entries, so these tiny kernels take several
  (the blocking is a static argument: programs of their own)."""
  monkeypatch.setattr(selection, "_blocking",
                      lambda: selection._Blocking(*request.param))


def _run(tx, params, steps=STEPS):
  x = jax.random.normal(jax.random.PRNGKey(1), (32, SIZES[0]))
  y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, SIZES[-1])
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  seen = [(params, state)]
  for _ in range(steps):
    params, state = step(params, state)
    seen.append((params, state))
  return seen


def _assert_same_runs(a, b):
  for t, (x, y) in enumerate(zip(a, b)):
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v),
                                    err_msg=f"step {t}")


def _tie_cut_happened(seen, per_leaf=False):
  """Whether some step's masks cut a tie: a pruned |w| equal to a kept one
  (in one leaf, or in all of them together)."""
  for _, state in seen[1:]:
    raw = [np.abs(np.asarray(r)).ravel()
           for r in jax.tree.leaves(fj.get_raw_weights(state))]
    masks = [np.asarray(m).ravel() for m in jax.tree.leaves(fj.get_masks(state))]
    if not per_leaf:
      raw, masks = [np.concatenate(raw)], [np.concatenate(masks)]
    for a, m in zip(raw, masks):
      if m.any() and (~m).any() and a[~m].max() == a[m].min():
        return True
  return False


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("grid", [True, False], ids=["ties", "continuous"])
@pytest.mark.parametrize("sigma", [False, True], ids=["st3", "st3_sigma"])
def test_st3_matches_the_previous_selection_every_step(grid, sigma):
  params = _params(grid)
  inner = _grid_sgd() if grid else optax.adam(3e-2)
  kwargs = dict(sparsity=0.8, start_step=2, end_step=24,
                sigma_normalized=sigma, freeze_step=30)
  old = fj.unstructured()._replace(threshold=_old_st3_threshold)
  new_run = _run(fj.st3(inner, **kwargs), params)
  _assert_same_runs(new_run, _run(fj.st3(inner, structure=old, **kwargs),
                                  params))
  if grid and not sigma:
    assert _tie_cut_happened(new_run)  # the tie cut was exercised


def _unipts_tx(inner, rule, sparsities):
  return core.prune(
      inner, weights="raw", raw_rule=rule,
      schedule=schedules.one_shot(max(sparsities.values()), 0),
      distribution=sparsities, pruned_decay=unipts_dst.DEFAULT_DECAY,
      name="unipts.sparse_training")


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("grid", [True, False], ids=["ties", "continuous"])
def test_unipts_matches_the_previous_selection_every_step(grid):
  params = _params(grid)
  inner = _grid_sgd() if grid else optax.adam(3e-2)
  sparsities = {"dense_0/kernel": 0.7, "dense_1/kernel": 0.5,
                "dense_2/kernel": 0.0}
  new_run = _run(unipts.sparse_training(inner, sparsities=sparsities),
                 params)
  _assert_same_runs(new_run, _run(_unipts_tx(inner, _old_hard_rule(),
                                             sparsities), params))
  if grid:
    assert _tie_cut_happened(new_run, per_leaf=True)


@pytest.mark.parametrize("method", ["st3", "unipts"])
def test_init_on_the_host_matches_the_compiled_init(method):
  # Concrete params on one device: the step-0 state is built on the host;
  # under jit (traced params) the rule's init is compiled. Same state.
  params = _params(grid=True)
  if method == "st3":
    tx = fj.st3(optax.sgd(0.1), sparsity=0.8, start_step=0, end_step=10)
  else:
    tx = unipts.sparse_training(optax.sgd(0.1), sparsities={
        "dense_0/kernel": 0.7, "dense_1/kernel": 0.5})
  host = tx.init(params)
  compiled = jax.jit(tx.init)(params)
  assert jax.tree.structure(host) == jax.tree.structure(compiled)
  for u, v in zip(jax.tree.leaves(host), jax.tree.leaves(compiled)):
    assert u.dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  if method == "unipts":
    masks = fj.get_masks(host)
    assert int(np.sum(~np.asarray(masks["dense_0"]["kernel"]))) == round(
        0.7 * 96)
    assert int(np.sum(~np.asarray(masks["dense_1"]["kernel"]))) == round(
        0.5 * 72)
