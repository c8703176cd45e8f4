"""Shared argument checks, long schedules and traced hyperparameters.

* every public constructor rejects bad values (None, strings, bools, NaN,
  inf, out of range) with an error naming the argument (issue 13.3);
* schedules cost O(distinct targets), not O(events), and every event step
  fits the int32 step counter (issue 13.2);
* ``optax.inject_hyperparams`` works jitted, traced where an argument only
  enters the update, with a clear ``static_args`` error otherwise (12.5).
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import core
from flipout_jax import schedules
from flipout_jax import validate
from flipout_jax.methods import dst as dst_lib

NAN, INF = float("nan"), float("inf")


def small_params(seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"dense": {"kernel": jax.random.normal(k1, (8, 12)),
                    "bias": jnp.zeros(12)},
          "out": {"kernel": jax.random.normal(k2, (12, 4)),
                  "bias": jnp.zeros(4)}}


def loss(params, x):
  h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
  return jnp.mean((h @ params["out"]["kernel"] + params["out"]["bias"]) ** 2)


X = jax.random.normal(jax.random.PRNGKey(7), (16, 8))


def train(tx, steps, params=None, state=None):
  params = small_params() if params is None else params
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p, X), s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------
# Bad arguments: one table over the constructors and the bad values.

FRACTION = [None, "abc", "0.5", True, NAN, INF, 1.0, -0.1]
POSITIVE_INT = [None, "3", True, NAN, INF, 2.5, 0]
STEP = [None, "3", True, NAN, INF, 2.5, -1]
SEED = ["x", None, True, 1.5, -1]
POSITIVE = ["2", True, None, NAN, INF, 0.0, -1.0]
NONNEGATIVE = ["1", True, None, NAN, INF, -1.0]
OPEN_FRACTION = ["0.5", True, NAN, INF, 0.0, 1.0]
N = [0, True, 2.5, "2", None, 5]
M = [0, True, "4", None, 256]

_PERIODIC = dict(sparsity=0.9, every=10)
_DST = dict(sparsity=0.9, every=10, end_step=100)
_COMMON_PERIODIC = dict(sparsity=FRACTION, every=POSITIVE_INT,
                        prune_rate=OPEN_FRACTION, start_step=STEP, seed=SEED)
_COMMON_DST = dict(sparsity=FRACTION, every=POSITIVE_INT,
                   end_step=POSITIVE_INT, drop_fraction=OPEN_FRACTION,
                   seed=SEED)

# name: (constructor, good arguments, {argument: bad values}).
CONSTRUCTORS = {
    "flipout": (fj.flipout, _PERIODIC,
                dict(_COMMON_PERIODIC, p=POSITIVE, noise_scale=NONNEGATIVE)),
    "global_magnitude": (fj.global_magnitude, _PERIODIC,
                         dict(_COMMON_PERIODIC, noise_scale=NONNEGATIVE)),
    "random_pruning": (fj.random_pruning, _PERIODIC, _COMMON_PERIODIC),
    "snip": (fj.snip, dict(sparsity=0.9),
             dict(sparsity=FRACTION, start_step=STEP, seed=SEED)),
    "st3": (fj.st3, dict(sparsity=0.9, start_step=0, end_step=100),
            dict(sparsity=FRACTION, start_step=STEP, end_step=STEP,
                 power=POSITIVE, freeze_step=STEP[1:])),
    "dst": (fj.dst, _DST, dict(_COMMON_DST, exploration=NONNEGATIVE,
                               epsilon=POSITIVE)),
    "dst_ee": (fj.dst_ee, _DST, dict(_COMMON_DST, exploration=NONNEGATIVE,
                                     epsilon=POSITIVE)),
    "rigl": (fj.rigl, _DST, _COMMON_DST),
    "set_": (fj.set_, _DST, _COMMON_DST),
    "gradient_flow": (
        fj.gradient_flow,
        dict(measure="magnitude", sparsity=0.9, rounds=3, every=5),
        dict(sparsity=FRACTION, rounds=POSITIVE_INT,
             every=POSITIVE_INT, start_step=STEP, seed=SEED)),
    "grasp": (fj.grasp, dict(sparsity=0.9),
              dict(sparsity=FRACTION, start_step=STEP, seed=SEED)),
    "global_magnitude.n_m": (
        lambda inner, n, m: fj.global_magnitude(
            inner, sparsity=0.5, every=10, structure=fj.n_m(n, m)),
        dict(n=2, m=4), dict(n=N, m=M)),
    "global_magnitude.units": (
        lambda inner, min_per_layer: fj.global_magnitude(
            inner, sparsity=0.5, every=10,
            structure=fj.units(min_per_layer=min_per_layer)),
        dict(min_per_layer=1), dict(min_per_layer=POSITIVE_INT)),
    "sparse_training": (fj.unipts.sparse_training,
                        dict(sparsities={"dense/kernel": 0.5}),
                        dict(decay=NONNEGATIVE,
                             sparsities=[{"dense/kernel": "0.5"},
                                         {"dense/kernel": 1.0}, [0.5]])),
    "prune": (fj.prune, dict(score_fn=fj.scores.magnitude,
                             schedule=schedules.one_shot(0.5)),
              dict(weights=["abc", "mask"], seed=SEED,
                   schedule=["abc", [(1, 0.5), (2, 0.3)], [(2, 0.5), (1, 0.6)],
                             [(-1, 0.5)], [(1, 1.0)], [(1, "0.5")],
                             [(2**31, 0.5)]])),
}

BAD_CASES = [
    pytest.param(name, arg, bad, id=f"{name}-{arg}={bad!r}")
    for name, (_, _, table) in CONSTRUCTORS.items()
    for arg, values in table.items() for bad in values]


@pytest.mark.parametrize("name, arg, bad", BAD_CASES)
def test_bad_argument_raises_naming_it(name, arg, bad):
  ctor, good, _ = CONSTRUCTORS[name]
  with pytest.raises(ValueError, match=rf"^{arg}\b"):
    ctor(optax.sgd(0.1), **{**good, arg: bad})


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_good_arguments_construct_and_init(name):
  ctor, good, _ = CONSTRUCTORS[name]
  ctor(optax.sgd(0.1), **good).init(small_params())


def test_errors_state_the_valid_range():
  with pytest.raises(ValueError, match=r"^sparsity: .*\[0, 1\), got None"):
    fj.flipout(optax.sgd(0.1), sparsity=None, every=10)
  with pytest.raises(ValueError, match=r"^every: .*>= 1.*got nan"):
    fj.flipout(optax.sgd(0.1), sparsity=0.5, every=NAN)
  with pytest.raises(ValueError, match=r"^p: .*> 0, got inf"):
    fj.flipout(optax.sgd(0.1), sparsity=0.5, every=10, p=INF)
  with pytest.raises(ValueError, match=r"^seed: .*\[0, 9223372036854775807\]"):
    fj.flipout(optax.sgd(0.1), sparsity=0.5, every=10, seed="x")
  with pytest.raises(ValueError, match=r"^schedule.sparsities: .*non-decreasing"):
    fj.prune(optax.sgd(0.1), score_fn=fj.scores.magnitude,
             schedule=[(1, 0.5), (2, 0.3)])
  with pytest.raises(ValueError, match=r"^structure: expected"):
    fj.global_magnitude(optax.sgd(0.1), sparsity=0.5, every=10,
                        structure="2:4")


def test_other_public_functions_share_the_checks():
  params = small_params()
  with pytest.raises(ValueError, match=r"^strength: .*>= 0"):
    fj.hoyer_square(INF)
  with pytest.raises(ValueError, match=r"^threshold: .*> 0"):
    fj.threshold_prune(params, threshold="1e-4")
  with pytest.raises(ValueError, match=r"^tx: .*GradientTransformation"):
    fj.sparse_init("sgd")
  with pytest.raises(ValueError, match=r"^distribution\['dense/kernel'\]: "):
    fj.global_magnitude(optax.sgd(0.1), sparsity=0.5, every=10,
                        distribution={"dense/kernel": "0.5"})
  for bad in (True, NAN, "3"):
    with pytest.raises(ValueError, match=r"^num_events: "):
      schedules.n_events(0.5, bad, 10)
    with pytest.raises(ValueError, match=r"^every: "):
      schedules.polynomial(0.5, 0, 100, every=bad)


@pytest.mark.parametrize("name, good", [
    ("flipout", dict(sparsity=0.5, every=2)),
    ("st3", dict(sparsity=0.5, start_step=0, end_step=4)),
    ("sparse_training", dict(sparsities={"dense/kernel": 0.5})),
])
def test_grads_that_do_not_match_params_name_grads_and_the_leaf(name, good):
  ctor = CONSTRUCTORS[name][0]
  tx = ctor(optax.sgd(0.1), **good)
  params = small_params()
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  wrong_shape = {**grads, "dense": {**grads["dense"],
                                    "kernel": jnp.ones((12, 8))}}
  with pytest.raises(ValueError,
                     match=r"^grads: leaf \['dense'\]\['kernel'\] has shape "
                           r"\(12, 8\), but params has \(8, 12\)"):
    tx.update(wrong_shape, state, params)
  missing = {**grads, "out": {"kernel": grads["out"]["kernel"]}}
  with pytest.raises(ValueError,
                     match=r"^grads: .*no leaf \['out'\]\['bias'\]"):
    tx.update(missing, state, params)


# ---------------------------------------------------------------------------
# Long schedules.


def _periodic_reference(t, first, every, num):
  """``(is_event, index)`` of a periodic schedule, in int64 NumPy."""
  t = np.asarray(t, np.int64)
  offset = t - first
  k = np.floor_divide(offset, every)
  is_event = (offset >= 0) & (offset % every == 0) & (k < num)
  return is_event, np.where(offset < 0, -1, np.minimum(k, num - 1))


def test_periodic_schedule_matches_the_explicit_one():
  for sched in (schedules.periodic(0.9, 7, 0.5, start_step=3),
                schedules.n_events(0.8, 4, 5, start_step=2),
                schedules.rounds(0.9, 5, 3, start_step=1),
                dst_lib.dst_schedule(0.9, 4, 30)):
    explicit = schedules.Schedule(sched.steps, sched.sparsities)
    t = jnp.arange(0, sched.steps[-1] + 10, dtype=jnp.int32)
    for got, want in zip(jax.jit(sched.event_index)(t),
                         jax.jit(explicit.event_index)(t)):
      np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(jax.jit(sched.sparsity)(t),
                                  jax.jit(explicit.sparsity)(t))


def test_event_detection_near_2_31_matches_the_arithmetic():
  end = 2**31 - 1
  sched = dst_lib.dst_schedule(0.9, every=2, end_step=end)
  assert (sched.first, sched.every, sched.num_events) == (2, 2, 2**30 - 1)
  assert sched.targets == (0.9,)
  t = np.concatenate([np.arange(0, 8), np.arange(2**31 - 12, 2**31)])
  is_event, idx = jax.jit(sched.event_index)(jnp.asarray(t, jnp.int32))
  want_event, want_idx = _periodic_reference(t, 2, 2, 2**30 - 1)
  np.testing.assert_array_equal(is_event, want_event)
  np.testing.assert_array_equal(idx, want_idx)
  # Every even step in (0, end) is an event; the saturated count is not.
  np.testing.assert_array_equal(want_event, (t % 2 == 0) & (t > 0) & (t < end))
  np.testing.assert_array_equal(
      jax.jit(sched.target_index)(idx), np.zeros_like(t))


def _construct_init_trace(make):
  """Seconds for construction + init + tracing the update (no compile)."""
  params = small_params()
  start = time.perf_counter()
  tx = make()
  state = jax.block_until_ready(tx.init(params))
  lowered = jax.jit(tx.update).lower(params, state, params)
  return time.perf_counter() - start, tx, state, lowered


@pytest.mark.parametrize("every, end_step", [
    (100, 10**8), (2, 2**31 - 1)])
def test_long_dst_schedule_is_fast_and_exact(every, end_step):
  def make(every, end):
    return fj.rigl(optax.sgd(0.1), sparsity=0.9, every=every,
                   end_step=end)

  _construct_init_trace(lambda: make(100, 1000))  # warm up jax
  seconds, tx, state, lowered = _construct_init_trace(
      lambda: make(every, end_step))
  # Before: 157 s for 10**8 (a table row per event); 2**31 ran out of memory.
  assert seconds < 5.0, seconds
  params = small_params()
  masks = fj.get_masks(state)
  groups, table = core.budget_table(
      "erk", masks, dst_lib.dst_schedule(0.9, every, end_step))
  assert table.shape == (1, len(groups))
  # Same random start and keep-counts as a short schedule.
  short = make(100, 1000).init(params)
  assert_trees_equal(masks, fj.get_masks(short))
  step = lowered.compile()
  _, after = step(params, state, params)
  assert_trees_equal(fj.get_masks(after), masks)  # count 0: no event
  # An event far into the schedule moves weights and keeps every count.
  count = 2**30 if end_step > 10**9 else 10**7
  far = state._replace(count=jnp.asarray(count, jnp.int32))
  _, moved = step(params, far, params)
  for m0, m1 in zip(jax.tree.leaves(masks), jax.tree.leaves(
      fj.get_masks(moved))):
    assert int(m0.sum()) == int(m1.sum())
  assert any(bool(jnp.any(a != b)) for a, b in zip(
      jax.tree.leaves(masks), jax.tree.leaves(fj.get_masks(moved))))
  assert int(moved.count) == count + 1


def test_events_far_into_the_step_counter_prune_exactly():
  # Two events, at 2**29 and 2**30: 50 %, then 75 %.
  tx = fj.global_magnitude(optax.sgd(0.0), sparsity=0.75, every=2**29)
  params = small_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = jax.tree.map(jnp.zeros_like, params)
  n = 8 * 12 + 12 * 4
  for count, kept in ((2**29 - 1, n), (2**29, n // 2), (2**30, n // 4)):
    _, out = update(grads, state._replace(count=jnp.int32(count)), params)
    assert sum(int(m.sum()) for m in jax.tree.leaves(fj.get_masks(out))) \
        == kept, count


@pytest.mark.parametrize("make, arg", [
    (lambda: fj.flipout(optax.sgd(0.1), sparsity=0.9, every=10**9),
     "every"),
    (lambda: fj.global_magnitude(optax.sgd(0.1), sparsity=0.75,
                                 every=2**30), "every"),
    (lambda: fj.flipout(optax.sgd(0.1), sparsity=0.5, every=10,
                        start_step=2**31 - 5), "every"),
    (lambda: fj.rigl(optax.sgd(0.1), sparsity=0.9, every=10,
                     end_step=2**31), "end_step"),
    (lambda: fj.gradient_flow(optax.sgd(0.1), measure="magnitude",
                              sparsity=0.9, rounds=3, every=10**9),
     "every"),
    (lambda: fj.st3(optax.sgd(0.1), sparsity=0.9, start_step=0,
                    end_step=2**31), "end_step"),
    (lambda: fj.snip(optax.sgd(0.1), sparsity=0.9, start_step=2**31 - 1), "start_step"),
    (lambda: fj.prune(optax.sgd(0.1), score_fn=fj.scores.magnitude,
                      schedule=[(3 * 10**9, 0.5)]), "schedule.steps"),
])
def test_event_beyond_the_int32_counter_is_an_error(make, arg):
  with pytest.raises(ValueError, match=rf"^{arg}\b.*214748364[67]"):
    make()


# ---------------------------------------------------------------------------
# optax.inject_hyperparams.

_FLIPOUT = dict(sparsity=0.75, every=2, noise_scale=1.0)
_FLIPOUT_STATIC = ("sparsity", "every", "prune_rate", "start_step",
                   "seed")


@pytest.mark.parametrize("ctor, kwargs, static", [
    (fj.flipout, _FLIPOUT, _FLIPOUT_STATIC),
    (fj.dst_ee, dict(sparsity=0.5, every=2, end_step=8),
     ("sparsity", "every", "end_step", "seed")),
    (fj.st3, dict(sparsity=0.5, start_step=0, end_step=4),
     ("sparsity", "start_step", "end_step")),
    (fj.flipout, dict(sparsity=0.5, end_step=4, structure=fj.n_m(2, 4)),
     ("sparsity", "prune_rate", "start_step", "end_step", "seed")),
])
def test_inject_hyperparams_jitted_matches_the_plain_transformation(
    ctor, kwargs, static):
  plain, _ = train(ctor(optax.adam(1e-2), **kwargs), 6)
  injected = optax.inject_hyperparams(ctor, static_args=static)(
      optax.adam(1e-2), **kwargs)
  params, state = train(injected, 6)
  assert_trees_equal(params, plain)
  assert int(jnp.sum(~fj.get_masks(state)["dense"]["kernel"])) > 0


def test_traced_noise_scale_set_in_the_state_takes_effect():
  injected = optax.inject_hyperparams(fj.flipout, static_args=_FLIPOUT_STATIC)(
      optax.adam(1e-2), **_FLIPOUT)
  state = injected.init(small_params())
  state.hyperparams["noise_scale"] = jnp.asarray(3.0, jnp.float32)
  params, state = train(injected, 6, state=state)
  want, want_state = train(
      fj.flipout(optax.adam(1e-2), **{**_FLIPOUT, "noise_scale": 3.0}), 6)
  # Same masks; the weights agree to float32 rounding (XLA may fold a
  # constant scale differently from a traced one).
  assert_trees_equal(fj.get_masks(state), fj.get_masks(want_state))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  other, _ = train(fj.flipout(optax.adam(1e-2), **_FLIPOUT), 6)
  assert not np.allclose(params["out"]["kernel"], other["out"]["kernel"],
                         rtol=1e-3)


def test_inject_hyperparams_without_static_args_names_the_argument():
  injected = optax.inject_hyperparams(fj.flipout)(optax.adam(1e-2),
                                                  **_FLIPOUT)
  with pytest.raises(ValueError,
                     match=r"^sparsity: .*static.*static_args"):
    train(injected, 1)
  # Traced inside jit (not only concrete at init): the same error.
  tx = fj.flipout(optax.adam(1e-2), **_FLIPOUT)
  state = tx.init(small_params())
  with pytest.raises(ValueError, match=r"^every: got a traced value"):
    jax.jit(lambda e: fj.flipout(optax.adam(1e-2), sparsity=0.5,
                                 every=e))(jnp.int32(3))
  del state


def test_traced_traceable_argument_skips_the_range_check_only():
  traced = []
  jax.jit(lambda s: traced.append(validate.number(
      s, "noise_scale", low=0, traceable=True)) or s)(jnp.float32(-1.0))
  assert validate.is_traced(traced[0])
  with pytest.raises(ValueError, match=r"^noise_scale: .*>= 0, got -1.0"):
    validate.number(jnp.float32(-1.0), "noise_scale", low=0, traceable=True)
  assert math.isclose(validate.number(np.float32(0.5), "x"), 0.5)


# v2 vocabulary (README, "Renamed in v2"): one name per thing, no aliases.
def test_v2_removed_aliases_are_gone():
  assert not hasattr(fj, "sparse_evolutionary_training")
  assert not hasattr(fj, "st3_raw_weights")
  assert not hasattr(fj.scores, "grasp")
  assert not hasattr(fj.scores, "gradient_flow_score")
  assert not hasattr(fj.unipts, "prune")
  assert not hasattr(fj.unipts, "raw_weights")


@pytest.mark.parametrize("build, old", [
    (lambda **kw: fj.flipout(optax.sgd(0.1), sparsity=0.5, **kw),
     "prune_every"),
    (lambda **kw: fj.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10, **kw),
     "update_every"),
    (lambda **kw: fj.gradient_flow(optax.sgd(0.1), measure="magnitude",
                                   sparsity=0.5, rounds=2, **kw),
     "steps_per_round"),
    (lambda **kw: fj.snip(optax.sgd(0.1), sparsity=0.5, **kw), "step"),
])
def test_v2_old_keywords_name_the_argument(build, old):
  with pytest.raises(TypeError, match=old):
    build(**{old: 2})
