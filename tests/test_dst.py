"""Tests for flipout_jax.methods.dst: DST-EE, RigL and SET.

Everything runs on a 16-32-24-4 MLP (1,376 prunable weights) for a few dozen
steps; the expensive part is compiling, so most checks share the recorded runs
of a few module-scoped fixtures.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import distributions
from flipout_jax import scores
from flipout_jax.methods import dst

SIZES = (16, 32, 24, 4)
LAYERS = ("dense_0", "dense_1", "dense_2")
# At 0.6, ERK's density of the 24x4 head would be ~1.2: it is made dense, so
# the runs cover a dense layer (where drop-and-grow must be a no-op) too.
SPARSITY = 0.6
UPDATE_EVERY = 2
END_STEP = 11  # events at 2, 4, 6, 8, 10; none from 11 on
STEPS = 14
EVENTS = (2, 4, 6, 8, 10)
BIG_C = 1e4  # exploration bonus of never-active weights >> any |g|


def _init_params(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(SIZES) - 1)
  return {
      f"dense_{i}": {
          "kernel": jax.random.normal(k, (a, b)) / math.sqrt(a),
          "bias": jnp.zeros((b,)),
      } for i, (k, a, b) in enumerate(zip(keys, SIZES[:-1], SIZES[1:]))
  }


def _data(seed=1, n=64):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return (jax.random.normal(kx, (n, SIZES[0])),
          jax.random.randint(ky, (n,), 0, SIZES[-1]))


def _loss(params, x, y):
  h = x
  for i in range(len(SIZES) - 1):
    layer = params[f"dense_{i}"]
    h = h @ layer["kernel"] + layer["bias"]
    if i < len(SIZES) - 2:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def _kernels(tree):
  return [np.asarray(tree[name]["kernel"]) for name in LAYERS]


def _budget_keep(sparsity=SPARSITY, distribution="erk"):
  shapes = [(a, b) for a, b in zip(SIZES[:-1], SIZES[1:])]
  return distributions.budget(distribution, [f"{n}/kernel" for n in LAYERS],
                              shapes, sparsity).keep


def _param_buffers(inner_state, params):
  """Every per-parameter buffer (momentum, mu, nu, ...) in an optax state."""
  treedef = jax.tree.structure(params)

  def is_buffer(x):
    return isinstance(x, dict) and jax.tree.structure(x) == treedef

  return [x for x in jax.tree.leaves(inner_state, is_leaf=is_buffer)
          if is_buffer(x)]


def _run(tx, steps=STEPS, seed=0, init_tx=None):
  """Trains with a jitted step; records params and state after each update.

  ``init_tx`` (default ``tx``) makes the initial state: the seed of a
  transformation only enters its state (``PruneState.key``), so runs of
  several seeds can share ``tx``'s compiled update.
  """
  x, y = _data()

  @jax.jit
  def step(params, state):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = _init_params(seed)
  state = (tx if init_tx is None else init_tx).init(params)
  history = [jax.device_get((params, state))]
  for _ in range(steps):
    params, state = step(params, state)
    history.append(jax.device_get((params, state)))
  return history, step


def _masks(state):
  return [np.asarray(m) for m in _kernels(fj.get_masks(state))]


@pytest.fixture(scope="module")
def big_c_run():
  """DST-EE with a huge exploration weight under SGD with momentum."""
  tx = dst.dst_ee(optax.sgd(0.1, momentum=0.9), sparsity=SPARSITY,
                  every=UPDATE_EVERY, end_step=END_STEP,
                  exploration=BIG_C)
  return _run(tx)


# ---------------------------------------------------------------------------
# Arguments.

_GOOD = dict(sparsity=0.9, every=10, end_step=100)


@pytest.mark.parametrize("bad, match", [
    (dict(sparsity=1.0), r"sparsity: .*\[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity: .*\[0, 1\)"),
    (dict(every=0), r"every: .*>= 1"),
    (dict(every=2.5), r"every: .*>= 1"),
    (dict(end_step=0), r"end_step: .*>= 1"),
    (dict(drop_fraction=0.0), r"drop_fraction: .*\(0, 1\)"),
    (dict(drop_fraction=1.0), r"drop_fraction: .*\(0, 1\)"),
    (dict(grow="magnitude"), r"grow: .*'dst_ee', 'rigl', 'random'"),
    (dict(exploration=-1.0), r"exploration: .*>= 0"),
    (dict(epsilon=0.0), r"epsilon: .*> 0"),
    (dict(distribution="erdos"), r"distribution: "),
    (dict(restart_regrown="yes"), r"restart_regrown: .*True or False"),
    (dict(restart_regrown=None), r"restart_regrown: .*True or False"),
])
def test_bad_arguments_raise_naming_the_argument(bad, match):
  with pytest.raises(ValueError, match=match):
    dst.dst(optax.sgd(0.1), **{**_GOOD, **bad})


def test_family_defaults_and_schedule():
  assert dst.DEFAULT_DROP_FRACTION == {"dst_ee": 0.5, "rigl": 0.5,
                                       "random": 0.3}
  schedule = dst.dst_schedule(0.9, every=3, end_step=12)
  assert schedule.steps == (3, 6, 9)  # end_step is exclusive, 0 is no event
  assert set(schedule.sparsities) == {0.9}
  assert dst.dst_schedule(0.9, every=5, end_step=5).steps == ()


# ---------------------------------------------------------------------------
# ERK and budgets.


def test_erk_densities_cap_dense_layers_and_are_exact():
  shapes = [(784, 300), (300, 100), (100, 10)]
  sizes = np.array([np.prod(s) for s in shapes], np.float64)
  dens = distributions.erk_densities(shapes, 0.5)
  assert np.all(dens <= 1.0) and np.all(dens > 0.0)
  # Raw ERK would give the two small layers densities above 1: made dense.
  np.testing.assert_array_equal(dens[1:], [1.0, 1.0])
  np.testing.assert_allclose(np.sum(dens * sizes), 0.5 * sizes.sum(),
                             rtol=1e-12)
  # Unconstrained layers keep the ERK ratio (sum of dims / product of dims).
  dens = distributions.erk_densities(shapes, 0.05)
  raw = np.array([np.sum(s) / np.prod(s) for s in shapes])
  np.testing.assert_allclose(dens / raw, dens[0] / raw[0])


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.98, 0.999])
def test_erk_budget_global_count_is_exact(sparsity):
  shapes = [(784, 300), (300, 100), (100, 10), (3, 3, 16, 32)]
  sizes = np.array([np.prod(s) for s in shapes])
  n = int(sizes.sum())
  b = distributions.budget("erk", ["a", "b", "c", "d"], shapes, sparsity)
  assert b.groups == ((0,), (1,), (2,), (3,))
  assert int(b.keep.sum()) == n - round(sparsity * n)
  assert np.all((b.keep >= 0) & (b.keep <= sizes))


def test_initial_masks_are_random_with_exact_erk_counts():
  params = _init_params()
  keep = _budget_keep()
  n = sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:]))
  assert int(keep.sum()) == n - round(SPARSITY * n)
  assert keep[2] == SIZES[2] * SIZES[3]  # the head is dense under ERK
  masks = {}
  for seed in (0, 1):
    tx = dst.rigl(optax.sgd(0.1), sparsity=SPARSITY, every=2,
                  end_step=10, seed=seed)
    masks[seed] = _kernels(fj.get_masks(tx.init(params)))
    np.testing.assert_array_equal([m.sum() for m in masks[seed]], keep)
  assert not np.array_equal(masks[0][0], masks[1][0])  # seeded, random
  # Biases are not prunable.
  assert fj.get_masks(tx.init(params))["dense_0"]["bias"] is None


# ---------------------------------------------------------------------------
# The drop-and-grow rule on hand-made inputs.


def _ctx(masks, params, dense_grads, step, coverage=None):
  return scores.ScoreContext(
      step=jnp.int32(step), masks=masks, params=params, old_params=params,
      grads=dense_grads, dense_grads=dense_grads, method_state=coverage,
      key=jax.random.PRNGKey(0), extra_args={})


def test_rule_drops_smallest_magnitude_and_grows_best_score():
  masks = {"w": jnp.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)}
  params = {"w": jnp.array([[5., -4., .1, 3.], [0., 0., 0., 0.]])}
  grads = {"w": jnp.array([[0., 0., 9., 0.], [1., -2., .5, 0.]])}
  rule = dst.drop_and_grow(drop_fraction=0.5, end_step=100)
  # At t = 0, d_t = d_0 = 0.5: drop ⌊0.5·4⌋ = 2 (0.1 and 3.0), then grow 2 by
  # |g| among all inactive weights, the just-dropped 0.1 (|g| = 9) included.
  ctx = _ctx(masks, params, grads, step=0)
  new, restart = rule(ctx, dst.rigl_score(ctx), ((0,),), jnp.array([4]))
  np.testing.assert_array_equal(new["w"], [[1, 1, 1, 0], [0, 1, 0, 0]])
  # 0.1 was dropped and grown back: it restarts (at 0.0, fresh moments).
  np.testing.assert_array_equal(restart["w"], [[0, 0, 1, 0], [0, 0, 0, 0]])
  # Without restarts the rule is a plain one: the same masks, nothing else.
  plain = dst.drop_and_grow(0.5, 100, restart_regrown=False)
  out = plain(ctx, dst.rigl_score(ctx), ((0,),), jnp.array([4]))
  assert out.restart is None
  np.testing.assert_array_equal(out.masks["w"], new["w"])
  # DST-EE with a big c prefers the never-active row (N = 0) over the
  # just-dropped weights (N = 5), then ranks those by |g|.
  coverage = {"w": jnp.array([[5, 5, 5, 5], [0, 0, 0, 0]], jnp.int32)}
  ctx = _ctx(masks, params, grads, step=10, coverage=coverage)
  score = dst.dst_ee_score(exploration=100.0, epsilon=1.0)(ctx)
  rule = dst.drop_and_grow(drop_fraction=0.6, end_step=10**6)
  new, restart = rule(ctx, score, ((0,),), jnp.array([4]))
  # d_10 ≈ 0.6: ⌊0.6·4⌋ = 2 dropped (0.1 and 3.0) and grown.
  np.testing.assert_array_equal(new["w"], [[1, 1, 0, 0], [1, 1, 0, 0]])
  assert not np.any(restart["w"])
  # The score itself: |g| + c·ln(t + 1)/(N + ε).
  expected = np.abs(grads["w"]) + 100.0 * np.log(11.0) / (
      np.asarray(coverage["w"]) + 1.0)
  np.testing.assert_allclose(score["w"], expected, rtol=1e-6)


def test_rule_with_global_group_keeps_the_total():
  masks = {"a": jnp.array([1, 1, 1, 0], bool), "b": jnp.array([1, 0, 0], bool)}
  params = {"a": jnp.array([.1, .2, 3., 0.]), "b": jnp.array([.05, 0., 0.])}
  grads = {"a": jnp.array([0., 0., 0., 1.]), "b": jnp.array([0., 7., 3.])}
  ctx = _ctx(masks, params, grads, step=0)
  rule = dst.drop_and_grow(drop_fraction=0.6, end_step=10)
  new, _ = rule(ctx, dst.rigl_score(ctx), ((0, 1),), jnp.array([4]))
  # ⌊0.6·4⌋ = 2 dropped globally (0.05 and 0.1); grown: |g| = 7 and 3.
  np.testing.assert_array_equal(new["a"], [0, 1, 1, 0])
  np.testing.assert_array_equal(new["b"], [0, 1, 1])


def test_dst_ee_with_zero_exploration_is_rigl_rule():
  key = jax.random.PRNGKey(3)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  shape = (40, 30)
  masks = {"w": jax.random.bernoulli(k1, 0.3, shape)}
  params = {"w": jnp.where(masks["w"], jax.random.normal(k2, shape), 0.0)}
  grads = {"w": jax.random.normal(k3, shape)}
  coverage = {"w": jax.random.randint(k4, shape, 0, 50)}
  rule = dst.drop_and_grow(0.5, 1000)

  @jax.jit
  def both(step):
    ctx = _ctx(masks, params, grads, step, coverage)
    ee, rl = dst.dst_ee_score(exploration=0.0)(ctx), dst.rigl_score(ctx)
    return (ee, rl, rule(ctx, ee, ((0,),), None).masks,
            rule(ctx, rl, ((0,),), None).masks)

  for step in (1, 100, 700):
    ee, rl, ee_masks, rl_masks = both(step)
    np.testing.assert_array_equal(ee["w"], rl["w"])
    np.testing.assert_array_equal(ee_masks["w"], rl_masks["w"])
    assert (ee_masks["w"] != masks["w"]).any()


def test_cosine_drop_fraction():
  d0, end = 0.3, 1000
  for t in (0, 1, 250, 500, 999, 1000, 5000):
    expected = d0 / 2 * (1 + math.cos(math.pi * min(t, end) / end))
    np.testing.assert_allclose(dst.cosine_drop_fraction(t, d0, end), expected,
                               atol=1e-7)
  final = float(dst.cosine_drop_fraction(end, d0, end))
  assert final == pytest.approx(0.0, abs=1e-8)


def test_coverage_counter_saturates_and_counts_active_only():
  tracker = dst.coverage_counter()
  masks = {"w": jnp.array([True, False, True])}
  counts = {"w": jnp.array([0, 0, jnp.iinfo(jnp.int32).max - 1], jnp.int32)}
  for _ in range(3):
    counts = tracker.update(counts, fj.core.Step(
        step=None, params=None, new_params=None, grads=None,
        dense_grads=None, masks=masks, extra_args={}))
  np.testing.assert_array_equal(counts["w"], [3, 0, jnp.iinfo(jnp.int32).max])
  # Counts survive a mask change (coverage is cumulative).
  assert tracker.prune(counts, {"w": ~masks["w"]}) is counts


# ---------------------------------------------------------------------------
# Full runs.


def test_counts_constant_and_dropped_equals_grown(big_c_run):
  history, _ = big_c_run
  keep = _budget_keep()
  n = sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:]))
  changed_events = 0
  for t in range(1, len(history)):
    old, new = _masks(history[t - 1][1]), _masks(history[t][1])
    params = _kernels(history[t][0])
    np.testing.assert_array_equal([m.sum() for m in new], keep)
    assert sum(m.sum() for m in new) == n - round(SPARSITY * n)
    for o, m, p in zip(old, new, params):
      assert (o & ~m).sum() == (m & ~o).sum()  # #dropped == #grown
      assert np.all(p[~m] == 0.0)  # every inactive weight is exactly 0.0
    step = t - 1  # the update that produced history[t]
    if any((o != m).any() for o, m in zip(old, new)):
      changed_events += 1
      assert step in EVENTS
  assert changed_events == len(EVENTS)


def test_pruned_at_init_weights_are_zeroed_by_first_update(big_c_run):
  history, _ = big_c_run
  params0, state0 = history[0]
  masks0 = _masks(state0)
  assert any(np.any(p[~m] != 0) for p, m in zip(_kernels(params0), masks0))
  for p, m in zip(_kernels(history[1][0]), masks0):
    assert np.all(p[~m] == 0.0)


def test_drop_fraction_follows_cosine_and_stops_at_end_step(big_c_run):
  history, _ = big_c_run
  keep = _budget_keep()
  checked = 0
  for t in range(1, len(history)):
    step = t - 1
    old, new = _masks(history[t - 1][1]), _masks(history[t][1])
    coverage = _kernels(history[t][1].method_state)
    if step not in EVENTS:
      for o, m in zip(old, new):
        np.testing.assert_array_equal(o, m)
      continue
    d = 0.5 / 2 * (1 + math.cos(math.pi * step / END_STEP))
    for layer, (o, m, c) in enumerate(zip(old, new, coverage)):
      n_drop = math.floor(d * keep[layer])
      # Not at an integer boundary, where float rounding could flip ⌊·⌋.
      assert abs(d * keep[layer] - round(d * keep[layer])) > 1e-4
      never_active = (c == 0).sum()
      net = (o & ~m).sum()
      if keep[layer] == o.size:
        # The dense head: only the just-dropped can grow back; no change.
        assert never_active == 0 and net == 0
      else:
        # c is huge and enough weights were never active: nothing dropped
        # is regrown, so the net change is exactly ⌊d_t·a⌋.
        assert never_active >= n_drop
        assert net == n_drop, (step, layer)
        checked += 1
  assert checked == 2 * len(EVENTS)  # both sparse layers at every event
  # After end_step the masks never change again.
  for t in range(END_STEP + 1, len(history)):
    for o, m in zip(_masks(history[t - 1][1]), _masks(history[t][1])):
      np.testing.assert_array_equal(o, m)


def test_big_exploration_grows_never_active_weights_first(big_c_run):
  history, _ = big_c_run
  grew_any = False
  for step in EVENTS:
    before, after = history[step], history[step + 1]
    old, new = _masks(before[1]), _masks(after[1])
    for o, m, c in zip(old, new, _kernels(before[1].method_state)):
      grown = m & ~o
      # Coverage before this update is 0 iff the weight was never active.
      assert np.all(c[grown] == 0)
      grew_any |= grown.any()
  assert grew_any


def test_coverage_counts_only_active_updates(big_c_run):
  history, _ = big_c_run
  total = [np.zeros_like(m, np.int64) for m in _masks(history[0][1])]
  for t in range(1, len(history)):
    # The update producing history[t] ran with the masks of history[t - 1].
    total = [s + m for s, m in zip(total, _masks(history[t - 1][1]))]
    for s, c in zip(total, _kernels(history[t][1].method_state)):
      np.testing.assert_array_equal(c, s)


def test_jits_once(big_c_run):
  _, step = big_c_run
  assert step._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize("inner", [
    optax.sgd(0.1, momentum=0.9),
    optax.adam(1e-2),
], ids=["sgd_momentum", "adam"])
def test_grown_weights_start_at_zero_with_zero_moments(inner):
  tx = dst.dst_ee(inner, sparsity=0.8, every=3, end_step=8,
                  exploration=BIG_C)
  history, _ = _run(tx, steps=8)
  params = _init_params()
  grown_total = 0
  for step in (3, 6):
    old, new = _masks(history[step][1]), _masks(history[step + 1][1])
    after_params, after_state = history[step + 1]
    buffers = _param_buffers(after_state.inner_state, params)
    assert len(buffers) >= 1
    for i, (o, m) in enumerate(zip(old, new)):
      grown = m & ~o
      grown_total += grown.sum()
      assert np.all(_kernels(after_params)[i][grown] == 0.0)
      for buf in buffers:
        assert np.all(_kernels(buf)[i][grown] == 0.0)
        # Weights active before and after keep their (non-zero) moments.
        assert np.any(_kernels(buf)[i][o & m] != 0.0)
    # And the grown weights train from the next update on.
    next_params = _kernels(history[step + 2][0])
    assert any(np.any(p[m & ~o] != 0.0)
               for p, m, o in zip(next_params, new, old))
  assert grown_total > 0


@pytest.mark.parametrize("inner", [
    optax.sgd(1e-3, momentum=0.9),
    optax.adam(1e-3),
], ids=["sgd_momentum", "adam"])
def _regrown_run(inner, **kwargs):
  """Three RigL updates on one 2 x 4 kernel whose event regrows a weight.

  4 weights alive. The smallest alive weight (0.1) gets by far the largest
  gradient, so RigL drops it (smallest |θ|) and grows it back (largest |g|)
  in the event at step 2 (small steps keep it the smallest).
  """
  params = {"w": jnp.array([[5., -4., .1, 3.], [0., 0., 0., 0.]])}
  masks = {"w": jnp.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)}
  grads = {"w": jnp.array([[.01, .01, -9., .01], [1., -2., .5, 0.]])}
  tx = dst.rigl(inner, sparsity=0.5, every=2,
                filter_fn=lambda path, leaf: True, **kwargs)
  state = tx.init(params)
  state = state._replace(masks=masks)
  step = jax.jit(tx.update)
  for t in range(3):  # updates with count 0, 1 (no event) and 2 (event)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    if t < 2:
      assert params["w"][0, 2] != 0.0  # trained normally before the event
  # d_2 = 0.5·(1 + cos(2π/100))/2 < 0.5: ⌊d_2·4⌋ = 1 dropped (0.1) and the
  # same weight grown back: the masks do not change at all.
  np.testing.assert_array_equal(np.asarray(fj.get_masks(state)["w"]),
                                np.asarray(masks["w"]))
  return params, state


@pytest.mark.parametrize("inner", [
    optax.sgd(1e-3, momentum=0.9),
    optax.adam(1e-3),
], ids=["sgd_momentum", "adam"])
def test_weight_dropped_and_regrown_keeps_its_value_without_restart(inner):
  # restart_regrown=False (RigL's reference, reinit_when_same=False): the
  # event changes nothing, so the run equals one without any event
  # (end_step=2: no event), value and moments of the regrown weight included.
  params, state = _regrown_run(inner, end_step=100, restart_regrown=False)
  ref_params, ref_state = _regrown_run(inner, end_step=2)
  assert params["w"][0, 2] != 0.0
  np.testing.assert_allclose(params["w"], ref_params["w"], rtol=1e-6)
  buffers = _param_buffers(state.inner_state, params)
  assert buffers
  for buf, ref in zip(buffers, _param_buffers(ref_state.inner_state, params)):
    assert buf["w"][0, 2] != 0.0
    np.testing.assert_allclose(buf["w"], ref["w"], rtol=1e-6)
  # dst_ee and set_ take the option too.
  for make in (dst.dst_ee, dst.set_):
    make(inner, sparsity=0.5, every=2, end_step=10,
         restart_regrown=False)


@pytest.mark.parametrize("inner", [
    optax.sgd(1e-3, momentum=0.9),
    optax.adam(1e-3),
], ids=["sgd_momentum", "adam"])
def test_weight_dropped_and_regrown_in_one_event_restarts_at_zero(inner):
  # The default (restart_regrown=True): the weight must restart like any
  # grown weight, at exactly 0.0 with zeroed moments, while the other alive
  # weights keep training with their moments.
  params, state = _regrown_run(inner, end_step=100)
  assert params["w"][0, 2] == 0.0
  assert np.all(np.asarray(params["w"])[0, [0, 1, 3]] != 0.0)
  buffers = _param_buffers(state.inner_state, params)
  assert buffers
  for buf in buffers:
    assert buf["w"][0, 2] == 0.0
    assert np.all(np.asarray(buf["w"])[0, [0, 1, 3]] != 0.0)


def test_dst_ee_with_zero_exploration_equals_rigl_in_training():
  kwargs = dict(sparsity=0.8, every=2, end_step=9)
  ee, _ = _run(dst.dst_ee(optax.sgd(0.1, momentum=0.9), exploration=0.0,
                          **kwargs), steps=9)
  rl, _ = _run(dst.rigl(optax.sgd(0.1, momentum=0.9), **kwargs), steps=9)
  changed = False
  for t in range(1, 10):
    for a, b in zip(_masks(ee[t][1]), _masks(rl[t][1])):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(_kernels(ee[t][0]), _kernels(rl[t][0])):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    changed |= any((a != b).any() for a, b in
                   zip(_masks(rl[t - 1][1]), _masks(rl[t][1])))
  assert changed


def test_set_grows_at_random_with_constant_counts():
  kwargs = dict(sparsity=0.8, every=2, end_step=5)
  tx = dst.set_(optax.sgd(0.1), seed=0, **kwargs)
  runs = [_run(tx, steps=4, init_tx=dst.set_(optax.sgd(0.1), seed=s,
                                             **kwargs))[0] for s in (0, 1)]
  keep = _budget_keep(0.8)
  for history in runs:
    for _, state in history:
      np.testing.assert_array_equal([m.sum() for m in _masks(state)], keep)
  # Different seeds: different starts and different growth.
  assert not np.array_equal(_masks(runs[0][-1][1])[0],
                            _masks(runs[1][-1][1])[0])


class VariantsTest(chex.TestCase):
  """The update, called directly, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_update_keeps_counts_and_zeros(self):
    tx = dst.dst(optax.sgd(0.05, momentum=0.9), sparsity=0.7, every=2,
                 end_step=6, grow="dst_ee", distribution="uniform")
    update = self.variant(tx.update)
    x, y = _data()
    params = _init_params()
    state = tx.init(params)
    keep = _budget_keep(0.7, "uniform")
    changed = False
    for step in range(3):  # the event is at step 2
      old = _masks(state)
      grads = jax.grad(_loss)(params, x, y)
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
      new = _masks(state)
      chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
      np.testing.assert_array_equal([m.sum() for m in new], keep)
      for o, m, p in zip(old, new, _kernels(params)):
        self.assertEqual((o & ~m).sum(), (m & ~o).sum())
        self.assertTrue(np.all(p[~m] == 0.0))
      self.assertEqual(int(state.count), step + 1)
      changed |= any((o != m).any() for o, m in zip(old, new))
    self.assertTrue(changed)


