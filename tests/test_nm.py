"""Tests for N:M structured sparsity (flipout_jax.nm).

Small Dense/Conv kernels and few steps: the file must stay well under a
minute on two slow shared CPU cores.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import nm


def _groups(x, m):
  """``(..., in, out)`` → ``(..., in/m, m, out)`` → move m last (NumPy)."""
  x = np.asarray(x)
  *lead, cin, out = x.shape
  return np.moveaxis(x.reshape(*lead, cin // m, m, out), -2, -1)


def _reference_nm(scores, n, m, eligible=None):
  """Per group: stable descending sort of the keys (ties: lower index)."""
  keys = np.asarray(fj.selection.sortable_key(jnp.asarray(scores)),
                    np.int64)
  if eligible is not None:
    keys = np.where(eligible, keys, -1)
  g = _groups(keys, m)
  order = np.argsort(-g, axis=-1, kind="stable")
  rank = np.argsort(order, axis=-1, kind="stable")
  keep = rank < n
  if eligible is not None:
    keep &= _groups(eligible, m)
  *lead, cin, out = np.shape(scores)
  return np.moveaxis(keep, -1, -2).reshape(*lead, cin, out)


# ---------------------------------------------------------------------------
# nm_masks


@pytest.mark.parametrize("shape", [(8, 5), (3, 3, 16, 4)])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (0, 2), (4, 4)])
def test_nm_masks_exact_and_matches_reference(shape, n, m):
  rng = np.random.default_rng(n * 10 + m)
  for scores in (rng.normal(size=shape),
                 rng.integers(0, 2, shape).astype(float),  # many ties
                 np.full(shape, 3.0)):
    scores = scores.astype(np.float32)
    mask = np.asarray(nm.nm_masks(jnp.asarray(scores), n, m))
    np.testing.assert_array_equal(mask, _reference_nm(scores, n, m))
    assert np.all(_groups(mask, m).sum(-1) == n)
    assert mask.mean() == pytest.approx(n / m)


def test_nm_masks_ties_by_position_and_special_values():
  s = jnp.array([[1.0], [1.0], [1.0], [1.0],
                 [jnp.nan], [-jnp.inf], [-0.0], [0.0]])
  mask = np.asarray(nm.nm_masks(s, 2, 4))[:, 0]
  # All-equal group: the first two; then +0.0 > -0.0 > NaN (= -inf, earlier).
  np.testing.assert_array_equal(mask, [1, 1, 0, 0, 0, 0, 1, 1])
  mask = np.asarray(nm.nm_masks(s, 3, 4))[:, 0]
  np.testing.assert_array_equal(mask, [1, 1, 1, 0, 1, 0, 1, 1])


def test_nm_masks_eligible_traced_n_and_other_axis():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(3, 16, 6)).astype(np.float32)
  eligible = rng.random((3, 16, 6)) < 0.5
  f = jax.jit(lambda s, e, n: nm.nm_masks(s, n, 4, eligible=e))
  for n in (1, 2, 3):
    got = np.asarray(f(s, eligible, jnp.int32(n)))
    np.testing.assert_array_equal(got, _reference_nm(s, n, 4, eligible))
    assert not np.any(got & ~eligible)
  # axis 0 of a (8, 3) array == axis -2 of its transpose's layout.
  t = rng.normal(size=(3, 8)).astype(np.float32)
  np.testing.assert_array_equal(
      np.asarray(nm.nm_masks(t, 2, 4, axis=1)),
      np.asarray(nm.nm_masks(t.T, 2, 4)).T)


def test_nm_masks_argument_errors():
  x = jnp.ones((6, 4))
  with pytest.raises(ValueError, match="scores: axis 0 has size 6"):
    nm.nm_masks(x, 2, 4)
  with pytest.raises(ValueError, match="n:"):
    nm.nm_masks(jnp.ones((8, 4)), 5, 4)
  with pytest.raises(ValueError, match="m:"):
    nm.nm_masks(jnp.ones((8, 4)), 1, 0)
  with pytest.raises(ValueError, match="scores: N:M needs ndim >= 2"):
    nm.nm_masks(jnp.ones((8,)), 1, 4)
  with pytest.raises(ValueError, match="axis"):
    nm.nm_masks(jnp.ones((8, 4)), 1, 4, axis=2)


def test_check_nm_and_violations():
  good = {"a": {"kernel": nm.nm_masks(jnp.arange(32.0).reshape(8, 4), 2, 4)},
          "b": {"bias": jnp.ones((4,))}}
  assert nm.check_nm(good, 2, 4)
  bad = {"a": {"kernel": jnp.ones((8, 4))}}
  assert not nm.check_nm(bad, 2, 4)
  assert nm.nm_violations(bad, 2, 4) == {"a/kernel": 8}
  odd = {"k": jnp.ones((6, 4))}
  with pytest.raises(ValueError, match="'k'"):
    nm.check_nm(odd, 2, 4)
  assert nm.check_nm(odd, 2, 4, skip_incompatible=True)


def test_nm_schedule():
  s = nm.nm_schedule(2, 4, start_step=10, end_step=100)
  assert s.steps == (10, 100) and s.sparsities == (0.25, 0.5)
  s = nm.nm_schedule(2, 8, start_step=0, end_step=10)
  assert s.steps == (0, 2, 4, 6, 8, 10)
  assert [round(8 * (1 - x)) for x in s.sparsities] == [7, 6, 5, 4, 3, 2]
  assert nm.nm_schedule(1, 4, start_step=5).steps == (5,)
  with pytest.raises(ValueError, match="end_step"):
    nm.nm_schedule(2, 8, start_step=0, end_step=3)
  with pytest.raises(ValueError, match="n:"):
    nm.nm_schedule(4, 4)


# ---------------------------------------------------------------------------
# Training with N:M.


def _params(seed=0, indivisible=True):
  # NumPy data: eager jax.random would compile a PRNG program per shape.
  rng = np.random.default_rng(seed)
  normal = lambda scale, *shape: jnp.asarray(scale * rng.normal(size=shape),
                                             jnp.float32)
  params = {
      "conv": {"kernel": normal(0.3, 3, 3, 4, 8), "bias": jnp.zeros((8,))},
      "dense0": {"kernel": normal(0.2, 32, 12), "bias": jnp.zeros((12,))},
  }
  if indivisible:
    params["head"] = {"kernel": normal(1.0, 10, 3), "bias": jnp.zeros((3,))}
  return params


def _train(tx, params, steps):
  state = tx.init(params)

  @jax.jit
  def step(p, s, key):
    grads = jax.tree.map(lambda x: jax.random.normal(key, x.shape) * 0.1, p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  history = []
  for t in range(steps):
    params, state = step(params, state, jax.random.PRNGKey(t))
    history.append((params, fj.get_masks(state)))
  return params, state, history


def _kernel_sparsity(x):
  return float(np.mean(np.asarray(x) == 0))


def test_nm_magnitude_gradual_in_jitted_loop():
  params = _params()
  tx = nm.nm_magnitude(optax.sgd(0.1, momentum=0.9), n=2, m=4, start_step=2,
                       end_step=5, skip_incompatible=True)
  params, state, history = _train(tx, params, 8)
  # Before the first event: dense; after it 3:4; from end_step on 2:4.
  p1, _ = history[1]
  assert _kernel_sparsity(p1["dense0"]["kernel"]) == 0.0
  p2, m2 = history[2]
  assert nm.check_nm(m2, 3, 4, skip_incompatible=True)
  assert _kernel_sparsity(p2["dense0"]["kernel"]) == pytest.approx(0.25)
  masks = fj.get_masks(state)
  for name in ("conv", "dense0"):
    kernel, mask = params[name]["kernel"], masks[name]["kernel"]
    assert float(jnp.mean(mask)) == 0.5  # exactly 1 − N/M
    assert np.all(np.asarray(kernel)[~np.asarray(mask)] == 0.0)
    counts = np.asarray(nm.nm_group_counts(mask, 4))
    assert np.all(counts == 2)
  assert nm.check_nm(params, 2, 4, skip_incompatible=True)
  # The indivisible head is skipped: dense, its mask all True.
  assert bool(jnp.all(masks["head"]["kernel"]))
  assert _kernel_sparsity(params["head"]["kernel"]) == 0.0


def test_indivisible_layer_error_names_layer():
  tx = nm.nm_magnitude(optax.sgd(0.1), n=2, m=4)
  with pytest.raises(ValueError, match="'head/kernel'"):
    tx.init(_params())
  # The bare rule raises at trace time with the same message.
  tx = fj.prune(optax.sgd(0.1), score_fn=fj.scores.magnitude,
                schedule=nm.nm_schedule(2, 4), mask_rule=nm.nm_mask_rule(2, 4))
  params = _params()
  state = tx.init(params)
  with pytest.raises(ValueError, match="'head/kernel'"):
    tx.update(params, state, params)


def test_nm_rule_with_polynomial_schedule_and_flipout():
  params = _params(1, indivisible=False)
  schedule = fj.schedules.polynomial(0.5, 1, 5, every=1)
  tx = nm.nm_flipout(optax.sgd(0.05), n=2, m=4, schedule=schedule,
                     noise_scale=0.5)
  params, state, history = _train(tx, params, 7)
  masks = fj.get_masks(state)
  assert nm.check_nm(masks, 2, 4) and nm.check_nm(params, 2, 4)
  assert float(jnp.mean(masks["dense0"]["kernel"])) == 0.5
  # Masks only shrink along the way.
  for (_, a), (_, b) in zip(history, history[1:]):
    assert not np.any(np.asarray(b["dense0"]["kernel"])
                      & ~np.asarray(a["dense0"]["kernel"]))


@pytest.mark.parametrize("grow", ["rigl", "dst_ee"])
def test_nm_dst_keeps_pattern_and_moves_weights(grow):
  params = _params(2, indivisible=False)
  tx = nm.nm_dst(optax.sgd(0.1, momentum=0.9), n=2, m=4, update_every=2,
                 end_step=10, grow=grow, drop_fraction=0.5)
  params, state, history = _train(tx, params, 7)
  changed = False
  for (p, mk), (_, prev) in zip(history[1:], history):
    for name in ("conv", "dense0"):
      assert np.all(np.asarray(nm.nm_group_counts(mk[name]["kernel"], 4)) == 2)
      changed |= bool(jnp.any(mk[name]["kernel"] != prev[name]["kernel"]))
    assert nm.check_nm(p, 2, 4)
  assert changed  # drop-and-grow moved some weights


def test_nm_soft_threshold():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 8, 5)),
                  jnp.float32)
  soft = jax.jit(nm.nm_soft_threshold, static_argnums=(2,),
                 static_argnames=("rescale",))
  eff, mask, tau, scale = soft(w, 2, 4)
  assert nm.check_nm({"w": eff}, 2, 4)
  np.testing.assert_array_equal(np.asarray(mask),
                                np.asarray(nm.nm_masks(jnp.abs(w), 2, 4)))
  a = np.abs(np.asarray(w))
  # τ of a group is its largest pruned magnitude, below every kept one.
  assert np.all(np.asarray(tau)[np.asarray(mask)] <= a[np.asarray(mask)])
  eff_nr, *_ = soft(w, 2, 4, rescale=False)
  np.testing.assert_allclose(
      np.asarray(eff_nr),
      np.where(mask, np.sign(w) * np.maximum(a - np.asarray(tau), 0), 0),
      rtol=1e-6)
  assert scale.shape == (5,)
  # n == m: nothing pruned, τ = 0, scale 1: the identity.
  eff, _, tau, scale = soft(w, 4, 4)
  np.testing.assert_array_equal(np.asarray(eff), np.asarray(w))
