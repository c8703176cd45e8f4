"""Tests for flipout_jax.unipts: loss, genome decoding, search, BN
recalibration, the sparse-training transformation and the pipeline.

Tiny models (a 12-24-5 MLP with BatchNorm, LeNet-300-100 at width 0.1 on
8x8 inputs), tiny calibration sets, a 4 x 2 search and a few training steps:
compiling dominates, so the pipeline runs are module-scoped fixtures.
"""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import core
from flipout_jax import models
from flipout_jax import unipts
from flipout_jax.unipts import search as search_lib

TINY_SEARCH = dict(population_size=4, generations=2, num_parents=2,
                   crossover_children=2, mutation_children=2)


class _BNNet(nn.Module):
  """BN on the inputs (so its statistics are the data's), Dense, BN, Dense."""

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape((x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn0")(x)
    x = nn.Dense(24, name="fc1")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
    return nn.Dense(5, name="fc2")(nn.relu(x))


class _BiasOnly(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    return x + self.param("bias", nn.initializers.zeros, (x.shape[-1],))


def _bn_setup(n=80):
  x = 2.0 + 3.0 * jax.random.normal(jax.random.PRNGKey(0), (n, 12))
  model = _BNNet()
  # jit: eager init dispatches op by op, which is slow on a loaded CPU.
  return model, jax.jit(model.init)(jax.random.PRNGKey(1), x[:2]), x


def _zeros(tree, path):
  leaf = tree
  for k in path.split("/"):
    leaf = leaf[k]
  return int(np.sum(np.asarray(leaf) == 0))


# ----------------------------------------------------------------- (a) loss


def test_tau_sequence():
  taus = [unipts.tau_schedule(e) for e in range(6)]
  np.testing.assert_allclose(taus, [8.0 * 0.99 ** e for e in range(6)],
                             rtol=1e-12)
  assert taus[0] == 8.0 and abs(taus[1] - 7.92) < 1e-12
  np.testing.assert_allclose(float(unipts.tau_schedule(jnp.int32(3))),
                             8.0 * 0.99 ** 3, rtol=1e-6)
  assert unipts.tau_schedule(2, tau0=2.0, decay=0.5) == 0.5


def test_loss_equals_hand_computed_formula():
  zs = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  zt = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]])
  for temperature, tau in ((4.0, 8.0), (4.0, 1.0), (1.0, 2.5)):
    total = 0.0
    for s_row, t_row in zip(zs, zt):
      p = [math.exp(v / temperature) for v in t_row]
      p = [v / sum(p) for v in p]
      q = [math.exp(v) for v in s_row]
      q = [v / sum(q) for v in q]
      total += sum(pj * (math.log(pj) - math.log(qj) / tau)
                   for pj, qj in zip(p, q))
    expected = temperature ** 2 / len(zs) * total
    got = unipts.distillation_loss(jnp.asarray(zs), jnp.asarray(zt), tau,
                                   temperature=temperature)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    if tau == 1.0:  # τ = 1: exactly T²·mean KL(p ‖ q)
      p = jax.nn.softmax(zt / temperature)
      kl = np.sum(p * (np.log(p) - jax.nn.log_softmax(zs)), axis=-1)
      np.testing.assert_allclose(float(got), temperature ** 2 * kl.mean(),
                                 rtol=1e-5)


def test_loss_zero_when_student_equals_teacher_at_tau_one():
  z = jax.random.normal(jax.random.PRNGKey(0), (7, 10)) * 3.0
  assert abs(float(unipts.distillation_loss(z, z, 1.0, temperature=1.0))) < 1e-6
  # Not a divergence for τ ≠ 1: the value at q = p is −(1 − 1/τ)·T²·H(p) ...
  p = jax.nn.softmax(z)
  entropy = -np.sum(p * np.log(p), axis=-1).mean()
  np.testing.assert_allclose(
      float(unipts.distillation_loss(z, z, 8.0, temperature=1.0)),
      -(1 - 1 / 8) * entropy, rtol=1e-5)
  # ... but the gradient there is still 0: (T²/B)·(q − p)/τ.
  zs = z + 0.3
  grad = jax.grad(lambda s: unipts.distillation_loss(s, z, 8.0, temperature=4.0))(zs)
  expected = 16.0 / 7 * (jax.nn.softmax(zs) - jax.nn.softmax(z / 4.0)) / 8.0
  np.testing.assert_allclose(grad, expected, atol=1e-6)


