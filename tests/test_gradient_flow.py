"""Tests of the gradient-flow measures, HVPs, the rounds protocol and GraSP."""

import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import core
from flipout_jax import hessian
from flipout_jax import schedules
from flipout_jax import scores
from flipout_jax.methods import gradient_flow as gf

SIZES = (6, 10, 8, 3)


def mlp_params(seed=0, sizes=SIZES, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes))
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"dense{i}"] = {
        "kernel": (jax.random.normal(keys[i], (a, b))
                   / math.sqrt(a)).astype(dtype),
        "bias": 0.1 * jnp.ones((b,), dtype),
    }
  return params


def mlp_loss(params, x, y):
  # tanh, not relu: smooth, so finite differences of the gradient are clean.
  h = x
  n = len(params)
  for i in range(n):
    h = h @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
    if i < n - 1:
      h = jnp.tanh(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def data(seed=0, n=16, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.PRNGKey(100 + seed))
  return (jax.random.normal(k1, (n, SIZES[0]), dtype),
          jax.random.randint(k2, (n,), 0, SIZES[-1]))


def kernels(tree):
  return [tree[k]["kernel"] for k in sorted(tree)]


def train(tx, params, steps, extra=True, check=None):
  """Jitted training on a fixed batch; ``extra`` passes loss_fn to update."""
  x, y = data()
  state = tx.init(params)
  chex.clear_trace_counter()  # the counter is keyed by the code of ``step``

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    loss = lambda p: mlp_loss(p, x, y)
    grads = jax.grad(loss)(params)
    kwargs = {"loss_fn": loss} if extra else {}
    updates, state = tx.update(grads, state, params, **kwargs)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state)
    if check is not None:
      check(i, params, state)
  return params, state


# ---------------------------------------------------------------------------
# Hessian-vector products and the gradient-flow identity (float64).
# ---------------------------------------------------------------------------


class HessianTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    # Scoped: float64 only inside this test, never for other test files.
    self.enter_context(jax.enable_x64(True))
    self.params = mlp_params(dtype=jnp.float64)
    self.x, self.y = data(dtype=jnp.float64)
    self.loss = lambda p: mlp_loss(p, self.x, self.y)

  @chex.variants(with_jit=True)  # eager HVPs cost seconds and add nothing
  def test_hvp_matches_central_differences(self):
    v = jax.tree.map(lambda p, k: jax.random.normal(k, p.shape, jnp.float64),
                     self.params,
                     jax.tree.unflatten(jax.tree.structure(self.params),
                                        list(jax.random.split(
                                            jax.random.PRNGKey(7), 6))))
    hv = self.variant(lambda p, v: hessian.hvp(self.loss, p, v))(self.params, v)
    eps = 1e-5
    grad = jax.jit(jax.grad(self.loss))
    shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, self.params, v)
    fd = jax.tree.map(lambda a, b: (a - b) / (2 * eps),
                      grad(shift(1.0)), grad(shift(-1.0)))
    flat_hv = jnp.concatenate([a.ravel() for a in jax.tree.leaves(hv)])
    flat_fd = jnp.concatenate([a.ravel() for a in jax.tree.leaves(fd)])
    chex.assert_type(flat_hv, jnp.float64)
    rel = jnp.linalg.norm(flat_hv - flat_fd) / jnp.linalg.norm(flat_fd)
    self.assertLess(float(rel), 1e-3)
    # And ``grad_and_hvp`` returns the gradient as the JVP's primal output.
    g, hv2 = jax.jit(lambda p, v: hessian.grad_and_hvp(self.loss, p, v))(
        self.params, v)
    chex.assert_trees_all_close(g, grad(self.params), rtol=1e-12)
    chex.assert_trees_all_close(hv2, hv, rtol=1e-10)

  def test_second_derivative_of_weight_norm_along_gradient_flow(self):
    # θ̇ = −g  ⇒  d‖θ‖²/dt = −2θᵀg  and  d²‖θ‖²/dt² = 2‖g‖² + 2θᵀHg.
    # Explicit Euler steps of size h: the second difference of ‖θ_k‖² is
    # exact to O(h) (Euler's O(h²) position errors cancel in it to leading
    # order).
    theta = self.params
    g, hg = jax.jit(lambda t: hessian.gradient_and_hessian_gradient(
        self.loss, t))(theta)
    dot = lambda a, b: sum(jnp.vdot(u, w) for u, w in
                           zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    sq = lambda t: dot(t, t)
    h = 1e-4
    grad = jax.jit(jax.grad(self.loss))
    euler = lambda t: jax.tree.map(lambda p, d: p - h * d, t, grad(t))
    t1 = euler(theta)
    t2 = euler(t1)
    f0, f1, f2 = sq(theta), sq(t1), sq(t2)
    first = (f1 - f0) / h
    second = (f2 - 2 * f1 + f0) / h**2
    np.testing.assert_allclose(first, -2 * dot(theta, g), rtol=1e-3)
    expected = 2 * sq(g) + 2 * dot(theta, hg)
    np.testing.assert_allclose(second, expected, rtol=1e-3)
    # The test is not vacuous: the Hessian term is a sizeable part of it.
    self.assertGreater(abs(float(dot(theta, hg))), 0.05 * float(sq(g)))

  def test_batches_average_gradient_and_hvp(self):
    x, y = self.x, self.y
    batch_list = [(x[i::4], y[i::4]) for i in range(4)]  # 4 batches of 4
    stacked = jax.tree.map(lambda *b: jnp.stack(b), *batch_list)
    loss_b = lambda p, b: mlp_loss(p, *b)
    mean_loss = lambda p: sum(loss_b(p, b) for b in batch_list) / 4
    g_ref = jax.jit(jax.grad(mean_loss))(self.params)
    hvp_ref = jax.jit(lambda v: hessian.hvp(mean_loss, self.params, v))
    hg_ref = hvp_ref(g_ref)
    g_and_hg = jax.jit(lambda b, m=None: hessian.gradient_and_hessian_gradient(
        loss_b, self.params, b, m))
    for batches in (batch_list, stacked):
      g, hg = g_and_hg(batches)
      chex.assert_trees_all_close(g, g_ref, rtol=1e-10)
      chex.assert_trees_all_close(hg, hg_ref, rtol=1e-10)
    # With masks the direction is the masked gradient m⊙g.
    masks = jax.tree.map(
        lambda p: (jnp.arange(p.size).reshape(p.shape) % 2 == 0)
        if p.ndim == 2 else None, self.params)
    _, hg_m = g_and_hg(batch_list, masks)
    v = jax.tree.map(lambda m, x: x if m is None else jnp.where(m, x, 0.0),
                     masks, g_ref, is_leaf=lambda x: x is None)
    chex.assert_trees_all_close(hg_m, hvp_ref(v), rtol=1e-10)
    with pytest.raises(ValueError, match="^hvp_batches"):
      hessian.gradient_and_hessian_gradient(loss_b, self.params, [])


# ---------------------------------------------------------------------------
# The five measures on a 2×2 linear layer with a quadratic loss.
#
# L(W) = ½‖xW − y‖², x = (1, 2), y = (−3, 1), W = [[1, −1], [−1, 2]]:
#   r = xW − y = (−1, 3) − (−3, 1) = (2, 2),
#   g_ij = x_i r_j = [[2, 2], [4, 4]],
#   H_(ij),(kl) = x_i x_k δ_jl  ⇒  Hg = ‖x‖²·g = 5g = [[10, 10], [20, 20]].
# ---------------------------------------------------------------------------

X = np.array([1.0, 2.0])
Y = np.array([-3.0, 1.0])
W = np.array([[1.0, -1.0], [-1.0, 2.0]])
G = np.array([[2.0, 2.0], [4.0, 4.0]])
HG = 5.0 * G
PER_WEIGHT = {
    "magnitude": [[1, 1], [1, 2]],
    "loss_preservation": [[2, 2], [4, 8]],              # |θg|
    "loss_preservation_magnitude": [[2, 2], [4, 16]],   # |θ²g|
    "gradient_norm": [[10, -10], [-20, 40]],            # θHg, signed
    "gradient_norm_preservation": [[10, 10], [20, 40]],  # |θHg|
}
PER_FILTER = {  # filter = output column j
    "magnitude": [math.sqrt(2), math.sqrt(5)],          # ‖θ_f‖₂
    "loss_preservation": [6, 10],                       # Σ_f |θg|
    "loss_preservation_magnitude": [6, 18],             # Σ_f |θ²g|
    "gradient_norm": [-10, 30],                         # Σ_f θHg
    "gradient_norm_preservation": [10, 30],             # |Σ_f θHg| (not 30, 50)
}


def quad_loss(p):
  r = jnp.asarray(X, p["w"].dtype) @ p["w"] - jnp.asarray(Y, p["w"].dtype)
  return 0.5 * jnp.sum(r * r)


def quad_context(masks=None, loss_fn=quad_loss):
  params = {"w": jnp.asarray(W)}
  masks = {"w": jnp.ones((2, 2), bool)} if masks is None else masks
  grads = jax.grad(quad_loss)(params)
  extra = {} if loss_fn is None else {"loss_fn": loss_fn}
  return scores.ScoreContext(
      step=jnp.int32(0), masks=masks, params=params, old_params=params,
      grads=grads, dense_grads=grads, method_state=None,
      key=jax.random.PRNGKey(0), extra_args=extra)


class MeasuresTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  def test_closed_form_hessian_gradient(self):
    params = {"w": jnp.asarray(W)}
    hess = jax.hessian(quad_loss)(params)["w"]["w"].reshape(4, 4)
    np.testing.assert_allclose(hess, np.kron(np.outer(X, X), np.eye(2)))
    g, hg = hessian.gradient_and_hessian_gradient(quad_loss, params)
    np.testing.assert_allclose(g["w"], G)
    np.testing.assert_allclose(hg["w"], HG)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*gf.MEASURES)
  def test_measure_equals_hand_computed_value(self, measure):
    fn = self.variant(lambda t, g, h: (
        gf.gradient_flow_importance(measure, t, g, h),
        gf.gradient_flow_importance(measure, t, g, h, structured=True),
        gf.gradient_flow_importance(measure, t, g, h, structured=True,
                                        broadcast=True)))
    per_weight, per_filter, broadcast = fn(jnp.asarray(W), jnp.asarray(G),
                                           jnp.asarray(HG))
    np.testing.assert_allclose(per_weight, PER_WEIGHT[measure], rtol=1e-12)
    np.testing.assert_allclose(per_filter, PER_FILTER[measure], rtol=1e-12)
    np.testing.assert_allclose(
        broadcast, np.broadcast_to(PER_FILTER[measure], (2, 2)), rtol=1e-12)

  @parameterized.parameters(*gf.MEASURES)
  def test_score_fn_computes_g_and_hg_from_loss_fn(self, measure):
    for structured, table in ((False, PER_WEIGHT), (True, PER_FILTER)):
      out = gf.gradient_flow_score(measure, structured=structured)(
          quad_context())
      np.testing.assert_allclose(
          out["w"], np.broadcast_to(table[measure], (2, 2)), rtol=1e-12)

  def test_grasp_prunes_most_negative_and_variants_use_absolute_values(self):
    params = {"w": jnp.asarray(W)}
    grads = jax.grad(quad_loss)(params)

    def masks_after_one_event(tx):
      state = tx.init(params)
      _, state = tx.update(grads, state, params, loss_fn=quad_loss)
      return np.asarray(core.get_masks(state)["w"])

    # θHg = [[10, −10], [−20, 40]]: GraSP removes −20 and −10.
    np.testing.assert_array_equal(
        masks_after_one_event(gf.grasp(optax.sgd(0.1), sparsity=0.5)),
        [[True, False], [False, True]])
    # |θHg| = [[10, 10], [20, 40]]: removes the two 10s.
    np.testing.assert_array_equal(
        masks_after_one_event(core.prune(
            optax.sgd(0.1), score_fn=gf.gradient_flow_score(
                "gradient_norm_preservation"),
            schedule=schedules.one_shot(0.5))),
        [[False, False], [True, True]])
    # Structured GraSP: filter sums (−10, 30) keep the second column only.
    np.testing.assert_array_equal(
        masks_after_one_event(gf.grasp(optax.sgd(0.1), sparsity=0.5,
                                       structure=fj.units())),
        [[False, True], [False, True]])

  def test_first_order_measures_use_step_gradient_without_loss_fn(self):
    ctx = quad_context(loss_fn=None)
    out = gf.gradient_flow_score("loss_preservation_magnitude")(ctx)
    np.testing.assert_allclose(out["w"],
                               PER_WEIGHT["loss_preservation_magnitude"])
    # Dead weights contribute nothing to a filter's score.
    masks = {"w": jnp.array([[True, True], [False, True]])}
    out = gf.gradient_flow_score("loss_preservation", structured=True)(
        quad_context(masks=masks, loss_fn=None))
    np.testing.assert_allclose(out["w"][0], [2.0, 10.0])

  def test_missing_inputs_raise(self):
    with pytest.raises(ValueError, match="^measure:"):
      gf.gradient_flow_importance("grasp", jnp.asarray(W))
    with pytest.raises(ValueError, match="^grads:"):
      gf.gradient_flow_importance("loss_preservation", jnp.asarray(W))
    with pytest.raises(ValueError, match="^hvp:"):
      gf.gradient_flow_importance("gradient_norm", jnp.asarray(W),
                                      jnp.asarray(G))
    for measure in gf.HESSIAN_MEASURES:
      with pytest.raises(ValueError, match=r"^loss_fn:.*tx\.update\(grads"):
        gf.gradient_flow_score(measure)(quad_context(loss_fn=None))