# ---------------------------------------------------------------------------
# Flax front ends.


def test_nnx_optimizer():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.dense_0 = nnx.Linear(SIZES[0], SIZES[1], rngs=rngs)
      self.dense_1 = nnx.Linear(SIZES[1], SIZES[2], rngs=rngs)
      self.dense_2 = nnx.Linear(SIZES[2], SIZES[3], rngs=rngs)

    def __call__(self, x):
      x = jax.nn.relu(self.dense_0(x))
      return self.dense_2(jax.nn.relu(self.dense_1(x)))

  model = MLP(nnx.Rngs(0))
  tx = dst.dst_ee(optax.adam(1e-2), sparsity=SPARSITY, every=2,
                  end_step=7)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = _data()

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  keep = _budget_keep()
  changed = False
  prev = None
  for _ in range(6):
    train_step(model, optimizer, x, y)
    masks = fj.get_masks(optimizer.opt_state)
    ms = [np.asarray(masks[n]["kernel"]) for n in LAYERS]
    np.testing.assert_array_equal([m.sum() for m in ms], keep)
    for name, m in zip(LAYERS, ms):
      kernel = np.asarray(getattr(model, name).kernel[...])
      assert np.all(kernel[~m] == 0.0)
    if prev is not None:
      changed |= any((a != b).any() for a, b in zip(prev, ms))
    prev = ms
  assert changed