# -------------------------------------------------------------- (b) search

SIZES = np.array([300, 1000, 500, 2000])


def test_decode_genome_global_budget_and_regrowth():
  rng = np.random.default_rng(0)
  n_total = SIZES.sum()
  for sparsity in (0.5, 0.8, 0.9):
    for _ in range(20):
      genome = rng.random(SIZES.size)
      p = unipts.decode_genome(genome, SIZES, sparsity)
      # These genomes clamp no layer ...
      assert np.all(p > 0) and np.all(p < 1 - 1 / SIZES)
      # ... so the global sparsity is exactly P and 5% of N is regrown.
      np.testing.assert_allclose(np.sum(SIZES * p), sparsity * n_total,
                                 rtol=1e-12)
      np.testing.assert_allclose(np.sum(SIZES * (sparsity + 0.05 - p)),
                                 0.05 * n_total, rtol=1e-9)
      a = search_lib.softmax(genome)
      np.testing.assert_allclose(
          p, sparsity + 0.05 - 0.05 * n_total * a / SIZES, rtol=1e-12)


def test_decode_genome_is_always_valid():
  rng = np.random.default_rng(1)
  sizes = np.array([1, 3, 50, 2000])
  genomes = [np.zeros(4), np.array([0.0, 0.0, 50.0, 0.0]),
             np.array([-700.0, 700.0, 0.0, 1e300])] + [
                 rng.standard_normal(4) * 30 for _ in range(50)]
  for sparsity in (0.0, 0.5, 0.94, 0.97, 0.999):
    for g in genomes:
      p = unipts.decode_genome(g, sizes, sparsity)
      assert np.all(p >= 0) and np.all(p <= 1 - 1 / sizes), (sparsity, g, p)
      assert p[0] == 0.0  # a 1-weight layer is never pruned
  # A layer that regrows more than it pruned is clamped at 0: by default its
  # unused regrowth is lost (sparser than P); redistributed, the others
  # take it and the budget is exact again.
  sizes = np.array([235200, 30000, 1000])  # LeNet-300-100: the head is
  for g in ([0.9, 0.9, 0.9], [0.0, 0.0, 5.0], [0.2, 0.7, 0.1]):  # clamped
    p = unipts.decode_genome(g, sizes, 0.9)
    assert p[2] == 0.0 and np.sum(sizes * p) > 0.9 * sizes.sum()
    q = unipts.decode_genome(g, sizes, 0.9, redistribute=True)
    assert q[2] == 0.0 and np.all(q[:2] < p[:2])
    np.testing.assert_allclose(np.sum(sizes * q), 0.9 * sizes.sum(), rtol=1e-12)
  # Unclamped genomes decode the same either way.
  np.testing.assert_array_equal(
      unipts.decode_genome([3.0, 0.0, 0.0], sizes, 0.9),
      unipts.decode_genome([3.0, 0.0, 0.0], sizes, 0.9, redistribute=True))
  with pytest.raises(ValueError, match="genome"):
    unipts.decode_genome([0.0, np.nan, 0.0, 0.0], sizes, 0.5)
  with pytest.raises(ValueError, match="genome"):
    unipts.decode_genome([0.0, 0.0], sizes, 0.5)


