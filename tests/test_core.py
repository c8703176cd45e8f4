"""Tests of the prune loop and FlipOut with its baselines."""

import math

from absl.testing import parameterized
import chex
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flipout_jax as fj


def mlp_params(seed=0, sizes=(12, 20, 16, 5)):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes))
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"dense{i}"] = {
        "kernel": jax.random.normal(keys[i], (a, b)) / math.sqrt(a),
        "bias": jnp.zeros((b,)),
    }
  return params


def mlp_loss(params, x, y):
  h = x
  n = len(params)
  for i in range(n):
    h = h @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
    if i < n - 1:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def batch(step, n=32, d=12, classes=5):
  k1, k2 = jax.random.split(jax.random.PRNGKey(1000 + step))
  return jax.random.normal(k1, (n, d)), jax.random.randint(k2, (n,), 0, classes)


def prunable_size(params):
  return sum(p.size for p in jax.tree.leaves(params) if p.ndim >= 2)


def count_zeros(params):
  return sum(int(np.sum(np.asarray(p) == 0))
             for p in jax.tree.leaves(params) if p.ndim >= 2)


INNERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
}

METHODS = {
    "flipout": lambda inner: fj.flipout(inner, sparsity=0.95, every=4),
    "global_magnitude": lambda inner: fj.global_magnitude(
        inner, sparsity=0.95, every=4),
    "noisy_magnitude": lambda inner: fj.global_magnitude(
        inner, sparsity=0.95, every=4, noise_scale=1.0),
    "random": lambda inner: fj.random_pruning(inner, sparsity=0.95, every=4),
    "snip": lambda inner: fj.snip(inner, sparsity=0.95),
}


def run(tx, params, steps, check=None):
  state = tx.init(params)

  @jax.jit
  def step(params, state, i):
    x, y = batch(0)
    x = x + 0.01 * i  # the data changes a little every step
    grads = jax.grad(mlp_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    old_masks = fj.get_masks(state)
    params, state = step(params, state, i)
    if check is not None:
      check(i, params, state, old_masks)
  return params, state, step


class PruneLoopTest(parameterized.TestCase):

  @parameterized.product(method=list(METHODS), inner=list(INNERS))
  def test_pruned_weights_exactly_zero_and_count_exact(self, method, inner):
    params = mlp_params()
    n = prunable_size(params)
    tx = METHODS[method](INNERS[inner]())
    schedule_target = {0: 0}

    def check(i, params, state, old_masks):
      # NumPy, not jnp: eager jnp ops would each compile.
      masks = [np.asarray(m) for m in jax.tree.leaves(fj.get_masks(state))]
      kernels = [np.asarray(params[k]["kernel"]) for k in sorted(params)]
      # Pruned weights are exactly 0.0 after every update.
      for m, p in zip(masks, kernels):
        self.assertTrue(np.all(p[~m] == 0.0))
      # Masks never revive a weight.
      for a, b in zip(jax.tree.leaves(old_masks), masks):
        self.assertFalse(np.any(b & ~np.asarray(a)))
      dead = sum(int(np.sum(~m)) for m in masks)
      if method == "snip":
        expected = round(0.95 * n)
      else:
        events = i // 4  # events fire in the updates with count 4, 8, ...
        expected = round(min(1 - 0.5 ** events, 0.95) * n) if events else 0
      self.assertEqual(dead, expected)
      schedule_target[0] = expected

    params, state, _ = run(tx, params, 24, check)
    self.assertEqual(schedule_target[0], round(0.95 * n))
    self.assertGreaterEqual(count_zeros(params), round(0.95 * n))

  def test_kept_weights_move_by_exactly_the_inner_update(self):
    params = mlp_params()
    inner = optax.adam(1e-2)
    tx = fj.global_magnitude(inner, sparsity=0.5, every=1)
    state = tx.init(params)
    grads = jax.grad(mlp_loss)(params, *batch(0))
    updates, state = jax.jit(tx.update)(grads, state, params)
    ref_updates, _ = jax.jit(inner.update)(grads, inner.init(params), params)
    new = optax.apply_updates(params, updates)
    masks = fj.get_masks(state)
    for k in params:
      m = masks[k]["kernel"]
      ref = params[k]["kernel"] + ref_updates[k]["kernel"]
      chex.assert_trees_all_equal(jnp.where(m, new[k]["kernel"], 0.0),
                                  jnp.where(m, ref, 0.0))
      chex.assert_trees_all_equal(new[k]["bias"],
                                  params[k]["bias"] + ref_updates[k]["bias"])

  def test_inner_moments_never_move_pruned_weights(self):
    # Momentum keeps velocity for weights after they are pruned; the update
    # must still leave them at exactly zero on every later step.
    params = mlp_params()
    tx = fj.global_magnitude(optax.sgd(0.5, momentum=0.99), sparsity=0.9,
                             every=2)
    params, state, _ = run(tx, params, 12)
    masks = fj.get_masks(state)
    for k in params:
      self.assertTrue(bool(jnp.all(
          jnp.where(masks[k]["kernel"], True, params[k]["kernel"] == 0.0))))

  def test_jits_once_with_events(self):
    params = mlp_params()
    tx = fj.flipout(optax.sgd(0.05, momentum=0.9), sparsity=0.99, every=5)
    params, state, step = run(tx, params, 50)
    self.assertEqual(step._cache_size(), 1)
    self.assertEqual(int(state.count), 50)
    n = prunable_size(params)
    self.assertEqual(count_zeros(params), round(0.99 * n))

  def test_works_inside_chain_and_get_masks_finds_it(self):
    params = mlp_params()
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     fj.global_magnitude(optax.sgd(0.1), sparsity=0.75,
                                         every=1))
    params, state, _ = run(tx, params, 3)
    masks = fj.get_masks(state)
    dead = sum(int(jnp.sum(~m)) for m in jax.tree.leaves(masks))
    self.assertEqual(dead, round(0.75 * prunable_size(params)))
    self.assertIsNone(masks["dense0"]["bias"])

  def test_get_masks_without_prune_state_raises(self):
    with self.assertRaisesRegex(ValueError, "state"):
      fj.get_masks(optax.sgd(0.1).init(mlp_params()))

  def test_same_seed_bit_identical(self):
    tx = lambda: fj.flipout(optax.sgd(0.05, momentum=0.9), sparsity=0.9,
                            every=3, seed=7)
    a, _, _ = run(tx(), mlp_params(), 10)
    b, _, _ = run(tx(), mlp_params(), 10)
    chex.assert_trees_all_equal(a, b)

  def test_end_step_schedule_reaches_target_by_end(self):
    tx = fj.flipout(optax.sgd(0.05), sparsity=0.9, end_step=20)
    # 4 events of 0.5 are needed (0.9375 >= 0.9): every 5 steps.
    params, state, _ = run(tx, mlp_params(), 21)
    self.assertEqual(count_zeros(params), round(0.9 * prunable_size(params)))


