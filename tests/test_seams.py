"""The reproducers of the seams and hardening issues, one test each.

The conformance suite (test_conformance.py) runs every constructor through
the setups; these are the specific cases that were broken: ties in bf16
ST-3, zero-size leaves with ERK, UniPTS on a model without ``train=``,
reports on ``nnx.State``, reseeding, NaN weights, collapsed layers.
"""

import warnings

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import unipts


def _zero_grads(params):
  return jax.tree.map(jnp.zeros_like, params)


def _steps(tx, params, n, grads_fn=_zero_grads):
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(grads_fn(p), s, p)
    return optax.apply_updates(p, u), s

  for _ in range(n):
    params, state = step(params, state)
  return params, state


def test_st3_bf16_ties_prune_exactly_round_s_n_by_position():
  # 48 weights with 4 distinct bf16 magnitudes: round(0.3·48) = 14 falls inside a
  # run of equal values, which the strict `|w| > τ` rule pruned whole.
  w = jnp.repeat(jnp.array([0.5, 1.0, 1.5, 2.0], jnp.bfloat16), 12)
  w = w * jnp.where(jnp.arange(48) % 2 == 0, 1, -1).astype(jnp.bfloat16)
  params = {"w": jnp.roll(w, 5).reshape(6, 8)}
  tx = fj.st3(optax.sgd(0.0), sparsity=0.3, start_step=0, end_step=1,
              rescale=False)
  out, state = _steps(tx, params, 2)
  masks = np.asarray(fj.get_masks(state)["w"]).ravel()
  n_pruned = round(np.float32(0.3) * np.float32(48))  # 14
  assert int(np.sum(~masks)) == n_pruned
  # Independent reference: a stable descending sort of |w| keeps the first
  # 48 − 14 (among equal magnitudes the earlier positions).
  order = np.argsort(-np.abs(np.asarray(params["w"], np.float32)).ravel(),
                     kind="stable")
  expected = np.zeros(48, bool)
  expected[order[:48 - n_pruned]] = True
  np.testing.assert_array_equal(masks, expected)
  assert np.all(np.asarray(out["w"]).ravel()[~masks] == 0)


def test_zero_size_leaves_are_skipped():
  params = {"a": {"kernel": jnp.ones((10, 10))},
            "b": {"kernel": jnp.linspace(0.1, 2.0, 100).reshape(10, 10)},
            "empty": {"kernel": jnp.zeros((0, 5))}}
  grads = lambda p: jax.tree.map(jnp.ones_like, p)  # pylint: disable=unnecessary-lambda-assignment
  tx = fj.global_magnitude(optax.sgd(0.0), sparsity=0.9, every=1,
                           prune_rate=0.9, distribution="erk")
  _, state = _steps(tx, params, 2, grads)
  masks = fj.get_masks(state)
  assert masks["empty"]["kernel"] is None
  report = fj.sparsity_report(params, masks)
  assert report.zeros == 180 and report.size == 200  # 90 %, not 99.9 %
  tx = fj.dst_ee(optax.sgd(0.1), sparsity=0.5, every=1, end_step=4)
  _, state = _steps(tx, params, 3, grads)  # no OverflowError
  assert fj.get_masks(state)["empty"]["kernel"] is None
  assert num_pruned(fj.get_masks(state)) == 100


def num_pruned(masks):
  return sum(int(np.sum(~np.asarray(m)))
             for m in fj.trees.prunable_leaves(masks, masks))


class _NoTrain(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))


class _BNNoTrain(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.BatchNorm(use_running_average=True)(nn.Dense(16)(x)))


def test_unipts_prune_calls_a_model_without_train_argument():
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 12))
  model = _NoTrain()
  variables = model.init(jax.random.PRNGKey(1), x[:2])
  result = unipts.run(model.apply, variables, x, sparsity=0.5, search=False,
                        epochs=1, batch_size=16)
  for path, layer in result.report["layers"].items():
    kernel = result.variables["params"]
    for k in path.split("/"):
      kernel = kernel[k]
    assert int(np.sum(np.asarray(kernel) == 0)) == round(0.5 * layer["size"])
  bn = _BNNoTrain()
  bn_vars = bn.init(jax.random.PRNGKey(1), x[:2])
  with pytest.raises(ValueError, match="apply_fn: the model has BatchNorm "
                     "statistics .* takes no `train` argument"):
    unipts.run(bn.apply, bn_vars, x, sparsity=0.5, search=False, epochs=0)