def test_search_evaluates_only_valid_genomes_and_is_reproducible():
  sizes = np.array([2, 40, 900, 25])

  def run(seed, sparsity=0.97, **kw):
    seen = []

    def fitness(p):
      seen.append(np.array(p))
      # Deterministic, with an optimum away from the uniform genome.
      return (-float(np.sum((p - np.array([0.0, 0.99, 0.95, 0.5])) ** 2)),)

    result = unipts.evolutionary_search(
        fitness, sizes, sparsity, seed=seed, mutation_prob=1.0, **kw)
    return result, seen

  kw = dict(population_size=6, generations=4, num_parents=3,
            crossover_children=3, mutation_children=4)
  result, seen = run(0, **kw)
  assert seen and all(search_lib.is_valid(p) for p in seen)
  assert all(np.all(p <= 1 - 1 / sizes) for p in seen)
  assert result.evaluations == len(seen)
  assert len({p.tobytes() for p in seen}) == len(seen)  # each evaluated once
  assert result.genomes_seen == 6 + 4 * 7  # 3 + 4 children >= population 6
  assert len(result.history) == 5
  # The first genome is the uniform one; the result is the best ever seen.
  np.testing.assert_array_equal(
      seen[0], unipts.decode_genome(np.full(4, 0.97), sizes, 0.97))
  assert result.fitness == max((-float(np.sum(
      (p - np.array([0.0, 0.99, 0.95, 0.5])) ** 2)),) for p in seen)
  np.testing.assert_array_equal(
      result.sparsities, unipts.decode_genome(result.genome, sizes, 0.97))

  again, seen_again = run(0, **kw)
  np.testing.assert_array_equal(again.genome, result.genome)
  assert again.history == result.history
  assert all(np.array_equal(a, b) for a, b in zip(seen, seen_again))
  other, _ = run(1, **kw)
  assert not np.array_equal(other.genome, result.genome)

  # The paper's sizes fill a population of 25 with 12 + 12 + 1 random.
  paper, _ = run(0, sparsity=0.5, generations=1)
  assert paper.genomes_seen == 50


def test_search_rejects_bad_arguments():
  with pytest.raises(ValueError, match="num_parents"):
    unipts.evolutionary_search(lambda p: 0.0, [10, 10], 0.5, population_size=4,
                               num_parents=5)
  with pytest.raises(ValueError, match="sparsity"):
    unipts.evolutionary_search(lambda p: 0.0, [10, 10], 1.0)


# ---------------------------------------------------------- BN recalibration


def test_bn_recalibration_is_deterministic_and_only_touches_batch_stats():
  model, variables, x = _bn_setup()
  momentum = jax.jit(lambda v, xb: unipts.batch_stats_momentum(
      model.apply, v, xb))(variables, x[:8])
  np.testing.assert_allclose(momentum["bn0"]["mean"], 0.9, atol=1e-5)
  np.testing.assert_allclose(momentum["bn1"]["var"], 0.99, atol=1e-5)

  out = unipts.recalibrate_batch_stats(model.apply, variables, x, batch_size=32)
  again = unipts.recalibrate_batch_stats(model.apply, variables, x, batch_size=32)
  assert out["params"] is variables["params"]  # weights: the same objects
  jax.tree.map(np.testing.assert_array_equal, again["batch_stats"],
               out["batch_stats"])  # bitwise deterministic
  # It does not depend on the old statistics either.
  perturbed = dict(variables)
  perturbed["batch_stats"] = jax.tree.map(lambda s: s + 5.0,
                                          variables["batch_stats"])
  other = unipts.recalibrate_batch_stats(model.apply, perturbed, x, batch_size=32)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5),
               other["batch_stats"], out["batch_stats"])
  # The input BN's statistics are the data's: batches 32 + 32 + 16 pooled
  # exactly (mean, and the biased variance of all 80 examples).
  bn0 = out["batch_stats"]["bn0"]
  np.testing.assert_allclose(bn0["mean"], np.mean(x, axis=0), rtol=1e-4)
  np.testing.assert_allclose(bn0["var"], np.var(x, axis=0), rtol=1e-4)
  assert not np.allclose(out["batch_stats"]["bn1"]["var"],
                         variables["batch_stats"]["bn1"]["var"])
  # No BatchNorm: nothing to do.
  plain = {"params": variables["params"]}
  assert unipts.recalibrate_batch_stats(model.apply, plain, x) is plain


# ------------------------------------------------- (c) sparse training (DST)

LAYER_P = {"fc1/kernel": 0.7, "fc2/kernel": 0.35}  # fc3 not named: dense