def test_structured_filters_are_the_last_axis_of_conv_kernels():
  # Flax Conv kernels are (kh, kw, in, out): a filter is one output channel.
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
  theta, g, hg = (jax.random.normal(k, (3, 3, 2, 4)) for k in (k1, k2, k3))
  axes = (0, 1, 2)
  expected = {
      "magnitude": jnp.sqrt(jnp.sum(theta**2, axes)),
      "loss_preservation": jnp.sum(jnp.abs(theta * g), axes),
      "loss_preservation_magnitude": jnp.sum(jnp.abs(theta**2 * g), axes),
      "gradient_norm": jnp.sum(theta * hg, axes),
      "gradient_norm_preservation": jnp.abs(jnp.sum(theta * hg, axes)),
  }
  for measure, value in expected.items():
    out = gf.gradient_flow_importance(measure, {"conv": theta}, {"conv": g},
                                          {"conv": hg}, structured=True)
    chex.assert_shape(out["conv"], (4,))
    np.testing.assert_allclose(out["conv"], value, rtol=1e-5)


# ---------------------------------------------------------------------------
# The prune-while-training protocol.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("p,n", [(0.75, 25), (0.9, 5), (0.5, 1), (0.0, 3)])
def test_rounds_schedule_reaches_p_with_fractions_r_k(p, n):
  sched = schedules.rounds(p, n, every=7, start_step=3)
  assert sched.steps == tuple(3 + 7 * k for k in range(1, n + 1))
  assert sched.sparsities[-1] == p
  prev = 0.0
  for k, s in enumerate(sched.sparsities, start=1):
    r_k = p / (k * p + n * (1 - p))
    assert (s - prev) / (1 - prev) == pytest.approx(r_k, rel=1e-12, abs=1e-15)
    prev = s
  np.testing.assert_allclose(
      1 - np.prod([1 - p / (k * p + n * (1 - p)) for k in range(1, n + 1)]), p)