def numpy_flipout_reference(w_seq, sparsity, every, rate, p):
  """Independent reference: flips, saliency and masks over scripted weights."""
  w0 = w_seq[0]
  flips = np.zeros_like(w0, np.int64)
  mask = np.ones_like(w0, bool)
  n = w0.size
  cur = w0.copy()
  events = 0
  saliencies = []
  for t, target in enumerate(w_seq[1:]):
    new = np.where(mask, target, 0.0)
    flips += (np.sign(cur) != np.sign(new)) & mask
    if (t % every == 0) and t > 0:
      events += 1
      keep = n - round(min(1 - (1 - rate) ** events, sparsity) * n)
      sal = np.abs(new) ** p / (flips + 1)
      saliencies.append(sal.copy())
      sal = np.where(mask, sal, -np.inf)
      order = np.argsort(-sal.ravel(), kind="stable")
      mask = np.zeros(n, bool)
      mask[order[:keep]] = True
      mask = mask.reshape(w0.shape)
      flips = np.where(mask, flips, 0)
      new = np.where(mask, new, 0.0)
    cur = new
  return flips, mask, cur, saliencies


class FlipOutReferenceTest(parameterized.TestCase):

  @parameterized.parameters(2.0, 1.5)
  def test_flips_saliency_and_masks_match_numpy(self, p):
    rng = np.random.default_rng(0)
    steps, shape = 13, (6, 7)
    w_seq = [rng.normal(size=shape).astype(np.float32)]
    for t in range(steps):
      w = rng.normal(size=shape).astype(np.float32)
      w[rng.random(shape) < 0.15] = 0.0  # weights passing through exactly 0
      w_seq.append(w)
    # sgd(1.0) with grads = w - target moves the weights to the scripted target.
    tx = fj.flipout(optax.sgd(1.0), sparsity=0.9, every=4, p=p,
                    noise_scale=0.0)
    params = {"w": jnp.asarray(w_seq[0])}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for target in w_seq[1:]:
      grads = {"w": params["w"] - jnp.asarray(target)}
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
    flips, mask, final, _ = numpy_flipout_reference(w_seq, 0.9, 4, 0.5, p)
    np.testing.assert_array_equal(np.asarray(state.method_state["w"]), flips)
    np.testing.assert_array_equal(np.asarray(fj.get_masks(state)["w"]), mask)
    np.testing.assert_array_equal(np.asarray(params["w"]), final)
    # Saliency of the final state equals |θ|^p / (flips + 1).
    ctx = fj.scores.ScoreContext(
        step=state.count, masks=fj.get_masks(state), params=params,
        old_params=params, grads=params, dense_grads=params,
        method_state=state.method_state, key=state.key, extra_args={})
    sal = fj.scores.flipout_saliency(p)(ctx)["w"]
    np.testing.assert_allclose(np.asarray(sal),
                               np.abs(final) ** p / (flips + 1), rtol=1e-6)

  def test_flip_counts_zero_to_and_from_zero(self):
    counter = fj.flip_counter()
    masks = {"w": jnp.ones((4,), bool)}
    counts = counter.init({"w": jnp.zeros(4)}, masks)
    old = {"w": jnp.array([1.0, 0.0, -1.0, 2.0])}
    new = {"w": jnp.array([0.0, 1.0, 1.0, 3.0])}
    counts = counter.update(counts, fj.core.Step(
        step=jnp.zeros([], jnp.int32), params=old, new_params=new, grads=None,
        dense_grads=None, masks=masks, extra_args={}))
    np.testing.assert_array_equal(counts["w"], [1, 1, 1, 0])