def test_sparsity_report_reads_nnx_state_with_variables():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(6, 8, rngs=rngs)

    def __call__(self, x):
      return self.l1(x)

  model = MLP(nnx.Rngs(0))
  tx = fj.global_magnitude(optax.sgd(0.0), sparsity=0.5, every=1)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for _ in range(2):
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 6)))))(model)
    optimizer.update(model, grads)
  masks = fj.get_masks(optimizer.opt_state)
  report = fj.sparsity_report(nnx.state(model, nnx.Param), masks)
  assert (report.size, report.zeros, report.value_zeros) == (48, 24, 24)
  assert report.ok


def test_reseed_gives_each_pruning_state_its_own_key():
  params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
  labels = {"a": "x", "b": "y"}
  mk = lambda: fj.random_pruning(optax.sgd(0.1), sparsity=0.5, every=1)  # pylint: disable=unnecessary-lambda-assignment
  tx = optax.partition({"x": mk(), "y": mk()}, labels)
  state = tx.init(params)
  # Labels name subtrees: each group's masks cover the other as one None.
  one_group = optax.partition({"x": mk(), "y": optax.sgd(0.1)}, labels)
  masks = fj.get_masks(one_group.init(params))
  assert masks["b"] is None and masks["a"]["kernel"].shape == (4, 4)
  assert fj.sparsity_report(params, masks).size == 16
  both = fj.get_masks(state)
  assert both["a"]["kernel"].shape == both["b"]["kernel"].shape == (4, 4)
  keys = [s.key for s in fj.core.find_prune_states(state)]
  np.testing.assert_array_equal(keys[0], keys[1])  # same seed=0
  new = fj.reseed(state, jax.random.key(3))
  keys = [np.asarray(s.key) for s in fj.core.find_prune_states(new)]
  assert not np.array_equal(keys[0], keys[1])
  np.testing.assert_array_equal(
      keys[0], jax.random.fold_in(jax.random.PRNGKey(3), 0))
  # Random pruning under vmap over keys: different masks per key.
  def masks_for(key):
    s = fj.reseed(tx.init(params), key)
    for _ in range(2):
      u, s = tx.update(_zero_grads(params), s, params)
    return fj.get_masks(s)

  m = jax.jit(jax.vmap(masks_for))(jax.random.split(jax.random.key(0), 2))
  assert not np.array_equal(m["a"]["kernel"][0], m["a"]["kernel"][1])
  with pytest.raises(ValueError, match="holds no flipout_jax pruning state"):
    fj.reseed(optax.sgd(0.1).init(params), jax.random.key(0))
  with pytest.raises(ValueError, match="key: must be a PRNG key"):
    fj.reseed(state, 3)
  with pytest.raises(ValueError, match="key: must be one PRNG key"):
    fj.reseed(state, jax.random.split(jax.random.key(0), 2))
  with pytest.raises(ValueError, match="allow_nonfinite: must be True or False"):
    fj.check_sparse(params, state, allow_nonfinite="yes")


def test_seed_takes_a_traced_key():
  params = {"w": jnp.ones((8, 8))}

  def start(key):
    return fj.get_masks(fj.set_(optax.sgd(0.1), sparsity=0.5, every=2,
                                end_step=10, seed=key).init(params))["w"]

  masks = jax.jit(jax.vmap(start))(jax.random.split(jax.random.key(1), 2))
  assert masks.shape == (2, 8, 8) and not np.array_equal(masks[0], masks[1])
  np.testing.assert_array_equal(
      start(jax.random.key(5)),
      fj.get_masks(fj.set_(optax.sgd(0.1), sparsity=0.5, every=2,
                           end_step=10, seed=jax.random.PRNGKey(5))
                   .init(params))["w"])
  assert int(np.sum(~np.asarray(masks[0]))) == 32