def _lenet(n=40, seed=0):
  """LeNet-300-100 at width 0.1 on 8x8 inputs: kernels 64x30, 30x10, 10x10.

  The sparse-training and pipeline tests share these shapes, so they share
  the compiled per-layer selection (cached per shapes).
  """
  model = models.get_model("lenet300100", width=0.1)
  x = jax.random.normal(jax.random.PRNGKey(seed), (n, 8, 8, 1))
  return model, jax.jit(model.init)(jax.random.PRNGKey(seed + 1), x[:1]), x


DECAY = 0.1  # λ: large, so that the decay term is far above rounding
LR = 0.5


@pytest.fixture(scope="module")
def dst_run():
  """One plain-SGD sparse-training run, shared (compiling is the cost)."""
  model, variables, x = _lenet(32, seed=3)
  dense = variables["params"]
  y = jnp.arange(32) % 10

  def loss(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = unipts.sparse_training(optax.sgd(LR), sparsities=LAYER_P, decay=DECAY)
  state = tx.init(dense)  # eager: its selection is jitted inside
  params = jax.jit(fj.sparse_params)(dense, state)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params, x, y)
    updates, new_state = tx.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    return (new_params, new_state, grads,
            unipts.effective_params(new_state, new_params))

  states, params_seen, grads_seen, effective_seen = [state], [params], [], []
  for _ in range(8):
    params, state, grads, effective = step(params, state)
    states.append(state)
    params_seen.append(params)
    grads_seen.append(grads)
    effective_seen.append(effective)
  return dense, states, params_seen, grads_seen, effective_seen


def test_dst_keeps_exact_per_layer_zero_counts_every_step(dst_run):
  _, states, params_seen, _, effective_seen = dst_run
  expected = {"fc1/kernel": round(0.7 * 1920),
              "fc2/kernel": round(0.35 * 300), "fc3/kernel": 0}
  masks_seen = []
  for state, params, effective in zip(states[1:], params_seen[1:],
                                      effective_seen):
    masks = core.get_masks(state)
    for path, k in expected.items():
      assert _zeros(params, path) == k, path
      assert _zeros(masks, path) == k, path
    masks_seen.append(np.asarray(masks["fc1"]["kernel"]))
    jax.tree.map(np.testing.assert_array_equal, effective, params)
  # Masks are recomputed every step: some weights did swap in and out.
  assert any(not np.array_equal(a, b) for a, b in zip(masks_seen, masks_seen[1:]))


def test_dst_custom_gradient_is_g_plus_decay_on_pruned_weights(dst_run):
  _, states, params_seen, grads_seen, _ = dst_run
  # Through the transformation, at every step: plain SGD moves the raw
  # weights by exactly −lr·(g + λ(1 − m)⊙w), pruned ones included
  # (straight-through), with m the masks the gradient was taken under.
  for t in range(len(grads_seen)):
    raw, new_raw = (fj.get_raw_weights(s) for s in states[t:t + 2])
    masks = core.get_masks(states[t])
    for layer in ("fc1", "fc2"):
      m = np.asarray(masks[layer]["kernel"])
      g = np.asarray(grads_seen[t][layer]["kernel"])
      w = np.asarray(raw[layer]["kernel"])
      np.testing.assert_allclose(new_raw[layer]["kernel"],
                                 w - LR * (g + DECAY * (1 - m) * w),
                                 rtol=1e-5, atol=1e-7)
      if t == 0:
        assert np.any(np.asarray(new_raw[layer]["kernel"])[~m] != w[~m])
  assert fj.get_raw_weights(states[0])["fc1"]["bias"] is None
  # Non-prunable leaves are trained in place by the inner optimizer.
  np.testing.assert_allclose(
      params_seen[1]["fc1"]["bias"],
      params_seen[0]["fc1"]["bias"] - LR * grads_seen[0]["fc1"]["bias"],
      rtol=1e-6, atol=1e-7)


def test_dst_rejects_bad_arguments():
  with pytest.raises(ValueError, match="sparsities"):
    unipts.sparse_training(optax.sgd(0.1), sparsities={"fc1/kernel": 1.0})
  with pytest.raises(ValueError, match="decay"):
    unipts.sparse_training(optax.sgd(0.1), sparsities={}, decay=-1.0)
  tx = unipts.sparse_training(optax.sgd(0.1), sparsities={"nope/kernel": 0.5})
  with pytest.raises(ValueError, match="sparsities.*not prunable"):
    tx.init({"fc1": {"kernel": jnp.ones((3, 2))}})


