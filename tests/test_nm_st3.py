"""Tests for ST-3 with an N:M selection rule (flipout_jax.nm.nm_st3).

Small kernels and few steps: the file must stay well under a minute on two
slow shared CPU cores.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import flipout_jax as fj
from flipout_jax import core
from flipout_jax import nm
from flipout_jax.methods import st3 as st3_lib


def _params(seed=0, head=False):
  # NumPy data: eager jax.random would compile a PRNG program per shape.
  rng = np.random.default_rng(seed)
  normal = lambda scale, *shape: jnp.asarray(scale * rng.normal(size=shape),
                                             jnp.float32)
  params = {
      "conv": {"kernel": normal(0.3, 3, 3, 8, 6), "bias": jnp.zeros((6,))},
      "dense": {"kernel": normal(0.3, 16, 12), "bias": jnp.zeros((12,))},
  }
  if head:  # 10 inputs: not divisible by 4 or 8
    params["head"] = {"kernel": normal(1.0, 10, 3), "bias": jnp.zeros((3,))}
  return params


def _grads(params, t):
  # Deterministic pseudo-gradients (no data, no model): large enough to move
  # weights across the per-group thresholds, so masks change between steps.
  rng = np.random.default_rng(1000 + t)
  return jax.tree.map(
      lambda p: jnp.asarray(0.5 * rng.normal(size=p.shape), p.dtype), params)


def _group_counts(x, m):
  """Per group of m along axis -2 (NumPy): nonzeros / True entries."""
  x = np.asarray(x)
  *lead, cin, out = x.shape
  return (x != 0).reshape(*lead, cin // m, m, out).sum(-2)


def _reference(w, n, m, rescale=True):
  """Independent float64 NumPy reference of one N:M ST-3 soft threshold."""
  w = np.asarray(w, np.float64)
  *lead, cin, out = w.shape
  a = np.abs(w)
  g = np.moveaxis(a.reshape(*lead, cin // m, m, out), -2, -1)  # m last
  order = np.argsort(-g, axis=-1, kind="stable")  # ties: lower index first
  rank = np.argsort(order, axis=-1, kind="stable")
  keep = rank < n
  tau = np.max(np.where(keep, -np.inf, g), axis=-1, keepdims=True)
  tau = np.maximum(tau, 0.0)
  soft_g = np.where(keep, np.maximum(g - tau, 0.0), 0.0)
  back = lambda x: np.moveaxis(x, -1, -2).reshape(w.shape)
  mask = back(keep)
  soft = np.sign(w) * back(soft_g)
  tau_full = back(np.broadcast_to(tau, g.shape))
  axes = tuple(range(w.ndim - 1))
  if rescale:
    r = ((a * mask).mean(axes) + 1e-6) / (a.mean(axes) + 1e-6)
    scale = np.where(mask.all(axes), 1.0, 1.01 / (r + 0.01))
  else:
    scale = np.ones(out)
  return scale * soft, mask, tau_full, scale


def _expected_n(t, n, m, start, end, power=3.0):
  s = float(st3_lib.st3_sparsity(t, sparsity=1 - n / m, start_step=start,
                                 end_step=end, power=power))
  return int(np.clip(np.round(np.float32(1.0 - s) * m), n, m))


# ---------------------------------------------------------- pure selection


class NMSoftThresholdTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((2, 4, True), (1, 4, True), (3, 8, False),
                            (4, 4, True))
  def test_matches_numpy_reference(self, n, m, rescale):
    rng = np.random.default_rng(n * 10 + m)
    for shape in ((16, 5), (3, 3, 8, 4)):
      w = rng.normal(size=shape).astype(np.float32)
      fn = self.variant(lambda w: nm.nm_soft_threshold(w, n, m,
                                                       rescale=rescale))
      eff, mask, tau, scale = fn(jnp.asarray(w))
      ref_eff, ref_mask, ref_tau, ref_scale = _reference(w, n, m, rescale)
      np.testing.assert_array_equal(np.asarray(mask), ref_mask)
      np.testing.assert_allclose(np.asarray(tau), ref_tau, rtol=1e-7)
      np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-6)
      np.testing.assert_allclose(np.asarray(eff), ref_eff, rtol=1e-5,
                                 atol=1e-7)
      eff = np.asarray(eff)
      # Pruned entries exactly +0.0; exactly n nonzeros per group.
      np.testing.assert_array_equal(eff[~ref_mask], 0.0)
      self.assertFalse(np.any(np.signbit(eff[~ref_mask])))
      self.assertTrue(np.all(_group_counts(eff, m) == n))

  def test_st3_effective_with_the_nm_rule_is_nm_soft_threshold(self):
    params = _params(3)
    rule = nm.nm_threshold_rule(2, 8)
    # s = 0.5 with M = 8: n_t = round(0.5·8) = 4.
    out = jax.jit(lambda p: st3_lib.st3_effective(p, 0.5,
                                                  threshold_rule=rule))(params)
    for name in ("conv", "dense"):
      w = params[name]["kernel"]
      ref_eff, ref_mask, ref_tau, ref_scale = _reference(w, 4, 8)
      np.testing.assert_array_equal(out.masks[name]["kernel"], ref_mask)
      np.testing.assert_allclose(out.effective[name]["kernel"], ref_eff,
                                 rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(out.scales[name]["kernel"], ref_scale,
                                 rtol=1e-6)
      # Compact thresholds: one τ_g per group.
      thr = np.asarray(out.thresholds[name]["kernel"])
      *lead, cin, cout = w.shape
      self.assertEqual(thr.shape, (*lead, cin // 8, cout))
      np.testing.assert_allclose(
          np.repeat(thr, 8, axis=-2), ref_tau, rtol=1e-7)
    # Non-prunable leaves pass through.
    np.testing.assert_array_equal(out.effective["dense"]["bias"],
                                  params["dense"]["bias"])

  def test_global_rule_is_the_default(self):
    params = _params(4)
    f = jax.jit(lambda p, rule: st3_lib.st3_effective(p, 0.6,
                                                      threshold_rule=rule),
                static_argnums=1)
    a = f(params, None)
    b = f(params, st3_lib.global_threshold_rule())
    chex.assert_trees_all_equal(a, b)  # bitwise
    a = f(params, st3_lib.global_threshold_rule(sigma_normalized=True))
    b = jax.jit(lambda p: st3_lib.st3_effective(p, 0.6,
                                                sigma_normalized=True))(params)
    chex.assert_trees_all_equal(a, b)


# ---------------------------------------------------------- transformation


def _run(tx, params, steps):
  state = tx.init(params)

  @jax.jit
  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  history = []
  for t in range(steps):
    params, state = step(params, state, _grads(params, t))
    history.append((params, core.get_masks(state),
                    st3_lib.st3_raw_weights(state)))
  return params, state, history


class NMST3Test(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_schedule_exactness_and_nonmonotone_masks(self):
    n, m, start, end = 2, 8, 1, 6
    params = _params()
    tx = nm.nm_st3(optax.sgd(0.1, momentum=0.9), n=n, m=m, start_step=start,
                   end_step=end)
    state = tx.init(params)

    def step(p, s, g):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    step = self.variant(step)
    seen, revived, prev = set(), False, None
    for t in range(9):
      params, state = step(params, state, _grads(params, t))
      masks = core.get_masks(state)
      n_t = _expected_n(t, n, m, start, end)
      seen.add(n_t)
      raw = st3_lib.st3_raw_weights(state)
      for name in ("conv", "dense"):
        p = np.asarray(params[name]["kernel"])
        mk = np.asarray(masks[name]["kernel"])
        # Every group keeps exactly n_t in the masks and in the params.
        self.assertTrue(np.all(_group_counts(mk, m) == n_t), msg=f"t={t}")
        self.assertTrue(np.all(_group_counts(p, m) == n_t), msg=f"t={t}")
        np.testing.assert_array_equal(p[~mk], 0.0)  # pruned: exactly 0.0
        self.assertFalse(np.any(np.signbit(p[~mk])))
        # The params are the effective weights of the raw ones at n_t.
        ref_eff, ref_mask, _, _ = _reference(raw[name]["kernel"], n_t, m)
        np.testing.assert_array_equal(mk, ref_mask)
        np.testing.assert_allclose(p, ref_eff, rtol=1e-5, atol=1e-6)
      if prev is not None:
        revived |= any(bool(np.any(~np.asarray(prev[k]["kernel"])
                                   & np.asarray(masks[k]["kernel"])))
                       for k in ("conv", "dense"))
      prev = masks
    # Cubic ramp 0 → 0.75 over counts 1..6: n_t = 8, 8, 5, 3, 2, 2, ...
    self.assertEqual(seen, {8, 5, 3, 2})
    self.assertTrue(revived, "masks never revived a weight")  # not monotone
    # After end_step: exactly N:M on params and masks.
    self.assertTrue(nm.check_nm(params, n, m))
    self.assertTrue(nm.check_nm(core.get_masks(state), n, m))
    thr = st3_lib.st3_thresholds(state)
    chex.assert_shape(thr["conv"]["kernel"], (3, 3, 1, 6))
    chex.assert_shape(thr["dense"]["kernel"], (2, 12))
    self.assertTrue(all(x.dtype == jnp.float32 for x in
                        jax.tree.leaves(thr)))

  def test_freeze_keeps_the_nm_mask_and_fine_tunes(self):
    n, m, freeze = 2, 4, 7
    params = _params(1)
    tx = optax.chain(
        optax.clip_by_global_norm(3.0),
        nm.nm_st3(optax.adam(2e-2), n=n, m=m, start_step=0, end_step=4,
                  freeze_step=freeze))
    params, state, history = _run(tx, params, 12)
    frozen = history[freeze - 1][1]
    self.assertTrue(nm.check_nm(frozen, n, m))
    for p, masks, raw in history[freeze - 1:]:
      chex.assert_trees_all_equal(masks, frozen)
      for name in ("conv", "dense"):
        pk, mk, rk = (np.asarray(x[name]["kernel"]) for x in (p, masks, raw))
        self.assertTrue(np.all(_group_counts(mk, m) == n))
        np.testing.assert_array_equal(pk[~mk], 0.0)
        np.testing.assert_array_equal(rk[~mk], 0.0)
        # Params follow the raw weights up to one rounding of p + (w − p).
        np.testing.assert_allclose(pk, rk, rtol=1e-6, atol=1e-7)
    for thr in jax.tree.leaves(st3_lib.st3_thresholds(state)):
      np.testing.assert_array_equal(thr, 0.0)
    for scale in jax.tree.leaves(st3_lib.st3_scales(state)):
      np.testing.assert_array_equal(scale, 1.0)
    # The kept weights still train after the freeze.
    a, b = history[freeze][0], history[-1][0]
    mk = np.asarray(frozen["dense"]["kernel"])
    self.assertTrue(np.any(np.asarray(a["dense"]["kernel"])[mk]
                           != np.asarray(b["dense"]["kernel"])[mk]))
    self.assertTrue(nm.check_nm(params, n, m))

  def test_skip_incompatible_leaves_the_layer_dense(self):
    params = _params(2, head=True)
    with pytest.raises(ValueError, match="'head/kernel'"):
      nm.nm_st3(optax.sgd(0.1), n=2, m=4, start_step=0,
                end_step=3).init(params)
    tx = nm.nm_st3(optax.sgd(0.1), n=2, m=4, start_step=0, end_step=3,
                   skip_incompatible=True)
    params, state, _ = _run(tx, params, 5)
    masks = core.get_masks(state)
    self.assertTrue(bool(jnp.all(masks["head"]["kernel"])))
    head = np.asarray(params["head"]["kernel"])
    raw = np.asarray(st3_lib.st3_raw_weights(state)["head"]["kernel"])
    self.assertTrue(np.all(head != 0.0))
    # τ = 0 and scale 1: w_eff == w_raw, so the params follow the raw
    # weights (up to one rounding of p + (w − p)).
    np.testing.assert_allclose(head, raw, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(st3_lib.st3_scales(state)["head"]["kernel"],
                                  1.0)
    thr = st3_lib.st3_thresholds(state)
    chex.assert_shape(thr["head"]["kernel"], ())
    self.assertEqual(float(thr["head"]["kernel"]), 0.0)
    self.assertTrue(nm.check_nm(params, 2, 4, skip_incompatible=True))
    self.assertTrue(nm.check_nm(masks, 2, 4, skip_incompatible=True))

  def test_exported_and_single_compile(self):
    self.assertIs(fj.nm_st3, nm.nm_st3)
    params = _params()
    tx = fj.nm_st3(optax.sgd(0.1), n=1, m=4, start_step=0, end_step=3)
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for t in range(5):
      updates, state = step(params, state, _grads(params, t))
      params = optax.apply_updates(params, updates)
    self.assertEqual(step._cache_size(), 1)
    self.assertTrue(nm.check_nm(params, 1, 4))
    self.assertEqual(float(jnp.mean(core.get_masks(state)["dense"]["kernel"])),
                     0.25)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), r"n: n == 0"),
    (dict(n=4), r"n: n == m == 4"),
    (dict(n=5), r"n: must be an int in \[0, m=4\]"),
    (dict(n=1.5), r"n: must be an int"),
    (dict(m=0), r"m: must be an int in \[1, 255\]"),
    (dict(m=256), r"m: must be an int in \[1, 255\]"),
    (dict(start_step=-1), r"start_step: .*>= 0"),
    (dict(end_step=0), r"end_step: .*> start_step"),
    (dict(power=0.0), r"power: .*> 0"),
    (dict(freeze_step=5), r"freeze_step: .*> end_step \(10\)"),
    (dict(axis=1.0), r"axis: must be an int"),
    (dict(skip_incompatible="yes"), r"skip_incompatible: must be True or False"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
  args = dict(n=2, m=4, start_step=0, end_step=10)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    nm.nm_st3(optax.sgd(0.1), **args)


def test_sigma_normalized_with_a_rule_is_an_error():
  with pytest.raises(ValueError, match="sigma_normalized"):
    st3_lib.st3(optax.sgd(0.1), sparsity=0.5, start_step=0, end_step=2,
                sigma_normalized=True, threshold_rule=nm.nm_threshold_rule(2, 4))
  with pytest.raises(ValueError, match="threshold_rule"):
    st3_lib.st3(optax.sgd(0.1), sparsity=0.5, start_step=0, end_step=2,
                threshold_rule="nm")