class NoiseTest(parameterized.TestCase):

  def test_noise_std_matches_formula(self):
    g = jax.random.normal(jax.random.PRNGKey(0), (400, 500)) * 3.0 + 1.0
    out = fj.noise.add_gradient_noise({"g": g}, jax.random.PRNGKey(1), 0.7,
                                      {"g": True})["g"]
    measured = float(jnp.std(out - g))
    expected = 0.7 * float(jnp.linalg.norm(g)) / math.sqrt(g.size)
    self.assertLess(abs(measured / expected - 1.0), 0.02)

  def test_hash_generator_normals_are_standard_and_independent(self):
    n = 1000
    key = jax.random.PRNGKey(5)
    z = np.asarray(fj.noise.normal16(key, (n, n), "hash"), np.float64).ravel()
    tol = 4.0 / n  # 4 standard errors of a mean / correlation over n² draws
    self.assertLess(abs(z.mean()), tol)
    self.assertLess(abs(z.std() - 1.0), 0.01)
    self.assertLess(abs(np.corrcoef(z[:-1], z[1:])[0, 1]), tol)
    # Rows (neighbours along the first axis).
    grid = z.reshape(n, n)
    self.assertLess(abs(np.corrcoef(grid[:-1].ravel(),
                                    grid[1:].ravel())[0, 1]), tol)
    for other in (jax.random.fold_in(key, 1), jax.random.PRNGKey(6)):
      w = np.asarray(fj.noise.normal16(other, (n, n), "hash")).ravel()
      self.assertLess(abs(np.corrcoef(z, w)[0, 1]), tol)
    bits = np.asarray(fj.noise.hash_bits(key, (1 << 18,)))
    freq = ((bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(0)
    np.testing.assert_array_less(np.abs(freq - 0.5), 4 * 0.5 / 2**9)
    # A typed key hashes like its raw words; the draw is deterministic.
    typed = jax.random.wrap_key_data(key)
    np.testing.assert_array_equal(fj.noise.hash_bits(typed, (7, 3)),
                                  fj.noise.hash_bits(key, (7, 3)))

  def test_hash_generator_table_is_the_inverse_cdf(self):
    key = jax.random.PRNGKey(2)
    # One word per entry, its high 16 bits through the inverse CDF.
    words = fj.noise.hash_bits(key, (6, 10))
    want = jax.jit(fj.noise._inverse_cdf16)(words >> 16)
    np.testing.assert_array_equal(
        jax.jit(lambda k: fj.noise.normal16(k, (6, 10), "hash"))(key), want)

  def test_noise_generator_is_validated(self):
    with self.assertRaisesRegex(ValueError, "noise_generator"):
      fj.noise.gradient_noise(1.0, generator="philox")
    with self.assertRaisesRegex(ValueError, "noise_generator"):
      fj.flipout(optax.sgd(0.1), sparsity=0.5, every=2, exact_noise=True,
                 noise_generator="hash")

  def test_flipout_with_hash_noise_prunes_to_exact_zeros(self):
    params = mlp_params()
    runs = []
    for generator in ("hash", "hash", "threefry"):
      tx = fj.flipout(optax.sgd(0.1), sparsity=0.75, every=2,
                      noise_generator=generator, seed=1)
      p, state = params, tx.init(params)
      for t in range(5):
        grads = jax.grad(mlp_loss)(p, *batch(t))
        updates, state = jax.jit(tx.update)(grads, state, p)
        p = optax.apply_updates(p, updates)
      masks = fj.get_masks(state)
      for m, w in zip(fj.trees.prunable_leaves(masks, masks),
                      fj.trees.prunable_leaves(masks, p)):
        self.assertTrue(bool(jnp.all(jnp.where(m, 0.0, w) == 0.0)))
      runs.append(p)
    chex.assert_trees_all_equal(runs[0], runs[1])  # same seed, same run
    self.assertFalse(all(bool(jnp.array_equal(a, b)) for a, b in zip(
        jax.tree.leaves(runs[0]), jax.tree.leaves(runs[2]))))

  def test_zero_scale_adds_no_noise(self):
    params = mlp_params()
    grads = jax.grad(mlp_loss)(params, *batch(0))
    tx = fj.global_magnitude(optax.sgd(1.0), sparsity=0.5, every=10,
                             noise_scale=0.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_equal(updates, jax.tree.map(lambda g: -g, grads))

  def test_noise_piece_composes_into_core_prune(self):
    # A method built from the pieces (score, schedule, noise) equals the
    # constructor that uses them; a piece never puts noise on pruned weights.
    params = mlp_params()
    piece = fj.noise.gradient_noise(1.0, on="prunable")
    self.assertIsInstance(piece, fj.noise.GradientNoise)
    built = fj.core.prune(
        optax.sgd(0.1), score_fn=fj.scores.magnitude,
        schedule=fj.schedules.periodic(0.75, 2, 0.5), noise=piece, seed=3)
    reference = fj.global_magnitude(optax.sgd(0.1), sparsity=0.75, every=2,
                                    noise_scale=1.0, noise_on="prunable",
                                    seed=3)
    out = []
    for tx in (built, reference):
      p, state = params, tx.init(params)
      for t in range(7):
        grads = jax.grad(mlp_loss)(p, *batch(t))
        updates, state = jax.jit(tx.update)(grads, state, p)
        p = optax.apply_updates(p, updates)
      out.append(p)
      masks = fj.get_masks(state)
      k = masks["dense0"]["kernel"]
      self.assertLess(int(jnp.sum(k)), k.size)
      self.assertTrue(bool(jnp.all(jnp.where(k, 0.0, p["dense0"]["kernel"])
                                   == 0.0)))
    chex.assert_trees_all_equal(*out)

  def test_noise_piece_arguments(self):
    self.assertIsNone(fj.noise.gradient_noise(0.0))
    self.assertIsNotNone(fj.noise.gradient_noise(jnp.float32(0.0)))
    with self.assertRaisesRegex(ValueError, "^noise_scale: "):
      fj.noise.gradient_noise(-1.0)
    with self.assertRaisesRegex(ValueError, "^noise_on: "):
      fj.noise.gradient_noise(1.0, on="bias")
    with self.assertRaisesRegex(ValueError, "^noise: "):
      fj.core.prune(optax.sgd(0.1), score_fn=fj.scores.magnitude,
                    schedule=fj.schedules.periodic(0.5, 2, 0.5), noise=1.0)

  def test_noise_on_prunable_only_leaves_biases_clean(self):
    params = mlp_params()
    grads = jax.grad(mlp_loss)(params, *batch(0))
    tx = fj.flipout(optax.sgd(1.0), sparsity=0.5, every=10,
                    noise_on="prunable")
    updates, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_equal(updates["dense0"]["bias"],
                                -grads["dense0"]["bias"])
    self.assertFalse(bool(jnp.all(updates["dense0"]["kernel"]
                                  == -grads["dense0"]["kernel"])))


class SelectionTest(parameterized.TestCase):

  @parameterized.parameters(0, 1, 7, 50, 99, 100)
  def test_exact_k_with_ties_matches_stable_sort(self, k):
    rng = np.random.default_rng(k)
    a = rng.integers(0, 5, (6, 10)).astype(np.float32)  # many ties
    b = rng.integers(0, 5, (40,)).astype(np.float32)
    masks = fj.selection.top_k_masks([jnp.asarray(a), jnp.asarray(b)],
                                     [[0, 1]], jnp.array([k]))
    flat = np.concatenate([a.ravel(), b.ravel()])
    order = np.argsort(-flat, kind="stable")
    ref = np.zeros(flat.size, bool)
    ref[order[:k]] = True
    got = np.concatenate([np.asarray(masks[0]).ravel(), np.asarray(masks[1]).ravel()])
    np.testing.assert_array_equal(got, ref)

  def test_negative_scores_infinities_and_nan(self):
    s = jnp.array([-3.0, jnp.nan, -jnp.inf, 2.0, -0.0, 0.0, jnp.inf, -1e-30])
    m = fj.selection.top_k_mask(s, 5)
    np.testing.assert_array_equal(m, [False, False, False, True, True, True,
                                      True, True])

  def test_ineligible_ranked_last(self):
    s = jnp.array([5.0, 4.0, 3.0, 2.0])
    eligible = jnp.array([False, True, True, True])
    np.testing.assert_array_equal(
        fj.selection.top_k_mask(s, 2, eligible), [False, True, True, False])

  def test_per_tensor_groups(self):
    a = jnp.arange(10.0)
    b = -jnp.arange(6.0)
    ma, mb = fj.selection.top_k_masks([a, b], [[0], [1]], jnp.array([3, 2]))
    np.testing.assert_array_equal(np.nonzero(np.asarray(ma))[0], [7, 8, 9])
    np.testing.assert_array_equal(np.nonzero(np.asarray(mb))[0], [0, 1])


class ScheduleAndBudgetTest(parameterized.TestCase):

  @parameterized.parameters((0.75, 2), (0.9375, 4), (0.984375, 6),
                            (0.99609375, 8), (0.9990234375, 10), (0.99, 7))
  def test_periodic_events(self, sparsity, n):
    s = fj.schedules.periodic(sparsity, every=10, rate=0.5, start_step=5)
    self.assertEqual(len(s.steps), n)
    self.assertEqual(s.steps[0], 15)
    self.assertEqual(s.sparsities[-1], sparsity)
    np.testing.assert_allclose(s.sparsities[:-1],
                               [1 - 0.5 ** k for k in range(1, n)])

  def test_n_events_rate(self):
    s = fj.schedules.n_events(0.9, num_events=3, every=5)
    rate = 1 - 0.1 ** (1 / 3)
    np.testing.assert_allclose(s.sparsities, [1 - (1 - rate) ** k for k in (1, 2, 3)])

  def test_rounds_reach_target(self):
    s = fj.schedules.rounds(0.75, 25, 10)
    left = 1.0
    for k in range(1, 26):
      left *= 1 - 0.75 / (k * 0.75 + 25 * 0.25)
      self.assertAlmostEqual(1 - left, s.sparsities[k - 1], places=12)
    self.assertEqual(s.sparsities[-1], 0.75)

  def test_polynomial(self):
    s = fj.schedules.polynomial(0.8, start_step=10, end_step=20, every=5)
    self.assertEqual(s.steps, (10, 15, 20))
    np.testing.assert_allclose(s.sparsities, [0.0, 0.8 * (1 - 0.5 ** 3), 0.8])
    self.assertAlmostEqual(float(fj.schedules.polynomial_sparsity(15, 0.8, 10, 20)),
                           0.8 * (1 - 0.5 ** 3), places=6)
    self.assertEqual(float(fj.schedules.polynomial_sparsity(3, 0.8, 10, 20)), 0.0)

  def test_event_lookup_traced(self):
    s = fj.schedules.periodic(0.75, every=3)
    ev = jax.jit(lambda t: s.event_index(t))
    self.assertEqual([bool(ev(t)[0]) for t in range(8)],
                     [False, False, False, True, False, False, True, False])

  def test_erk_exact_and_clamped(self):
    shapes = [(3, 3, 3, 16), (3, 3, 16, 32), (512, 10), (8, 4)]
    paths = ["a", "b", "c", "d"]
    for s in (0.5, 0.9, 0.98):
      dens = fj.distributions.erk_densities(shapes, 1 - s)
      self.assertTrue(np.all(dens <= 1.0 + 1e-12))
      b = fj.distributions.budget("erk", paths, shapes, s)
      n = sum(np.prod(x) for x in shapes)
      self.assertEqual(int(b.keep.sum()), n - round(s * n))
      self.assertTrue(np.all(b.keep <= [np.prod(x) for x in shapes]))
    # The small (8, 4) layer would exceed density 1 at 50 %: it is made dense.
    b = fj.distributions.budget("erk", paths, shapes, 0.5)
    self.assertEqual(int(b.keep[3]), 32)

  def test_uniform_and_custom_budgets(self):
    b = fj.distributions.budget("uniform", ["a", "b"], [(10, 10), (4, 5)], 0.5)
    np.testing.assert_array_equal(b.keep, [50, 10])
    b = fj.distributions.budget({"a": 0.9}, ["a", "b"], [(10, 10), (4, 5)], 0.45,
                                final_sparsity=0.9)
    np.testing.assert_array_equal(b.keep, [55, 20])

  def test_uniform_distribution_in_transformation(self):
    tx = fj.global_magnitude(optax.sgd(0.1), sparsity=0.5, every=1,
                             distribution="uniform")
    params, state, _ = run(tx, mlp_params(), 2)
    for k in params:
      w = params[k]["kernel"]
      self.assertEqual(int(jnp.sum(w == 0)), round(0.5 * w.size))


class ValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      (dict(sparsity=-0.1, every=5), "sparsity"),
      (dict(sparsity=1.0, every=5), "sparsity"),
      (dict(sparsity=0.5, every=0), "every"),
      (dict(sparsity=0.5, every=5, prune_rate=1.0), "prune_rate"),
      (dict(sparsity=0.5, every=5, prune_rate=0.0), "prune_rate"),
      (dict(sparsity=0.5, every=5, p=0.0), "p"),
      (dict(sparsity=0.5, every=5, noise_scale=-1.0), "noise_scale"),
      (dict(sparsity=0.5, every=5, noise_on="bias"), "noise_on"),
      (dict(sparsity=0.5, every=5, distribution="erdos"), "distribution"),
      (dict(sparsity=0.5), "every"),
  )
  def test_bad_arguments(self, kwargs, name):
    with self.assertRaisesRegex(ValueError, name):
      fj.flipout(optax.sgd(0.1), **kwargs)

  def test_changed_params_tree(self):
    tx = fj.flipout(optax.sgd(0.1), sparsity=0.5, every=5)
    params = mlp_params()
    state = tx.init(params)
    other = mlp_params(sizes=(12, 20, 5))
    with self.assertRaisesRegex(ValueError, "params"):
      tx.update(other, state, other)
    reshaped = mlp_params(sizes=(12, 21, 16, 5))
    with self.assertRaisesRegex(ValueError, "shape"):
      tx.update(reshaped, state, reshaped)

  def test_filter_selecting_nothing(self):
    tx = fj.flipout(optax.sgd(0.1), sparsity=0.5, every=5,
                    filter_fn=lambda path, leaf: False)
    with self.assertRaisesRegex(ValueError, "filter_fn"):
      tx.init(mlp_params())

  def test_integer_leaves(self):
    params = {"w": jnp.ones((3, 3), jnp.int32)}
    tx = fj.global_magnitude(optax.sgd(0.1), sparsity=0.5, every=5,
                             filter_fn=lambda path, leaf: True)
    with self.assertRaisesRegex(ValueError, "dtype"):
      tx.init(params)

  def test_missing_params(self):
    tx = fj.flipout(optax.sgd(0.1), sparsity=0.5, every=5)
    params = mlp_params()
    with self.assertRaisesRegex(ValueError, "params"):
      tx.update(params, tx.init(params))

  def test_mask_rule_must_return_a_mask_update(self):
    # One contract: a rule returning bare masks is an error naming the rule.
    bare = lambda ctx, scores, groups, keep: fj.core.shrink_rule()(  # pylint: disable=g-long-lambda
        ctx, scores, groups, keep).masks
    tx = fj.prune(optax.sgd(0.1), score_fn=fj.scores.magnitude,
                  schedule=fj.schedules.one_shot(0.5), mask_rule=bare)
    params = mlp_params()
    with self.assertRaisesRegex(ValueError, "mask_rule: must return a "
                                "flipout_jax.core.MaskUpdate"):
      tx.update(params, tx.init(params), params)


class RawWeightsModeTest(parameterized.TestCase):
  """``core.prune(weights="raw")``: its arguments, and the loop against a
  NumPy reference of straight-through hard masks."""

  def _raw(self, **kw):
    args = dict(weights="raw", raw_rule=fj.core.hard_raw_rule(),
                schedule=fj.schedules.one_shot(0.5, 0))
    args.update(kw)
    return fj.core.prune(optax.sgd(0.1), **args)

  @parameterized.parameters(
      (dict(score_fn=fj.scores.magnitude), "score_fn: not used with "
       "weights='raw'"),
      (dict(mask_rule=fj.core.shrink_rule()), "mask_rule: not used"),
      (dict(noise=fj.noise.gradient_noise(1.0)), "noise: not used"),
      (dict(tracker=fj.core.no_tracker()), "tracker: not used"),
      (dict(initial_masks={}), "initial_masks: not used"),
      (dict(reset_moments="all"), "reset_moments"),
      (dict(raw_rule=None), "raw_rule: must be a flipout_jax.core.RawRule"),
      (dict(raw_rule=lambda *a: a), "raw_rule: must be"),
      (dict(freeze_step=0), "freeze_step"),
      (dict(freeze_step=1.5), "freeze_step"),
      (dict(pruned_decay=-1.0), "pruned_decay"),
      (dict(weights="rawish"), "weights"),
  )
  def test_bad_raw_arguments(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      self._raw(**kwargs)

  @parameterized.parameters(
      (dict(raw_rule=fj.core.hard_raw_rule()), "raw_rule: only with "
       "weights='raw'"),
      (dict(freeze_step=3), "freeze_step: only with weights='raw'"),
      (dict(pruned_decay=0.1), "pruned_decay: only with weights='raw'"),
      (dict(schedule=fj.schedules.ramp(0.5, 0, 10)), "schedule: a "
       "schedules.ramp has no events"),
  )
  def test_raw_only_arguments_rejected_in_masked_mode(self, kwargs, message):
    args = dict(score_fn=fj.scores.magnitude,
                schedule=fj.schedules.one_shot(0.5, 0))
    args.update(kwargs)
    with self.assertRaisesRegex(ValueError, message):
      fj.core.prune(optax.sgd(0.1), **args)

  def test_straight_through_hard_masks_match_numpy(self):
    # Plain SGD on the raw weights with the gradient taken at the params;
    # the params are the raw weights masked to the round(0.5·n) largest |raw|
    # per layer (uniform), re-selected by the first 4 updates (the 4th is the
    # last selecting one: freeze_step=4 counts from 0); frozen after it.
    lr, freeze = 0.1, 4
    tx = self._raw(distribution="uniform", freeze_step=freeze)
    params = mlp_params()
    state = tx.init(params)
    params = fj.sparse_params(params, state)
    kernels = [k for k in params if params[k]["kernel"].ndim == 2]
    raw = {k: np.asarray(mlp_params()[k]["kernel"]) for k in kernels}
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    frozen_mask = {}
    for t in range(7):
      g = jax.jit(jax.grad(mlp_loss))(params, *batch(t))
      updates, state = step(g, state, params)
      params = optax.apply_updates(params, updates)
      for k in kernels:
        w = np.asarray(params[k]["kernel"])
        if t < freeze:  # reference: SGD on raw, then top-k of |raw|
          # float32 as optax.sgd: raw + (−lr)·g.
          raw[k] = raw[k] + np.float32(-lr) * np.asarray(g[k]["kernel"])
          n = raw[k].size
          keep = n - round(0.5 * n)
          order = np.argsort(-np.abs(raw[k]).ravel(), kind="stable")
          mask = np.zeros(n, bool)
          mask[order[:keep]] = True
          mask = mask.reshape(raw[k].shape)
          np.testing.assert_array_equal(w != 0, mask)
          np.testing.assert_allclose(w[mask], raw[k][mask], rtol=1e-5,
                                     atol=1e-6)
          assert np.all(w[~mask] == 0.0)
          if t == freeze - 1:
            frozen_mask[k] = mask
        else:  # frozen: the mask of the last selecting step, pruned == +0.0
          np.testing.assert_array_equal(w != 0, frozen_mask[k])
          got_raw = np.asarray(fj.get_raw_weights(state)[k]["kernel"])
          np.testing.assert_array_equal(got_raw, w)


class HoyerSquareTest(parameterized.TestCase):

  def test_gradient_matches_closed_form(self):
    w = jnp.array([[1.0, -2.0], [0.5, 0.0]])
    params = {"w": w, "b": jnp.ones(2)}
    tx = fj.hoyer_square(0.3)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params),
                           params)
    l1, l2 = 3.5, 5.25
    expected = 0.3 * (2 * l1 * np.sign(w) / l2 - 2 * l1 ** 2 * w / l2 ** 2)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], [0.0, 0.0])
    self.assertAlmostEqual(float(fj.hoyer_square_penalty(params, {"w": True, "b": False})),
                           l1 ** 2 / l2, places=5)

  def test_threshold_prune_then_fixed_mask(self):
    params = {"w": jnp.array([[1e-5, 0.3], [-2e-4, -5e-5]]), "b": jnp.array([1e-6])}
    pruned, masks = fj.threshold_prune(params, 1e-4)
    np.testing.assert_array_equal(pruned["w"], np.float32([[0.0, 0.3], [-2e-4, 0.0]]))
    np.testing.assert_array_equal(pruned["b"], params["b"])
    tx = fj.fixed_mask(optax.sgd(1.0), masks)
    state = tx.init(pruned)
    grads = jax.tree.map(jnp.ones_like, pruned)
    updates, state = tx.update(grads, state, pruned)
    new = optax.apply_updates(pruned, updates)
    np.testing.assert_array_equal(new["w"] == 0, [[True, False], [False, True]])

  def test_bad_strength(self):
    with self.assertRaisesRegex(ValueError, "strength"):
      fj.hoyer_square(-1.0)
    with self.assertRaisesRegex(ValueError, "threshold"):
      fj.threshold_prune({"w": jnp.ones((2, 2))}, 0.0)