def test_linen_train_step():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      for i, width in enumerate(SIZES[1:]):
        x = nn.Dense(width, name=f"dense_{i}")(x)
        if i < len(SIZES) - 2:
          x = nn.relu(x)
      return x

  model = MLP()
  x, y = _data()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  # RigL under a chain: grown weights' Adam moments are found and reset
  # inside whatever optax state holds them.
  tx = dst.rigl(optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(1e-2, weight_decay=1e-2)),
                sparsity=SPARSITY, every=2, end_step=7)
  state = tx.init(params)

  @jax.jit
  def train_step(params, state):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  keep = _budget_keep()
  losses = []
  grown_total = 0
  for _ in range(6):
    old = _kernels(fj.get_masks(state))
    params, state, loss = train_step(params, state)
    losses.append(float(loss))
    masks = _kernels(fj.get_masks(state))
    buffers = _param_buffers(state.inner_state, params)
    assert len(buffers) == 2  # Adam's mu and nu
    np.testing.assert_array_equal([m.sum() for m in masks], keep)
    for i, (o, m, p) in enumerate(zip(old, masks, _kernels(params))):
      assert np.all(p[~m] == 0.0)
      grown = m & ~o
      grown_total += grown.sum()
      for buf in buffers:
        assert np.all(_kernels(buf)[i][grown] == 0.0)
  assert grown_total > 0
  assert losses[-1] < losses[0]
  assert train_step._cache_size() == 1  # pylint: disable=protected-access