@pytest.mark.parametrize("structured", [False, True])
def test_realised_counts_follow_rounds_and_moments_reset(structured):
  p, n, spr = 0.75, 4, 2
  params = mlp_params()
  sizes = [k.size for k in kernels(params)]
  filters = [k.shape[-1] for k in kernels(params)]
  total = sum(filters) if structured else sum(sizes)
  sps = schedules.rounds_sparsities(p, n)
  tx = gf.gradient_flow(optax.sgd(0.05, momentum=0.9),
                        measure="loss_preservation_magnitude", sparsity=p,
                        rounds=n, every=spr,
                        # every layer's filters count
                        structure=(fj.units(exclude=None) if structured
                                   else None))
  seen = []

  def check(i, params, state):
    masks = kernels(core.get_masks(state))
    if structured:
      alive = sum(int(jnp.sum(jnp.any(m, axis=0))) for m in masks)
    else:
      alive = sum(int(jnp.sum(m)) for m in masks)
    k = i // spr  # events fire in the updates with count spr, 2·spr, ...
    expected = total if k == 0 else total - round(sps[min(k, n) - 1] * total)
    assert alive == expected, (i, alive, expected)
    for m, w in zip(masks, kernels(params)):
      assert bool(jnp.all(jnp.where(m, True, w == 0.0)))
    if i % spr == 0 and 0 < k <= n:  # an event step: momentum was reset
      trace = state.inner_state[0].trace
      assert all(bool(jnp.all(t == 0)) for t in jax.tree.leaves(trace))
      seen.append(alive)

  train(tx, params, n * spr + 3, extra=False, check=check)
  assert len(seen) == n
  assert seen[-1] == total - round(p * total)
  prev = total
  for k, alive in enumerate(seen, start=1):
    r_k = p / (k * p + n * (1 - p))
    # Realised fraction of what was left matches r_k up to one unit.
    assert abs((prev - alive) / prev - r_k) <= 1.0 / prev
    prev = alive