@pytest.mark.parametrize("structure", ["2:4", "units"])
def test_dst_with_a_structure_keeps_its_pattern_every_step(structure):
  # 16-8-4 MLP: fc1 (16, 8) pruned at 1/2, fc2 (8, 4) the classifier.
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  params = {"fc1": {"kernel": jax.random.normal(keys[0], (16, 8))},
            "fc2": {"kernel": jax.random.normal(keys[1], (8, 4))}}
  x = jax.random.normal(keys[2], (24, 16))
  y = jnp.arange(24) % 4

  def loss(p):
    h = jax.nn.relu(x @ p["fc1"]["kernel"])
    return optax.softmax_cross_entropy_with_integer_labels(
        h @ p["fc2"]["kernel"], y).mean()

  pattern = fj.n_m(2, 4) if structure == "2:4" else fj.units()
  p = {"fc1/kernel": 0.5}
  if structure == "2:4":
    p["fc2/kernel"] = 0.5
  tx = unipts.sparse_training(optax.sgd(0.5), sparsities=p, decay=0.01,
                              structure=pattern)
  state = tx.init(params)
  params = fj.sparse_params(params, state)
  step = jax.jit(lambda q, s: tx.update(jax.grad(loss)(q), s, q))
  for _ in range(6):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    w = np.asarray(params["fc1"]["kernel"])
    raw = np.asarray(fj.get_raw_weights(state)["fc1"]["kernel"])
    if structure == "2:4":
      # Every group of 4 consecutive inputs of an output keeps exactly 2,
      # the 2 largest raw magnitudes of the group.
      for name in ("fc1", "fc2"):
        v = np.asarray(params[name]["kernel"])
        groups = (v != 0).reshape(v.shape[0] // 4, 4, v.shape[1])
        np.testing.assert_array_equal(groups.sum(1), 2)
      order = np.argsort(-np.abs(raw.reshape(4, 4, 8)), axis=1, kind="stable")
      top = np.zeros((4, 4, 8), bool)
      np.put_along_axis(top, order[:, :2], True, axis=1)
      np.testing.assert_array_equal(top.reshape(16, 8), w != 0)
    else:
      # Half of fc1's 8 output units are whole zeros, the 4 of largest raw
      # L1 norm ("sum" of |w|) stay whole; the classifier stays dense.
      alive = np.any(w != 0, axis=0)
      assert alive.sum() == 4
      np.testing.assert_array_equal(np.all(w != 0, axis=0), alive)
      best = np.argsort(-np.abs(raw).sum(0), kind="stable")[:4]
      assert set(np.flatnonzero(alive)) == set(best.tolist())
      assert np.all(np.asarray(params["fc2"]["kernel"]) != 0)
  # Straight-through: the raw weights under the pruned ones are kept (and
  # trained), not pinned to zero as the params are.
  assert np.all(raw[w == 0] != 0)


def test_dst_n_m_needs_the_pattern_sparsity():
  tx = unipts.sparse_training(optax.sgd(0.1), sparsities={"w": 0.3},
                              structure=fj.n_m(2, 4))
  with pytest.raises(ValueError, match=r"sparsities: .*n_m\(2, 4\).*0\.5; "
                     r"got 0\.3"):
    tx.init({"w": jnp.ones((8, 4))})


# ---------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def bn_run():
  model, variables, x = _bn_setup(96)
  result = unipts.run(model.apply, variables, x, sparsity=0.8, seed=0,
                        epochs=2, batch_size=32, bn_batch_size=32,
                        **TINY_SEARCH)
  return model, variables, x, result


def test_pipeline_bn_model(bn_run):
  model, variables, x, result = bn_run
  report = result.report
  paths = ("fc1/kernel", "fc2/kernel")
  assert set(result.sparsities) == set(paths) == set(report["layers"])
  pruned = 0
  for path in paths:
    layer = report["layers"][path]
    k = round(layer["target"] * layer["size"])
    assert layer["pruned"] == k == _zeros(result.variables["params"], path)
    assert result.sparsities[path] == k / layer["size"]
    assert 0.0 <= layer["target"] < 1.0
    pruned += k
  total = report["num_prunable"]
  assert report["achieved_sparsity"] == pruned / total
  assert 0.8 * total - len(paths) <= pruned  # clamps can only prune more
  # Non-prunable parameters are there and trained; BN statistics are those
  # of the final weights on the calibration set.
  assert result.variables["params"]["bn1"]["scale"].shape == (24,)
  recal = unipts.recalibrate_batch_stats(model.apply, result.variables, x,
                                         batch_size=32)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               recal["batch_stats"], result.variables["batch_stats"])
  # Report: search, accuracies, timing.
  search = report["search"]
  assert len(search["history"]) == 3 and 1 <= search["evaluations"] <= 12
  assert search["best_fitness"] >= search["uniform_genome_fitness"]
  assert report["labels"] == "teacher" and report["accuracy"]["dense"] == 1.0
  for stage in ("uniform", "searched", "final"):
    assert 0.0 <= report["accuracy"][stage] <= 1.0
  assert report["accuracy"]["searched"] == search["best_fitness"][0]
  assert report["train"]["steps"] == 2 * 3 and len(report["train"]["epoch_loss"]) == 2
  assert report["train"]["last_tau"] == pytest.approx(7.92)  # epochs 0, 1
  assert all(np.isfinite(report["train"]["epoch_loss"]))
  assert report["time"]["total"] > 0
  json.dumps(report)  # plain Python values: a CLI can write it as is
  assert jax.tree.structure(result.masks, is_leaf=lambda m: m is None) == \
      jax.tree.structure(variables["params"])