def test_a_nan_weight_that_is_pruned_is_reported():
  # One NaN gradient entry under plain SGD: the weight goes NaN; the next
  # event prunes it (NaN ranks lowest) but p + (−p) is NaN, not 0.0.
  params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
  tx = fj.global_magnitude(optax.sgd(1.0), sparsity=0.5, every=1)
  state = tx.init(params)
  g = jnp.zeros((2, 4)).at[0, 3].set(jnp.nan)
  for grads in ({"w": g}, _zero_grads(params)):
    u, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, u)
  masks = fj.get_masks(state)
  assert not bool(masks["w"][0, 3]) and bool(jnp.isnan(params["w"][0, 3]))
  with pytest.warns(UserWarning, match="1 pruned weights not 0.0, 1 non-finite"):
    report = fj.sparsity_report(params, masks)
  assert (report.pruned_nonzero, report.nonfinite) == (1, 1)
  with pytest.raises(fj.SparsityError, match="w: 1 pruned weights not 0.0, 1 "
                     "non-finite.*apply_if_finite"):
    fj.check_sparse(params, state)


def test_a_global_ranking_that_empties_a_layer_warns_and_reports_it():
  params = {"a": {"kernel": jnp.full((4, 4), 0.01)},
            "b": {"kernel": jnp.arange(1.0, 17.0).reshape(4, 4)}}
  tx = fj.global_magnitude(optax.sgd(0.0), sparsity=0.5, every=1)
  out, state = _steps(tx, params, 2)
  with pytest.warns(UserWarning, match="a/kernel: no weight left"):
    report = fj.sparsity_report(out, fj.get_masks(state))
  assert report.collapsed == ("a/kernel",)
  assert "collapsed" in str(report)


def test_snip_with_zero_gradients_in_a_layer_collapses_it_loudly():
  params = {"a": {"kernel": jnp.ones((4, 12))}, "b": {"kernel": jnp.ones((12, 4))}}
  # The first layer's gradient is all zero: SNIP's |θ·g| ranks it last.
  grads = lambda p: {"a": {"kernel": jnp.zeros((4, 12))},  # pylint: disable=unnecessary-lambda-assignment
                     "b": {"kernel": jnp.ones((12, 4))}}
  tx = fj.snip(optax.sgd(0.0), sparsity=0.5)
  out, state = _steps(tx, params, 1, grads)
  masks = fj.get_masks(state)
  with pytest.warns(UserWarning, match="a/kernel: no weight left"):
    fj.sparsity_report(out, masks)
  assert int(np.sum(masks["a"]["kernel"])) == 0
  assert int(np.sum(masks["b"]["kernel"])) == 48


def test_a_target_that_leaves_no_weight_warns_at_init():
  params = {"w": jnp.ones((2, 5))}  # 10 weights, s = 0.95: round(9.5) = 10
  tx = fj.global_magnitude(optax.sgd(0.0), sparsity=0.95, every=1,
                           prune_rate=0.9)
  with pytest.warns(UserWarning, match="leaves no weight in w"):
    tx.init(params)
  # ST-3 counts the same way (one convention): it warns too.
  with pytest.warns(UserWarning, match="leaves no weight in w"):
    fj.st3(optax.sgd(0.0), sparsity=0.95, start_step=0, end_step=1).init(params)
  # At 0.9, round(9.0) = 9 leaves one weight: no warning from either.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fj.st3(optax.sgd(0.0), sparsity=0.9, start_step=0, end_step=1).init(params)
    fj.global_magnitude(optax.sgd(0.0), sparsity=0.9, every=1,
                        prune_rate=0.9).init(params)


def test_import_loads_none_of_the_experiments_stack():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  heavy = ("flax", "orbax", "tensorflow_datasets", "ml_collections",
           "matplotlib", "tqdm", "mlxtend", "sklearn", "equinox")
  code = ("import sys, flipout_jax\n"
          f"print([m for m in {heavy!r} if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == "[]", out