def test_reset_moments_false_keeps_momentum():
  tx = gf.gradient_flow(optax.sgd(0.05, momentum=0.9), measure="magnitude",
                        sparsity=0.5, rounds=1, every=1,
                        reset_moments=False)
  _, state = train(tx, mlp_params(), 2, extra=False)
  trace = jax.tree.leaves(state.inner_state[0].trace)
  assert any(bool(jnp.any(t != 0)) for t in trace)


@pytest.mark.parametrize("measure", gf.MEASURES)
def test_every_measure_trains_jitted_once(measure):
  # train() wraps the step in chex.assert_max_traces(n=1): events and
  # non-events run the same compiled update.
  params, state = train(
      gf.gradient_flow(optax.sgd(0.05, momentum=0.9), measure=measure,
                       sparsity=0.8, rounds=2, every=2),
      mlp_params(), 6)
  n = sum(k.size for k in kernels(params))
  dead = sum(int(jnp.sum(~m)) for m in kernels(core.get_masks(state)))
  assert dead == round(0.8 * n)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_loss_is_evaluated_only_on_pruning_steps():
  calls = []
  x, y = data()

  def loss(p):
    jax.debug.callback(lambda: calls.append(1))
    return mlp_loss(p, x, y)

  tx = gf.gradient_flow(optax.sgd(0.05), measure="gradient_norm",
                        sparsity=0.5, rounds=2, every=2)
  params = mlp_params()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: mlp_loss(p, x, y))(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss)
    return optax.apply_updates(params, updates), state

  ran = []
  for _ in range(6):
    before = len(calls)
    params, state = step(params, state)
    jax.effects_barrier()
    ran.append(len(calls) > before)
  assert ran == [False, False, True, False, True, False]


def test_hvp_batches_through_update():
  x, y = data()
  batch_list = [(x[:8], y[:8]), (x[8:], y[8:])]
  loss_b = lambda p, b: mlp_loss(p, *b)
  params = mlp_params()
  tx = gf.grasp(optax.sgd(0.05), sparsity=0.7)
  state = tx.init(params)
  grads = jax.jit(jax.grad(loss_b))(params, batch_list[0])
  _, state = jax.jit(lambda g, s, p, b: tx.update(
      g, s, p, loss_fn=loss_b, hvp_batches=b))(grads, state, params, batch_list)
  # Reference: θ·Hg of the mean loss; the top 30% are kept globally.
  mean_loss = lambda p: (loss_b(p, batch_list[0])
                         + loss_b(p, batch_list[1])) / 2
  _, hg = jax.jit(lambda p: hessian.gradient_and_hessian_gradient(
      mean_loss, p))(params)
  ref = gf.gradient_flow_importance("gradient_norm", kernels(params),
                                        hvp=kernels(hg))
  flat = np.concatenate([np.ravel(s) for s in ref])
  got = np.concatenate([np.ravel(m) for m in kernels(core.get_masks(state))])
  assert got.sum() == flat.size - round(0.7 * flat.size)
  # Float32 rounding of the two averaging orders may only swap near-ties.
  assert flat[got].min() >= flat[~got].max() - 1e-6 * np.abs(flat).max()