class ReportTest(parameterized.TestCase):

  def test_counts(self):
    params = {"a": {"kernel": jnp.array([[0.0, 1.0], [2.0, 0.0]]),
                    "bias": jnp.zeros(2)},
              "b": {"kernel": jnp.zeros((3, 1))}}
    r = fj.sparsity_report(params)
    self.assertEqual((r.size, r.zeros), (7, 5))
    self.assertEqual(r.as_dict(), {"a/kernel": 0.5, "b/kernel": 1.0})
    self.assertIn("| **global** | | 7 | 5 | 5 | 71.43% | |", str(r))
    self.assertEqual(r.collapsed, ("b/kernel",))
    self.assertIn("collapsed layer(s)** (no weight left): b/kernel", str(r))
    self.assertTrue(r.ok)

  def test_masks_beside_values(self):
    # The mask prunes 3 weights; one of them is 2.0 in the params (as after a
    # transformation chained after the pruning one) and a kept one is NaN.
    params = {"a": {"kernel": jnp.array([[0.0, 2.0], [jnp.nan, 0.0]]),
                    "bias": jnp.array([1.0, jnp.inf])}, "b": None}
    masks = {"a": {"kernel": jnp.array([[False, False], [True, False]]),
                   "bias": None}, "b": None}
    with self.assertWarnsRegex(UserWarning, "a/kernel: 1 pruned weights not 0.0"):
      r = fj.sparsity_report(params, masks)
    self.assertEqual((r.zeros, r.value_zeros, r.pruned_nonzero, r.nonfinite),
                     (3, 2, 1, 2))
    self.assertEqual(r.nonfinite_dense, (("a/bias", 1),))
    self.assertFalse(r.ok)
    self.assertIn("**1 pruned weights not 0.0**; **1 non-finite**", str(r))
    self.assertIn("WARNING: the exact-zero contract is broken", str(r))
    with self.assertRaisesRegex(fj.SparsityError,
                                "a/kernel: 1 pruned weights not 0.0, 1 "
                                "non-finite; a/bias: 1 non-finite"):
      fj.check_sparse(params, masks)
    fixed = {"a": {"kernel": jnp.array([[0.0, 0.0], [1.0, 0.0]]),
                   "bias": jnp.array([1.0, jnp.inf])}, "b": None}
    with self.assertRaisesRegex(fj.SparsityError, "apply_if_finite"):
      fj.check_sparse(fixed, masks)
    self.assertEqual(fj.check_sparse(fixed, masks, allow_nonfinite=True).zeros, 3)

  def test_check_sparse_reads_an_optimizer_state(self):
    params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
    tx = fj.global_magnitude(optax.sgd(0.1), sparsity=0.5, every=1,
                             prune_rate=0.5)
    state, new = tx.init(params), params
    for _ in range(2):  # The first event is at step 1.
      updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state,
                                 new)
      new = optax.apply_updates(new, updates)
    self.assertEqual(fj.check_sparse(new, state).zeros, 4)
    with self.assertRaisesRegex(fj.SparsityError, "w: 4 pruned weights not 0.0"):
      fj.check_sparse(params, state)


