"""Conformance: every public constructor at every seam a user meets.

The exact-zero contract ("pruned weights are exactly 0.0 after
``optax.apply_updates``") is checked after *every* update, in the setups users
build: optax chains before and after, MultiSteps inside and outside,
partition with one and two pruning groups, apply_if_finite with a NaN step,
inject_hyperparams as the inner optimizer, schedule-free and lookahead (or
their documented errors), Flax TrainState, nnx.Optimizer, an Equinox MLP,
vmap over seeds, lax.scan, donation, bf16/f16, and None / scalar /
zero-size / integer leaves. Each run also asserts the exact pruned count at
the end of the schedule, that ``get_masks`` and ``sparsity_report`` work, and
that the jitted step compiles once.

``CASES`` is the one list of constructors; ``test_every_constructor_has_a_case``
fails when a public pruning constructor of ``flipout_jax`` is not in
``fj.registry`` or a registered method has no Case, so a new method is
covered by adding one line. The full matrix takes a few minutes on
two cores: by default every constructor runs the plain and the hostile-leaves
setups, and the other setups (whose code path is the shared one) run for
three representatives (a masked-weights method, a raw-weights method, a
drop-and-grow method); ``pytest --runslow`` runs the full matrix.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import equinox as eqx
from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import unipts

STEPS = 6  # Every schedule below has its last event at step <= 4.
S = 0.75  # Target sparsity.


# ------------------------------------------------------------------- cases


def _sizes(masks) -> list[int]:
  return [int(np.prod(m.shape)) for m in fj.trees.prunable_leaves(masks, masks)]


def _global(s):
  return lambda masks: round(s * sum(_sizes(masks)))


def _per_layer(rounding):
  return lambda masks: sum(rounding(S * n) for n in _sizes(masks))


def _half(masks):
  return sum(_sizes(masks)) // 2


def _fixed(params):
  # Keeps the first half (row-major) of every prunable leaf.
  prunable = fj.trees.prunable_tree(params)
  return jax.tree.map(
      lambda p, s: (jnp.arange(p.size).reshape(p.shape) < p.size // 2)
      if s else None, params, prunable)


def _fixed_pruned(masks):
  return sum(n - n // 2 for n in _sizes(masks))


def _st3_pruned(masks):
  n = sum(_sizes(masks))
  return int(np.round(np.float32(S) * np.float32(n)))


def _paths(params):
  layout = fj.trees.mask_like(params, fj.trees.prunable_tree(params))
  return [p for p, _ in fj.trees.leaves_with_paths(layout)]


@dataclasses.dataclass(frozen=True)
class Case:
  """How to build one constructor for the conformance runs.

  Attributes:
    build: ``(inner, params, seed, **kw) -> tx``; ``params`` is the tree
      ``tx`` will see (e.g. one partition group's, with MaskedNode
      elsewhere); ``seed`` an int or a PRNG key (ignored by deterministic
      methods); ``kw`` the constructors' common keywords (``packed_masks``).
    pruned: mask layout -> the exact number of pruned weights after STEPS.
    raw_weights: the params are a function of raw weights in the state
      (ST-3 family, UniPTS's sparse training): optimizers that keep their own
      copy of the weights are rejected at init.
    random: its masks depend on the seed (vmap over seeds must differ).
    needs_loss_fn: its score needs ``loss_fn`` in the update's extra args.
  """
  build: Callable[..., optax.GradientTransformation]
  pruned: Callable[[Any], int]
  raw_weights: bool = False
  random: bool = False
  needs_loss_fn: bool = False


PERIODIC = dict(sparsity=S, every=2, prune_rate=0.5)  # events at 2, 4
DST = dict(sparsity=S, every=2, end_step=6, distribution="uniform")
NM = dict(n=2, m=4)

CASES: dict[str, Case] = {
    "flipout": Case(lambda i, p, seed, **kw: fj.flipout(i, **PERIODIC, seed=seed, **kw),
                    _global(S), random=True),
    "global_magnitude": Case(
        lambda i, p, seed, **kw: fj.global_magnitude(i, **PERIODIC, seed=seed, **kw),
        _global(S)),
    "random_pruning": Case(
        lambda i, p, seed, **kw: fj.random_pruning(i, **PERIODIC, seed=seed, **kw),
        _global(S), random=True),
    "snip": Case(lambda i, p, seed, **kw: fj.snip(i, sparsity=S, seed=seed, **kw),
                 _global(S)),
    "fixed_mask": Case(lambda i, p, seed, **kw: fj.fixed_mask(i, _fixed(p), **kw),
                       _fixed_pruned),
    "prune": Case(lambda i, p, seed, **kw: fj.prune(
        i, score_fn=fj.scores.magnitude,
        schedule=fj.schedules.one_shot(0.5, start_step=2), seed=seed, **kw), _global(0.5)),
    "st3": Case(lambda i, p, seed, **kw: fj.st3(i, sparsity=S, start_step=0,
                                               end_step=4, **kw),
                _st3_pruned, raw_weights=True),
    "dst": Case(lambda i, p, seed, **kw: fj.dst(i, **DST, seed=seed, **kw),
                _per_layer(round), random=True),
    "dst_ee": Case(lambda i, p, seed, **kw: fj.dst_ee(i, **DST, seed=seed, **kw),
                   _per_layer(round), random=True),
    "rigl": Case(lambda i, p, seed, **kw: fj.rigl(i, **DST, seed=seed, **kw),
                 _per_layer(round), random=True),
    "set_": Case(lambda i, p, seed, **kw: fj.set_(i, **DST, seed=seed, **kw),
                 _per_layer(round), random=True),
    "sparse_init": Case(
        lambda i, p, seed, **kw: fj.sparse_init(fj.rigl(i, **DST, seed=seed, **kw)),
        _per_layer(round), random=True),
    "gradient_flow": Case(lambda i, p, seed, **kw: fj.gradient_flow(
        i, measure="magnitude", sparsity=S, rounds=2, every=2,
        seed=seed, **kw), _global(S)),
    "grasp": Case(lambda i, p, seed, **kw: fj.grasp(i, sparsity=S, start_step=2, seed=seed, **kw),
                  _global(S), needs_loss_fn=True),
    "global_magnitude.2:4": Case(lambda i, p, seed, **kw: fj.global_magnitude(
        i, sparsity=0.5, end_step=4, structure=fj.n_m(**NM), seed=seed, **kw),
        _half),
    "flipout.2:4": Case(lambda i, p, seed, **kw: fj.flipout(
        i, sparsity=0.5, end_step=4, structure=fj.n_m(**NM), seed=seed, **kw),
        _half, random=True),
    "st3.2:4": Case(lambda i, p, seed, **kw: fj.st3(
        i, sparsity=0.5, start_step=0, end_step=4, structure=fj.n_m(**NM),
        **kw),
        _half, raw_weights=True),
    "rigl.2:4": Case(lambda i, p, seed, **kw: fj.rigl(
        i, sparsity=0.5, every=2, end_step=6, structure=fj.n_m(**NM),
        seed=seed, **kw), _half, random=True),
    "unipts.sparse_training": Case(lambda i, p, seed, **kw: unipts.sparse_training(
        i, sparsities={path: S for path in _paths(p)}, **kw), _per_layer(round),
                                   raw_weights=True),
    "movement": Case(lambda i, p, seed, **kw: fj.movement(
        i, sparsity=S, start_step=0, end_step=4, every=2, seed=seed, **kw),
                     _global(S)),
}

# Not pruning transformations: hoyer_square is a gradient regulariser (no
# masks; tested below in chains and partitions), threshold_prune a function
# of params.
NOT_PRUNING = {"hoyer_square"}
# Public constructors that wrap a pruning transformation: not methods of
# fj.registry, but covered by a Case.
WRAPPERS = {"sparse_init"}
REPRESENTATIVES = ("flipout", "st3", "rigl")


def _public_constructors() -> dict[str, Any]:
  """Public callables of flipout_jax (and its unipts module) that return an
  optax transformation, keyed by name. There are no aliases: two public
  names of one constructor fail."""
  found = {}
  for prefix, module in (("", fj), ("unipts.", unipts)):
    for name in dir(module):
      obj = getattr(module, name)
      if name.startswith("_") or not inspect.isfunction(obj):
        continue
      ret = str(inspect.signature(obj).return_annotation)
      if "GradientTransformation" in ret:
        found.setdefault(obj, []).append(prefix + name)
  aliased = sorted(names for names in found.values() if len(names) > 1)
  assert not aliased, f"aliases of one constructor: {aliased}"
  return {names[0]: obj for obj, names in found.items()}


def test_every_constructor_has_a_case():
  public = _public_constructors()
  names = set(public)
  registry = set(fj.registry.names())
  # Every public pruning constructor is registered, under its public name.
  assert names - NOT_PRUNING - WRAPPERS == registry, (
      "every public pruning constructor belongs in fj.registry: missing "
      f"{sorted(names - NOT_PRUNING - WRAPPERS - registry)}, stale "
      f"{sorted(registry - names)}")
  for name in registry:
    assert fj.registry.get(name) is public[name], name
  # Every registry entry (and every wrapper) has a Case, and nothing else
  # but methods under a structure ("<method>.2:4").
  structured = {c for c in CASES if c.endswith(".2:4")}
  assert {c[:-len(".2:4")] for c in structured} <= registry, structured
  assert registry | WRAPPERS == set(CASES) - structured, (
      "every registered method needs a conformance Case: missing "
      f"{sorted((registry | WRAPPERS) - set(CASES))}, stale "
      f"{sorted(set(CASES) - structured - registry - WRAPPERS)}")


def _slow_unless(names):
  """Every case; those not in ``names`` are marked slow."""
  return [pytest.param(n, marks=() if n in names else pytest.mark.slow)
          for n in CASES]


ALL = list(CASES)
SOME = _slow_unless(REPRESENTATIVES)


# ------------------------------------------------------------ model, steps


def make_params(seed=0, dtypes=(jnp.float32, jnp.float32), hostile=False):
  """A 8-16-4 MLP; ``hostile`` adds a None, a scalar, a zero-size kernel and
  an int leaf."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = {
      "l1": {"kernel": (jax.random.normal(k1, (8, 16)) / 3).astype(dtypes[0]),
             "bias": jnp.zeros((16,), dtypes[0])},
      "l2": {"kernel": (jax.random.normal(k2, (16, 4)) / 4).astype(dtypes[1]),
             "bias": jnp.zeros((4,), dtypes[1])},
  }
  if hostile:
    params.update(none=None, scale=jnp.ones((), jnp.float32),
                  empty={"kernel": jnp.zeros((0, 5), jnp.float32)},
                  steps=jnp.zeros((3,), jnp.int32))
  return params