def test_missing_loss_fn_is_a_clear_error_at_trace_time():
  tx = gf.gradient_flow(optax.sgd(0.05), measure="gradient_norm_preservation",
                        sparsity=0.5, rounds=2, every=10)
  with pytest.raises(ValueError, match=r"^loss_fn: .*hvp_batches"):
    train(tx, mlp_params(), 1, extra=False)


# ---------------------------------------------------------------------------
# Structured (filter) pruning.
# ---------------------------------------------------------------------------


def _filter_alive(masks):
  return [np.asarray(jnp.any(m, axis=tuple(range(m.ndim - 1)))) for m in masks]


@pytest.mark.parametrize("sparsity,distribution", [
    (0.75, "global"), (0.95, "global"), (0.6, "uniform")])
def test_structured_removes_whole_filters_and_never_empties_a_layer(
    sparsity, distribution):
  params = mlp_params()
  # The last layer is 1000× smaller: by magnitude all its filters rank last,
  # so a global ranking without the per-layer guard would empty it.
  params["dense2"]["kernel"] = params["dense2"]["kernel"] * 1e-3
  filters = [k.shape[-1] for k in kernels(params)]
  tx = gf.gradient_flow(optax.sgd(0.01), measure="magnitude",
                        sparsity=sparsity, rounds=2, every=1,
                        distribution=distribution,
                        structure=fj.units(exclude=None))  # dense2 ranked too
  params, state = train(tx, params, 4, extra=False)
  masks = kernels(core.get_masks(state))
  alive = _filter_alive(masks)
  for m, w, a in zip(masks, kernels(params), alive):
    # Whole filters: a column is all alive or all dead, and dead is 0.0.
    np.testing.assert_array_equal(np.asarray(m), np.broadcast_to(a, m.shape))
    assert bool(jnp.all(w[:, ~a] == 0.0))
    assert a.sum() >= 1
  counts = [int(a.sum()) for a in alive]
  if distribution == "global":
    target = sum(filters) - round(sparsity * sum(filters))
    assert sum(counts) == max(target, len(filters))
    assert counts[-1] == 1  # kept only by the guard
  else:
    assert counts == [max(f - round(sparsity * f), 1) for f in filters]


def test_filter_mask_rule_guard_and_exact_counts():
  # Scores per filter; layer b is worst everywhere.
  masks = {"a": jnp.ones((2, 4), bool), "b": jnp.ones((3, 3), bool)}
  sa = jnp.broadcast_to(jnp.array([4.0, 3.0, 2.0, 1.0]), (2, 4))
  sb = jnp.broadcast_to(jnp.array([-1.0, -3.0, -2.0]), (3, 3))
  ctx = quad_context(loss_fn=None)._replace(masks=masks)
  for min_filters, sparsity, expected in [
      (1, 0.5, ([1, 1, 0, 0], [1, 0, 0])),   # keep 7 − round(3.5) = 3
      (2, 0.5, ([1, 1, 0, 0], [1, 0, 1]))]:  # guard keeps 2 of b: 4 kept
    structure = fj.units(min_per_layer=min_filters, exclude=None,
                         reduce="max")
    groups, table = core.budget_table("global", masks,
                                      schedules.one_shot(sparsity), structure)
    rule = core.shrink_rule(structure)
    out = jax.jit(lambda c, s: rule(c, s, groups, table[0]).masks)(
        ctx, {"a": sa, "b": sb})
    for key, exp in zip("ab", expected):
      np.testing.assert_array_equal(
          out[key], np.broadcast_to(np.array(exp, bool), masks[key].shape))
  # Masks only shrink: a dead filter is never revived.
  masks2 = {"a": masks["a"].at[:, 0].set(False), "b": masks["b"]}
  structure = fj.units(exclude=None, reduce="max")
  groups, table = core.budget_table("global", masks2, schedules.one_shot(0.0),
                                    structure)
  rule = core.shrink_rule(structure)
  out = jax.jit(lambda c, s: rule(c, s, groups, table[0]).masks)(
      ctx._replace(masks=masks2), {"a": sa, "b": sb})
  np.testing.assert_array_equal(_filter_alive([out["a"]])[0],
                                [False, True, True, True])


