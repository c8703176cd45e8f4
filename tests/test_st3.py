"""Tests for ST-3 / ST-3σ (flipout_jax.methods.st3).

Small MLPs (8-12-6-3) and few steps: the whole file must stay well under a
minute on two slow shared CPU cores.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from flipout_jax import core
from flipout_jax.methods import st3 as st3_lib

SIZES = (8, 12, 6, 3)


def _params(seed=0, sizes=SIZES):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2 * len(sizes))
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"dense_{i}"] = {
        "kernel": jax.random.normal(keys[2 * i], (a, b)) / math.sqrt(a),
        "bias": 0.1 * jax.random.normal(keys[2 * i + 1], (b,)),
    }
  return params


def _data(seed=1, n=32):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (n, SIZES[0]))
  y = jax.random.randint(ky, (n,), 0, SIZES[-1])
  return x, y


def _loss(params, x, y):
  h = x
  names = sorted(params)
  for i, name in enumerate(names):
    h = h @ params[name]["kernel"] + params[name]["bias"]
    if i < len(names) - 1:
      h = jnp.tanh(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def _kernels(tree):
  return [tree[name]["kernel"] for name in sorted(tree)]


def _num_masked(masks):
  return sum(int(np.sum(~np.asarray(m))) for m in _kernels(masks))


def _num_prunable(params):
  return sum(k.size for k in _kernels(params))


def _cubic(t, s_max, t0, t1, power=3.0):
  frac = min(max((t - t0) / (t1 - t0), 0.0), 1.0)
  return s_max * (1.0 - (1.0 - frac) ** power)


# Eager dispatch compiles every small op on first use (seconds on a slow
# CPU), so helpers outside the chex variants run jitted.
_effective = jax.jit(st3_lib.st3_effective,
                     static_argnames=("sigma_normalized", "rescale", "filter_fn"))


def _make_step(tx, x, y):
  def step(params, state):
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return step


# ------------------------------------------------------------ pure function


class EffectiveWeightsTest(chex.TestCase):

  @chex.variants(with_jit=True)  # eager: see the straight-through test
  def test_masked_entries_are_exactly_positive_zero(self):
    params = _params()
    fn = self.variant(lambda p: st3_lib.st3_effective(p, 0.6))
    out = fn(params)
    n = _num_prunable(params)
    self.assertEqual(_num_masked(out.masks), round(0.6 * n))
    tau = float(out.thresholds["dense_0"]["kernel"])
    for raw, eff, m in zip(_kernels(params), _kernels(out.effective),
                           _kernels(out.masks)):
      raw, eff, m = map(np.asarray, (raw, eff, m))
      np.testing.assert_array_equal(m, np.abs(raw) > tau)  # strict
      np.testing.assert_array_equal(eff[~m], 0.0)
      self.assertFalse(np.any(np.signbit(eff[~m])))  # +0.0, not -0.0
      self.assertTrue(np.all(eff[m] != 0.0))
      self.assertTrue(np.all(np.sign(eff[m]) == np.sign(raw[m])))
    # Non-prunable leaves pass through untouched.
    np.testing.assert_array_equal(out.effective["dense_1"]["bias"],
                                  params["dense_1"]["bias"])
    self.assertIsNone(out.masks["dense_1"]["bias"])

  @parameterized.parameters(True, False)
  def test_continuous_at_threshold(self, rescale):
    # 15 fixed magnitudes 0.1 .. 1.5 and a probe x; s = 4/16 prunes the 4
    # smallest, so τ = 0.4 whenever x >= 0.4 and the probe stays kept above it.
    base = np.linspace(0.1, 1.5, 15).astype(np.float32)
    tau = base[3]

    def probe(x):
      w = jnp.asarray(np.append(base, np.float32(x)).reshape(4, 4))
      out = _effective({"k": w}, 0.25, rescale=rescale)
      return (float(out.effective["k"][3, 3]), float(out.thresholds["k"]),
              np.asarray(out.scales["k"])[3])

    value, thr, _ = probe(tau)
    self.assertEqual(thr, tau)
    self.assertEqual(value, 0.0)  # |w| = τ is pruned (strict mask)
    for delta in (1e-1, 1e-3, 1e-5):
      value, thr, scale = probe(tau + delta)
      self.assertEqual(thr, tau)
      expected = scale * (np.float32(tau + delta) - tau)
      np.testing.assert_allclose(value, expected, rtol=1e-5)
      self.assertLessEqual(abs(value), 1.0101 * scale * delta)

  def test_scale_is_one_and_effective_is_raw_when_nothing_is_masked(self):
    params = _params()
    params["dense_0"]["kernel"] = params["dense_0"]["kernel"].at[0, 0].set(0.0)
    out = _effective(params, 0.0)
    self.assertEqual(_num_masked(out.masks), 0)
    chex.assert_trees_all_equal(out.effective, params)  # bitwise
    for s in _kernels(out.scales):
      np.testing.assert_array_equal(s, 1.0)
    for t in _kernels(out.thresholds):
      self.assertEqual(float(t), 0.0)

  def test_rescale_per_output_channel(self):
    # Kernel (in=4, out=3). Magnitudes chosen so that s = 5/12 prunes the 5
    # smallest: 2 in channel 0, none in channel 1, 3 in channel 2.
    w = np.array([[0.01, 1.0, -0.03],
                  [-0.02, 2.0, 0.04],
                  [0.50, -3.0, 0.05],
                  [-0.60, 4.0, 0.70]], np.float32)
    out = _effective({"k": jnp.asarray(w)}, 5 / 12)
    m = np.abs(w) > 0.05
    np.testing.assert_array_equal(out.masks["k"], m)
    self.assertAlmostEqual(float(out.thresholds["k"]), 0.05, places=7)
    a = np.abs(w).astype(np.float64)
    r = ((a * m).mean(0) + 1e-6) / (a.mean(0) + 1e-6)
    scale = 1.01 / (r + 0.01)
    chex.assert_shape(out.scales["k"], (3,))
    np.testing.assert_allclose(out.scales["k"], scale, rtol=1e-6)
    self.assertEqual(float(out.scales["k"][1]), 1.0)  # no pruned weight
    self.assertGreater(float(out.scales["k"][2]), float(out.scales["k"][0]))
    soft = np.sign(w) * np.maximum(a - 0.05, 0) * m
    np.testing.assert_allclose(out.effective["k"], scale * soft, rtol=1e-6,
                               atol=1e-7)

  def test_scale_and_threshold_are_not_differentiated(self):
    params = {"k": _params()["dense_0"]["kernel"]}
    c = jax.random.normal(jax.random.PRNGKey(3), params["k"].shape)
    out = _effective(params, 0.5)

    def f(p):
      return jnp.sum(c * st3_lib.st3_effective(p, 0.5).effective["k"])

    grad = jax.jit(jax.grad(f))(params)["k"]
    expected = jnp.where(out.masks["k"], out.scales["k"] * c, 0.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)

  @chex.variants(with_jit=True)
  def test_sigma_thresholds_scale_with_inverse_sqrt_of_dims(self):
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    shapes = [(6, 4), (4, 30), (3, 3, 2, 5)]
    params = {f"l{i}": jax.random.normal(k, s)
              for i, (k, s) in enumerate(zip(keys, shapes))}
    fn = self.variant(
        lambda p: st3_lib.st3_effective(p, 0.5, sigma_normalized=True))
    out = fn(params)
    n = sum(math.prod(s) for s in shapes)
    masked = sum(int(np.sum(~np.asarray(out.masks[k]))) for k in params)
    self.assertEqual(masked, round(0.5 * n))
    tau = [float(out.thresholds[f"l{i}"]) * math.sqrt(sum(s))
           for i, s in enumerate(shapes)]
    np.testing.assert_allclose(tau, tau[0], rtol=1e-6)
    for i, s in enumerate(shapes):
      w = np.asarray(params[f"l{i}"])
      score = np.abs(w) * math.sqrt(sum(s))
      np.testing.assert_array_equal(out.masks[f"l{i}"], score > tau[0] * (1 + 1e-6))
      tau_l = float(out.thresholds[f"l{i}"])
      eff = np.asarray(out.effective[f"l{i}"])
      m = np.asarray(out.masks[f"l{i}"])
      soft = np.sign(w) * np.maximum(np.abs(w) - tau_l, 0) * m
      scale = np.asarray(out.scales[f"l{i}"])
      np.testing.assert_allclose(eff, scale * soft, rtol=1e-5, atol=1e-7)
    # The normalisation changes the per-layer budgets (the wide layer, with a
    # smaller σ, keeps relatively more small weights pruned).
    plain = _effective(params, 0.5)
    self.assertFalse(all(np.array_equal(plain.masks[k], out.masks[k])
                         for k in params))


# ----------------------------------------------------------- transformation


class ST3TransformTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_straight_through_gradient_reaches_raw_weights(self):
    lr, s_max, t0, t1 = 0.5, 0.6, 0, 4
    x, y = _data()
    params = _params()
    tx = st3_lib.st3(optax.sgd(lr), sparsity=s_max, start_step=t0, end_step=t1)
    state = tx.init(params)
    step = self.variant(_make_step(tx, x, y))
    for _ in range(3):  # counts 0, 1, 2
      params, state, _ = step(params, state)
    raw = st3_lib.get_raw_weights(state, params)
    s_prev = st3_lib.st3_sparsity(2, sparsity=s_max, start_step=t0, end_step=t1)

    def eff(w):
      return _effective(w, s_prev).effective

    # The params the model sees are the effective weights of the raw ones.
    chex.assert_trees_all_close(params, eff(raw), rtol=1e-6, atol=1e-7)

    def st_loss(w):  # the explicit straight-through formulation
      return _loss(jax.tree.map(lambda a, e: a + jax.lax.stop_gradient(e - a),
                                w, eff(w)), x, y)

    g_ref = jax.jit(jax.grad(st_loss))(raw)
    expected = jax.tree.map(lambda w, g: w - lr * g, raw, g_ref)
    params, state, _ = step(params, state)  # count 3
    new_raw = st3_lib.get_raw_weights(state, params)
    for name in sorted(params):
      np.testing.assert_allclose(new_raw[name]["kernel"],
                                 expected[name]["kernel"], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(params[name]["bias"], expected[name]["bias"],
                                 rtol=1e-5, atol=1e-6)
    # Pruned weights got their gradient too (straight-through), ...
    old_masks = _effective(raw, s_prev).masks
    moved = sum(int(np.sum((np.asarray(a) != np.asarray(b)) & ~np.asarray(m)))
                for a, b, m in zip(_kernels(raw), _kernels(new_raw),
                                   _kernels(old_masks)))
    self.assertGreater(moved, 0)
    # ... and the new params are the effective weights of the new raw ones.
    s_now = st3_lib.st3_sparsity(3, sparsity=s_max, start_step=t0, end_step=t1)
    ref = _effective(new_raw, s_now)
    chex.assert_trees_all_close(params, ref.effective, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal(core.get_masks(state), ref.masks)

  def test_sparsity_follows_the_cubic_schedule(self):
    s_max, t0, t1 = 0.75, 3, 12
    x, y = _data()
    params = _params()
    n = _num_prunable(params)
    inner = optax.sgd(0.3, momentum=0.9)
    tx = st3_lib.st3(inner, sparsity=s_max, start_step=t0, end_step=t1)
    state = tx.init(params)
    step = jax.jit(_make_step(tx, x, y))
    plain, inner_state = params, inner.init(params)
    plain_step = jax.jit(_make_step(inner, x, y))
    revived = False
    prev = None
    for t in range(16):
      s_t = float(st3_lib.st3_sparsity(t, sparsity=s_max, start_step=t0,
                                       end_step=t1))
      self.assertAlmostEqual(s_t, _cubic(t, s_max, t0, t1), places=6)
      params, state = step(params, state)[:2]
      masks = core.get_masks(state)
      masked = _num_masked(masks)
      self.assertLessEqual(abs(masked - round(s_t * n)), 1, msg=f"t={t}")
      if t <= t0:
        # Until the schedule starts, ST-3 is the inner optimizer: nothing is
        # masked, every scale is exactly 1 and w_eff == w_raw.
        self.assertEqual(masked, 0)
        plain, inner_state = plain_step(plain, inner_state)[:2]
        chex.assert_trees_all_close(params, plain, rtol=1e-5, atol=1e-6)
        for scale in _kernels(st3_lib.st3_scales(state)):
          np.testing.assert_array_equal(scale, 1.0)
        raw = st3_lib.get_raw_weights(state, params)
        chex.assert_trees_all_close(params, raw, rtol=1e-6, atol=1e-7)
      if t >= t1:
        self.assertLessEqual(abs(masked - round(s_max * n)), 1)
      for p, m in zip(_kernels(params), _kernels(masks)):
        np.testing.assert_array_equal(np.asarray(p) == 0.0, ~np.asarray(m))
      if prev is not None:
        revived |= any(bool(np.any(~np.asarray(a) & np.asarray(b)))
                       for a, b in zip(_kernels(prev), _kernels(masks)))
      prev = masks
    self.assertTrue(revived, "masks never revived a weight")  # not monotone

  @parameterized.named_parameters(
      ("sgd_momentum", lambda: optax.sgd(0.2, momentum=0.9)),
      ("adam", lambda: optax.adam(2e-2)),
      ("adamw", lambda: optax.adamw(2e-2, weight_decay=1e-2)),
  )
  def test_optimizers_freeze_and_a_single_compile(self, make_inner):
    # One run per inner optimizer: ST-3 ramp (counts 2..12), fine-tuning
    # from count 20 on, inside a chain after gradient clipping.
    x, y = _data()
    params = _params()
    n = _num_prunable(params)
    s_max, freeze = 0.6, 20
    tx = optax.chain(
        optax.clip_by_global_norm(3.0),
        st3_lib.st3(make_inner(), sparsity=s_max, start_step=2, end_step=12,
                    freeze_step=freeze))
    state = tx.init(params)
    step = jax.jit(_make_step(tx, x, y))
    losses, history = [], []
    for _ in range(26):  # crosses start, end and freeze
      params, state, loss = step(params, state)
      losses.append(float(loss))
      history.append((params, core.get_masks(state),
                      st3_lib.get_raw_weights(state)))
    self.assertEqual(step._cache_size(), 1)
    self.assertTrue(np.all(np.isfinite(losses)))
    self.assertLess(losses[-1], losses[0])

    frozen_masks = history[freeze - 1][1]  # computed by the last ST-3 update
    self.assertLessEqual(abs(_num_masked(frozen_masks) - round(s_max * n)), 1)
    for t in range(freeze - 1, len(history)):
      p, masks, raw = history[t]
      chex.assert_trees_all_equal(masks, frozen_masks)  # the mask is frozen
      for pk, mk, rk in zip(_kernels(p), _kernels(masks), _kernels(raw)):
        pk, mk, rk = map(np.asarray, (pk, mk, rk))
        np.testing.assert_array_equal(pk[~mk], 0.0)  # exactly sparse
        np.testing.assert_array_equal(rk[~mk], 0.0)
        # Raw weights := effective ones at the freeze; params follow them.
        np.testing.assert_allclose(pk, rk, rtol=1e-6, atol=0)
    for thr in _kernels(st3_lib.st3_thresholds(state)):
      self.assertEqual(float(thr), 0.0)
    for scale in _kernels(st3_lib.st3_scales(state)):
      np.testing.assert_array_equal(scale, 1.0)
    # Fine-tuning still trains every layer's kept weights.
    before, after = _kernels(history[freeze][0]), _kernels(history[-1][0])
    for a, b, k in zip(before, after, _kernels(frozen_masks)):
      k = np.asarray(k)
      self.assertTrue(np.any(np.asarray(a)[k] != np.asarray(b)[k]))

  def test_filter_fn_selects_what_is_thresholded(self):
    x, y = _data()
    params = _params()
    only_first = lambda path, leaf: path == "dense_0/kernel"
    tx = st3_lib.st3(optax.sgd(0.1), sparsity=0.5, start_step=0, end_step=2,
                     filter_fn=only_first)
    state = tx.init(params)
    step = jax.jit(_make_step(tx, x, y))
    for _ in range(3):
      params, state = step(params, state)[:2]
    masks = core.get_masks(state)
    self.assertIsNone(masks["dense_1"]["kernel"])
    self.assertEqual(int(np.sum(~np.asarray(masks["dense_0"]["kernel"]))),
                     round(0.5 * SIZES[0] * SIZES[1]))
    self.assertTrue(np.all(np.asarray(params["dense_1"]["kernel"]) != 0.0))
    raw = st3_lib.get_raw_weights(state)
    self.assertIsNone(raw["dense_1"]["kernel"])  # not copied into the state

  def test_state_layout_and_raw_weight_accessor(self):
    params = _params()
    tx = st3_lib.st3(optax.sgd(0.1), sparsity=0.5, start_step=0, end_step=2)
    state = tx.init(params)
    self.assertIsInstance(state, core.PruneState)
    self.assertIsInstance(state.method_state, core.RawState)
    self.assertIsInstance(state.method_state.rule, st3_lib.ST3State)
    chex.assert_trees_all_equal(st3_lib.get_raw_weights(state, params), params)
    chained = optax.chain(optax.clip(1.0), tx).init(params)
    chex.assert_trees_all_equal(st3_lib.get_raw_weights(chained, params),
                                params)
    raw = st3_lib.get_raw_weights(state)
    self.assertIsNone(raw["dense_0"]["bias"])
    chex.assert_shape(st3_lib.st3_scales(state)["dense_0"]["kernel"],
                      (SIZES[1],))
    with pytest.raises(ValueError, match="raw-weight states"):
      st3_lib.get_raw_weights(optax.sgd(0.1).init(params))

  def test_nnx_optimizer(self):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    class MLP(nnx.Module):

      def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 12, rngs=rngs)
        self.l2 = nnx.Linear(12, 3, rngs=rngs)

      def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))

    x, y = _data()
    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, st3_lib.st3(optax.adam(1e-2), sparsity=0.5,
                                           start_step=0, end_step=2),
                        wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
      loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(
          m(x), y).mean()
      opt.update(model, nnx.grad(loss)(model))

    for _ in range(3):
      step(model, opt)
    masks = core.get_masks(opt.opt_state)
    raw = st3_lib.get_raw_weights(opt.opt_state)
    self.assertEqual(int(np.sum(~np.asarray(masks["l1"]["kernel"]))) +
                     int(np.sum(~np.asarray(masks["l2"]["kernel"]))),
                     round(0.5 * (8 * 12 + 12 * 3)))
    for layer, name in ((model.l1, "l1"), (model.l2, "l2")):
      kernel = np.asarray(layer.kernel[...])
      np.testing.assert_array_equal(kernel == 0.0,
                                    ~np.asarray(masks[name]["kernel"]))
      self.assertIsInstance(raw[name]["kernel"], jax.Array)
      self.assertTrue(np.all(np.asarray(raw[name]["kernel"]) != 0.0))

  def test_update_errors(self):
    params = _params()
    tx = st3_lib.st3(optax.sgd(0.1), sparsity=0.5, start_step=0, end_step=2)
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match="needs params"):
      tx.update(grads, state)
    bad = dict(params)
    del bad["dense_2"]
    with pytest.raises(ValueError, match="structure"):
      tx.update(grads, state, bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), r"sparsity: .*\[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity: .*\[0, 1\)"),
    (dict(start_step=-1), r"start_step: .*>= 0"),
    (dict(start_step=10, end_step=10), r"end_step: .*> start_step \(10\)"),
    (dict(end_step=2.5), r"end_step: .*int"),
    (dict(power=0.0), r"power: .*> 0"),
    (dict(power=float("inf")), r"power: .*> 0"),
    (dict(freeze_step=50), r"freeze_step: .*> end_step \(100\)"),
    (dict(freeze_step=100), r"freeze_step: .*> end_step \(100\)"),
])
def test_bad_arguments_raise_value_errors(kwargs, match):
  args = dict(sparsity=0.9, start_step=0, end_step=100)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    st3_lib.st3(optax.sgd(0.1), **args)