def test_pipeline_lenet_without_batchnorm():
  model, variables, x = _lenet(40)
  y = np.arange(40) % 10
  result = unipts.run(model.apply, variables, x, sparsity=0.9, search=False,
                        calibration_y=y, epochs=1, batch_size=16)
  report = result.report
  assert "batch_stats" not in result.variables and report["search"] is None
  assert report["labels"] == "calibration_y"
  for path, layer in report["layers"].items():
    assert layer["target"] == 0.9
    assert _zeros(result.variables["params"], path) == round(0.9 * layer["size"])
  # Without BN and with the same sparsities, stage 2 is the uniform baseline.
  assert report["accuracy"]["searched"] == report["accuracy"]["uniform"]
  assert report["train"]["steps"] == 2


def test_bad_inputs_raise_value_errors_naming_the_argument():
  model, variables, x = _bn_setup(8)
  with pytest.raises(ValueError, match="calibration_x"):
    unipts.run(model.apply, variables, x[:0], sparsity=0.5)
  for bad in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="sparsity"):
      unipts.run(model.apply, variables, x, sparsity=bad)
  bias_only = _BiasOnly()
  with pytest.raises(ValueError, match="variables.*no prunable layer"):
    unipts.run(bias_only.apply, {"params": {"bias": jnp.zeros(12)}}, x,
                 sparsity=0.5)
  with pytest.raises(ValueError, match="variables"):
    unipts.run(model.apply, {"batch_stats": {}}, x, sparsity=0.5)
  with pytest.raises(ValueError, match="calibration_y"):
    unipts.run(model.apply, variables, x, sparsity=0.5, calibration_y=[0, 1])
  with pytest.raises(ValueError, match="populaton_size"):
    unipts.run(model.apply, variables, x, sparsity=0.5, populaton_size=4)
  with pytest.raises(ValueError, match="epochs"):
    unipts.run(model.apply, variables, x, sparsity=0.5, epochs=-1)
  with pytest.raises(ValueError, match="layer_sparsities"):
    unipts.run(model.apply, variables, x, sparsity=0.5, search=False,
                 layer_sparsities={"fc9/kernel": 0.5})
  with pytest.raises(ValueError, match="layer_sparsities"):
    unipts.run(model.apply, variables, x, sparsity=0.5,
                 layer_sparsities={"fc1/kernel": 0.5})  # search=True