def _lenet300100_params(output_scale):
  from flipout_jax import models  # pylint: disable=g-import-not-at-top
  model = models.get_model("lenet300100", num_classes=10, width=0.1)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
  # Tiny classifier weights: by magnitude its columns rank below every other
  # filter, so a global filter ranking that includes them prunes classes.
  params["fc3"]["kernel"] = params["fc3"]["kernel"] * output_scale
  return params


@pytest.mark.parametrize("output_layer", ["auto", "fc3", None])
def test_structured_leaves_the_classifier_whole_by_default(output_layer):
  params = _lenet300100_params(1e-3)
  kwargs = {} if output_layer == "auto" else dict(exclude=output_layer)
  tx = gf.gradient_flow(optax.sgd(0.0), measure="magnitude", sparsity=0.9,
                        rounds=1, every=1,
                        structure=fj.units(**kwargs))
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  for _ in range(2):  # the event is the update with count 1
    _, state = jax.jit(tx.update)(grads, state, params)
  masks = core.get_masks(state)
  out_alive = int(np.sum(np.any(np.asarray(masks["fc3"]["kernel"]), axis=0)))
  hidden = [np.any(np.asarray(masks[k]["kernel"]), axis=0) for k in ("fc1", "fc2")]
  if output_layer is None:  # the old behaviour: 9 of 10 logits constant
    assert out_alive == 1
    return
  assert out_alive == 10  # every class logit still depends on the input
  # 90 % of the hidden filters (30 + 10) are removed; fc3 is not counted.
  total = sum(h.size for h in hidden)
  assert sum(int(h.sum()) for h in hidden) == total - round(0.9 * total)


def test_output_layer_paths():
  paths = ["Dense_10/kernel", "Dense_2/kernel", "Dense_9/kernel", "conv/kernel"]
  ndims = [2, 2, 2, 4]
  out = fj.structure.output_layer_paths
  assert out(paths, ndims) == ("Dense_10/kernel",)
  assert out(paths, ndims, None) == ()
  assert out(paths, ndims, "Dense_2") == ("Dense_2/kernel",)
  assert out(["conv/kernel"], [4]) == ()  # no 2-D kernel
  assert out(["fc/kernel"], [2]) == ()  # the only layer
  with pytest.raises(ValueError, match="^exclude:.*Dense_3"):
    out(paths, ndims, "Dense_3")
  with pytest.raises(ValueError, match="^exclude:"):
    fj.units(exclude=3)


# ---------------------------------------------------------------------------
# Argument validation.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    (dict(measure="grasp"), "measure"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(rounds=0), "rounds"),
    (dict(rounds=-2), "rounds"),
    (dict(every=0), "every"),
    (dict(start_step=-1), "start_step"),
    (dict(distribution="nope"), "distribution"),
    (dict(reset_moments="some"), "reset_moments"),
    (dict(structure="units"), "structure"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
  args = dict(measure="magnitude", sparsity=0.5, rounds=3, every=5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=f"^{name}:"):
    gf.gradient_flow(optax.sgd(0.1), **args)


def test_grasp_bad_arguments():
  with pytest.raises(ValueError, match="^sparsity:"):
    gf.grasp(optax.sgd(0.1), sparsity=1.0)
  with pytest.raises(ValueError, match="^start_step:"):
    gf.grasp(optax.sgd(0.1), sparsity=0.5, start_step=-1)
  with pytest.raises(ValueError, match="^temperature:"):
    hessian.softmax_cross_entropy_loss(lambda p, x: x, temperature=0.0)


def test_float64_was_scoped_to_its_tests():
  # The float64 tests above enter jax.enable_x64 per test; it must not leak.
  assert not jax.config.jax_enable_x64
  assert jnp.asarray(1.0).dtype == jnp.float32