class FlaxIntegrationTest(parameterized.TestCase):

  def test_linen_train_step(self):
    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(5)(x)

    model = MLP()
    x, y = batch(0)
    variables = model.init(jax.random.PRNGKey(0), x)
    tx = fj.flipout(optax.sgd(0.1, momentum=0.9), sparsity=0.9, every=3)
    state = tx.init(variables["params"])

    @jax.jit
    def train_step(params, state, x, y):
      def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      grads = jax.grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    params = variables["params"]
    for i in range(15):
      params, state = train_step(params, state, *batch(i))
    report = fj.sparsity_report(params)
    self.assertEqual(report.zeros, round(0.9 * report.size))

  def test_nnx_optimizer(self):
    class MLP(nnx.Module):
      def __init__(self, rngs):
        self.l1 = nnx.Linear(12, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 5, rngs=rngs)

      def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))

    model = MLP(nnx.Rngs(0))
    tx = fj.flipout(optax.adam(1e-2), sparsity=0.9, every=3)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
      grads = nnx.grad(loss_fn)(model)
      optimizer.update(model, grads)

    for i in range(15):
      train_step(model, optimizer, *batch(i))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    report = fj.sparsity_report(params)
    self.assertEqual(report.zeros, round(0.9 * report.size))
    masks = fj.get_masks(optimizer.opt_state)
    self.assertEqual(fj.sparsity_report(params, masks).zeros, report.zeros)