def data(step, n=6):
  k1, k2 = jax.random.split(jax.random.PRNGKey(100 + step))
  return (jax.random.normal(k1, (n, 8)),
          jax.random.randint(k2, (n,), 0, 4))


def loss_fn(params, x, y):
  f32 = lambda a: a.astype(jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
  h = jnp.tanh(x @ f32(params["l1"]["kernel"]) + f32(params["l1"]["bias"]))
  logits = h @ f32(params["l2"]["kernel"]) + f32(params["l2"]["bias"])
  if "scale" in params:
    logits = logits * params["scale"]
    logits = logits + 0.0 * jnp.sum(params["empty"]["kernel"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def grads_of(params, x, y):
  """Gradients; int leaves get int zeros (what plain optax accepts)."""
  g = jax.grad(loss_fn, allow_int=True)(params, x, y)
  return jax.tree.map(
      lambda gi, p: jnp.zeros_like(p) if gi.dtype == jax.dtypes.float0 else gi,
      g, params)


def extra_args(case, params, x, y):
  if not case.needs_loss_fn:
    return {}
  return {"loss_fn": lambda p: loss_fn(p, x, y)}


def pruned_nonzero(params, masks) -> int:
  """Pruned weights that are not exactly 0.0 (independent of fj's report)."""
  return sum(int(np.sum(np.asarray(p)[~np.asarray(m)] != 0)) for p, m in zip(
      fj.trees.prunable_leaves(masks, params),
      fj.trees.prunable_leaves(masks, masks)))


def num_pruned(masks) -> int:
  return sum(int(np.sum(~np.asarray(m)))
             for m in fj.trees.prunable_leaves(masks, masks))


def assert_contract(case, params, state, *, final=False, masks=None):
  masks = fj.get_masks(state) if masks is None else masks
  assert pruned_nonzero(params, masks) == 0
  report = fj.sparsity_report(params, masks)
  assert report.ok and report.pruned_nonzero == 0
  fj.check_sparse(params, masks)
  if final:
    assert num_pruned(masks) == case.pruned(masks) == report.zeros
  return masks


def run_plain(name, tx, params, *, steps=STEPS, step_fn=None, donate=False,
              start=None):
  """Jitted steps of ``tx`` on ``params``; asserts the contract after each.
  ``start(params, state)``, if given, maps the params before the first step."""
  case = CASES[name]
  traces = []

  def step(p, s, x, y):
    traces.append(1)
    u, s = tx.update(grads_of(p, x, y), s, p, **extra_args(case, p, x, y))
    return optax.apply_updates(p, u), s

  step = jax.jit(step_fn or step, donate_argnums=(0, 1) if donate else ())
  state = tx.init(params)
  if start is not None:
    params = start(params, state)
  for t in range(steps):
    params, state = step(params, state, *data(t))
    assert_contract(case, params, state, final=t == steps - 1)
  assert len(traces) <= 1, "the step was traced more than once"
  return params, state


# ------------------------------------------------- per-constructor setups


def _packed_leaves(state):
  masks = fj.core.find_prune_states(state)[0].masks
  return [m for m in jax.tree.leaves(
      masks, is_leaf=lambda x: isinstance(x, fj.trees.PackedMask))
          if isinstance(m, fj.trees.PackedMask)]


@pytest.mark.parametrize("name", ALL)
def test_packed_masks_are_bit_identical(name):
  """The plain setup, jitted Adam steps, with the contract after each (the
  bool-mask run); and with ``packed_masks=True``: the state holds uint8 bits
  (one per weight, rounded up to whole bytes along the packed axis), and
  params, masks and every other state leaf equal the bool-mask run's bit for
  bit."""
  case = CASES[name]
  params = make_params()
  runs = [run_plain(name, case.build(optax.adam(1e-2), params, 0, **kw),
                    params) for kw in ({}, {"packed_masks": True})]
  (p0, s0), (p1, s1) = runs
  assert not _packed_leaves(s0)
  packed = _packed_leaves(s1)
  masks = fj.get_masks(s1)
  bool_leaves = fj.trees.prunable_leaves(masks, masks)
  assert len(packed) == len(bool_leaves) > 0
  for pm, m in zip(packed, bool_leaves):
    assert pm.bits.dtype == jnp.uint8 and m.dtype == jnp.bool_
    assert pm.shape == m.shape
    expected = list(m.shape)
    expected[pm.axis] = -(-m.shape[pm.axis] // 8)
    assert list(pm.bits.shape) == expected
    assert np.array_equal(np.packbits(np.asarray(m), axis=pm.axis),
                          np.asarray(pm.bits))
  def host(p, s):
    st = fj.core.find_prune_states(s)[0]
    return jax.device_get((p, fj.get_masks(s), st.count, st.key,
                           st.method_state, st.inner_state))
  a, b = host(p0, s0), host(p1, s1)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(
        np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))


def test_pack_mask_is_numpy_packbits_and_unpacks_exactly():
  rng = np.random.default_rng(0)
  for shape in [(16, 12), (5, 3), (3, 3, 7, 9), (13,), (), (1, 17)]:
    m = rng.random(shape) < 0.4
    for axis in range(max(len(shape), 1)):
      packed = fj.trees.pack_mask(jnp.asarray(m), axis)
      assert np.array_equal(np.asarray(packed.bits),
                            np.packbits(m.reshape(shape or (1,)), axis=axis))
      assert np.array_equal(np.asarray(fj.trees.unpack_mask(packed)), m)


def test_packing_axis_avoids_sharded_axes():
  mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
  spec = lambda *s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
  axis = fj.trees.packing_axis
  assert axis((16, 32)) == 0 and axis((3, 3, 64, 128)) == 2
  assert axis((5, 3)) == 0 and axis((3, 7)) == 1  # no multiple of 8: longest
  assert axis((16, 32), spec("model", None)) == 1  # the unsharded axis
  # Both sharded: the axis whose shards are whole bytes (32 / 4 = 8 rows).
  assert axis((24, 32), spec("data", "model")) == 1
  assert axis((16, 12), spec(None, "model")) == 0


def test_packed_masks_is_validated():
  with pytest.raises(ValueError, match="packed_masks: must be True or False"):
    fj.global_magnitude(optax.sgd(0.1), sparsity=0.5, every=2,
                        packed_masks=1)


@pytest.mark.parametrize("name", ALL)
def test_hostile_leaves_low_precision_chain_before_inject_hyperparams_inner(
    name):
  # None, scalar, zero-size and int leaves; a bf16 and an f16 layer; a clip
  # before (elementwise: optax's global-norm clip rejects int leaves); the
  # inner optimizer under inject_hyperparams.
  case = CASES[name]
  params = make_params(dtypes=(jnp.bfloat16, jnp.float16), hostile=True)
  # sgd without momentum: optax's moment of an int leaf starts int32 and
  # becomes float32 after one update, which retraces a plain optax step too;
  # and plain optax.adam overflows in f16 here (its eps underflows).
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  tx = optax.chain(optax.clip(1.0), case.build(inner, params, 0))
  out, state = run_plain(name, tx, params)
  assert out["none"] is None and out["steps"].dtype == jnp.int32
  assert out["l1"]["kernel"].dtype == jnp.bfloat16
  assert out["l2"]["kernel"].dtype == jnp.float16
  masks = fj.get_masks(state)
  assert masks["empty"]["kernel"] is None and masks["scale"] is None
  assert masks["l1"]["bias"] is None and masks["l1"]["kernel"].shape == (8, 16)


def _group_params(params, labels, group):
  return jax.tree.map(lambda p, l: p if l == group else optax.MaskedNode(),
                      params, labels)


@pytest.mark.parametrize("name", SOME)
def test_partition_two_groups(name):
  case = CASES[name]
  params = make_params()
  labels = {"l1": {"kernel": "a", "bias": "dense"},
            "l2": {"kernel": "b", "bias": "dense"}}
  # Group b's inner optimizer is a MultiSteps (every second update applies);
  # a global-norm clip before the partition.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.partition(
      {"a": case.build(optax.adam(1e-2), _group_params(params, labels, "a"), 0),
       "b": case.build(optax.MultiSteps(optax.sgd(0.05, momentum=0.9), 2),
                       _group_params(params, labels, "b"), 1),
       "dense": optax.adam(1e-2)}, labels))

  def check(final_masks):
    # Each group prunes its own kernel to its own target.
    one = {"l1": {"kernel": final_masks["l1"]["kernel"], "bias": None},
           "l2": {"kernel": None, "bias": None}}
    two = {"l1": {"kernel": None, "bias": None},
           "l2": {"kernel": final_masks["l2"]["kernel"], "bias": None}}
    assert num_pruned(final_masks) == case.pruned(one) + case.pruned(two)

  step = jax.jit(lambda p, s, x, y: _apply(tx, case, p, s, x, y))
  state = tx.init(params)
  if case.needs_loss_fn:
    # A group sees MaskedNode outside its leaves: no loss of the whole model.
    with pytest.raises(ValueError, match="loss_fn: this transformation sits "
                       "inside optax.masked / partition"):
      step(params, state, *data(0))
    return
  for t in range(STEPS):
    params, state = step(params, state, *data(t))
    masks = assert_contract(case, params, state)
  assert masks["l1"]["bias"] is None and masks["l2"]["bias"] is None
  check(masks)


def _apply(tx, case, p, s, x, y):
  u, s = tx.update(grads_of(p, x, y), s, p, **extra_args(case, p, x, y))
  return optax.apply_updates(p, u), s


@pytest.mark.parametrize("name", SOME)
def test_vmap_over_seeds_of_a_scan(name):
  case = CASES[name]
  params = make_params()
  keys = jax.random.split(jax.random.PRNGKey(7), 2)
  batches = [data(t) for t in range(STEPS)]
  xs = jnp.stack([b[0] for b in batches])
  ys = jnp.stack([b[1] for b in batches])
  tx = case.build(optax.adam(1e-2), params, 0)  # only its update is used

  def train(key):
    state = fj.reseed(case.build(optax.adam(1e-2), params, key).init(params),
                      key)

    def body(carry, batch):
      p, s = carry
      p, s = _apply(tx, case, p, s, *batch)
      masks = fj.get_masks(s)
      bad = sum(jnp.sum(jnp.where(m, 0, p_ != 0)) for m, p_ in zip(
          fj.trees.prunable_leaves(masks, masks),
          fj.trees.prunable_leaves(masks, p)))
      return (p, s), bad

    (p, s), bad = jax.lax.scan(body, (params, state), (xs, ys))
    return p, s, bad

  p, s, bad = jax.jit(jax.vmap(train))(keys)
  np.testing.assert_array_equal(bad, 0)
  per_seed = []
  for i in range(2):
    pi, si = jax.tree.map(lambda a: a[i], (p, s))
    per_seed.append(assert_contract(case, pi, si, final=True))
  same = all(np.array_equal(a, b) for a, b in zip(
      *(fj.trees.prunable_leaves(m, m) for m in per_seed)))
  assert same != case.random, (
      "seeds gave different masks" if same else "seeds gave the same masks")


@pytest.mark.parametrize("name", SOME)
def test_schedule_free_eval_params_are_sparse(name):
  case = CASES[name]
  params = make_params()
  tx = case.build(optax.contrib.schedule_free_adamw(1e-2), params, 0)
  if case.raw_weights:
    with pytest.raises(ValueError, match="inner: ScheduleFreeState keeps a "
                       "copy of the weights"):
      tx.init(params)
    return
  params, state = run_plain(name, tx, params)
  inner_state = fj.core.find_prune_states(state)[0].inner_state
  eval_params = optax.contrib.schedule_free_eval_params(inner_state, params)
  assert_contract(case, eval_params, state)


# ------------------- setups whose code path does not depend on the method


@pytest.mark.parametrize("name", SOME)
def test_multisteps_outside(name):
  # The first real update comes after 2 mini-steps: a sparse start (DST) is
  # applied to the params with fj.sparse_params (README, composition rules).
  case = CASES[name]
  params = make_params()
  tx = optax.MultiSteps(case.build(optax.adam(1e-2), params, 0), 2)
  run_plain(name, tx, params, steps=2 * STEPS, start=fj.sparse_params)


@pytest.mark.parametrize("name", SOME)
def test_apply_if_finite_skips_a_nan_step(name):
  case = CASES[name]
  params = make_params()
  tx = optax.apply_if_finite(case.build(optax.adam(1e-2), params, 0), 3)

  @jax.jit
  def step(p, s, x, y, poison):
    g = grads_of(p, x, y)
    g = jax.tree.map(lambda a: jnp.where(poison, jnp.nan, a), g)
    u, s = tx.update(g, s, p, **extra_args(case, p, x, y))
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for t in range(STEPS + 1):  # one step is skipped
    before = params
    params, state = step(params, state, *data(t), t == 2)
    if t == 2:  # skipped: params unchanged
      jax.tree.map(np.testing.assert_array_equal, params, before)
    assert_contract(case, params, state, final=t == STEPS)
  assert int(state.total_notfinite) == 1


@pytest.mark.parametrize("name", SOME)
def test_flax_train_state(name):
  case = CASES[name]
  params = make_params()
  tx = case.build(optax.adam(1e-2), params, 0)
  ts = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  if case.needs_loss_fn:
    # apply_gradients passes no extra arguments to tx.update.
    with pytest.raises(ValueError, match="loss_fn"):
      ts.apply_gradients(grads=grads_of(params, *data(0)))
    return

  @jax.jit
  def step(ts, x, y):
    return ts.apply_gradients(grads=grads_of(ts.params, x, y))

  for t in range(STEPS):
    ts = step(ts, *data(t))
    assert_contract(case, ts.params, ts.opt_state, final=t == STEPS - 1)


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


@pytest.mark.parametrize("name", SOME)
def test_nnx_optimizer(name):
  case = CASES[name]
  model = NnxMLP(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  tx = case.build(optax.adam(1e-2), params, 0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    grads = nnx.grad(loss)(model)
    kwargs = {}
    if case.needs_loss_fn:
      graphdef, _ = nnx.split(model)
      kwargs["loss_fn"] = lambda p: loss(nnx.merge(graphdef, p))
    optimizer.update(model, grads, **kwargs)

  for t in range(STEPS):
    step(model, optimizer, *data(t))
    params = nnx.state(model, nnx.Param)
    assert_contract(case, fj.trees.user_view(params), optimizer.opt_state,
                    final=t == STEPS - 1)


class EqxMLP(eqx.Module):
  l1: eqx.nn.Linear
  l2: eqx.nn.Linear
  act: Callable = eqx.field(static=True)

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.l1 = eqx.nn.Linear(8, 16, use_bias=False, key=k1)  # bias=None
    self.l2 = eqx.nn.Linear(16, 4, key=k2)
    self.act = jnp.tanh

  def __call__(self, x):
    return self.l2(self.act(self.l1(x)))


@pytest.mark.parametrize("name", SOME)
def test_equinox_mlp(name):
  case = CASES[name]
  model = EqxMLP(jax.random.PRNGKey(0))
  params = eqx.filter(model, eqx.is_inexact_array)
  assert params.l1.bias is None
  tx = case.build(optax.adam(1e-2), params, 0)
  state = tx.init(params)

  def loss(m, x, y):
    logits = jax.vmap(m)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @eqx.filter_jit
  def step(model, state, x, y):
    grads = eqx.filter_grad(loss)(model, x, y)
    kwargs = {}
    if case.needs_loss_fn:
      static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
      kwargs["loss_fn"] = lambda p: loss(eqx.combine(p, static), x, y)
    updates, state = tx.update(grads, state,
                               eqx.filter(model, eqx.is_inexact_array),
                               **kwargs)
    return eqx.apply_updates(model, updates), state

  for t in range(STEPS):
    model, state = step(model, state, *data(t))
    assert_contract(case, eqx.filter(model, eqx.is_inexact_array), state,
                    final=t == STEPS - 1)


@pytest.mark.parametrize("name", SOME)
def test_donated_step(name):
  case = CASES[name]
  params = make_params()
  run_plain(name, case.build(optax.adam(1e-2), params, 0), params, donate=True)


@pytest.mark.parametrize("name", SOME)
def test_a_transformation_after_the_pruning_one_is_caught(name):
  # Documented composition rule: nothing that rescales updates may follow a
  # pruning transformation. When it does, check_sparse says so.
  case = CASES[name]
  params = make_params()
  tx = optax.chain(case.build(optax.scale_by_adam(), params, 0),
                   optax.scale_by_learning_rate(1e-2))
  step = jax.jit(lambda p, s, x, y: _apply(tx, case, p, s, x, y))
  state = tx.init(params)
  for t in range(STEPS):
    params, state = step(params, state, *data(t))
  with pytest.raises(fj.SparsityError, match="pruned weights not 0.0.*"
                     "chained after the pruning one"):
    fj.check_sparse(params, state)


@pytest.mark.parametrize("name", SOME)
def test_lookahead(name):
  case = CASES[name]
  params = make_params()
  # Inner: lookahead's params hold the slow copy; rejected at init.
  tx = case.build(optax.lookahead(optax.adam(1e-2), 2, 0.5), params, 0)
  with pytest.raises(ValueError, match="params: is an optax.LookaheadParams"):
    tx.init(optax.LookaheadParams.init_synced(params))
  if case.needs_loss_fn:
    return  # optax.lookahead passes no extra arguments (loss_fn) inward.
  # Outer: the slow weights are out of reach; check_sparse catches it.
  tx = optax.lookahead(case.build(optax.adam(1e-2), params, 0), 2, 0.5)
  lp = optax.LookaheadParams.init_synced(params)
  state = tx.init(lp)

  @jax.jit
  def step(lp, s, x, y):
    u, s = tx.update(grads_of(lp.fast, x, y), s, lp,
                     **extra_args(case, lp.fast, x, y))
    return optax.apply_updates(lp, u), s

  for t in range(STEPS):
    lp, state = step(lp, state, *data(t))
  with pytest.raises(fj.SparsityError, match="lookahead"):
    fj.check_sparse(lp.slow, state)


# --------------------------------------------------------- the regulariser


def test_hoyer_square_in_a_partition_with_none_leaves():
  params = make_params(hostile=True)
  labels = jax.tree.map(lambda p: "int" if p.dtype == jnp.int32 else "float",
                        params)
  tx = optax.partition(
      {"float": optax.chain(fj.hoyer_square(1e-3), optax.adam(1e-2)),
       "int": optax.set_to_zero()}, labels)
  state = tx.init(params)
  u, state = jax.jit(tx.update)(grads_of(params, *data(0)), state, params)
  out = optax.apply_updates(params, u)
  assert out["none"] is None
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out)
             if jnp.issubdtype(x.dtype, jnp.floating))
  with pytest.raises(ValueError, match="holds no flipout_jax pruning state"):
    fj.get_masks(state)
