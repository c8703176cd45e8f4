"""Movement pruning: S = −Σ θ·g, cubic targets, exact counts and zeros."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj

START, END, EVERY, SPARSITY = 1, 7, 2, 0.8  # events at 1, 3, 5, 7
STEPS = 10


def make_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"l1": {"kernel": jax.random.normal(k1, (6, 10)) / 2,
                 "bias": jnp.zeros((10,))},
          "l2": {"kernel": jax.random.normal(k2, (10, 3)) / 3,
                 "bias": jnp.zeros((3,))}}


def loss(params, x, y):
  h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  logits = h @ params["l2"]["kernel"] + params["l2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batch(t):
  k1, k2 = jax.random.split(jax.random.PRNGKey(50 + t))
  return jax.random.normal(k1, (8, 6)), jax.random.randint(k2, (8,), 0, 3)


def cubic(t):
  """The target sparsity at event step t, computed here independently."""
  frac = (t - START) / (END - START)
  return SPARSITY * (1.0 - (1.0 - frac) ** 3)


def kernels(tree):
  return [np.asarray(tree["l1"]["kernel"]), np.asarray(tree["l2"]["kernel"])]


def run(tx, params, steps=STEPS):
  """Yields ``(t, params before, grads, params after, state)`` per step."""
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  state = tx.init(params)
  for t in range(steps):
    g = jax.grad(loss)(params, *batch(t))
    updates, state = step(params, state, g)
    new = optax.apply_updates(params, updates)
    yield t, params, g, new, state
    params = new


def test_scores_counts_and_zeros_every_step():
  params = make_params()
  n = sum(k.size for k in kernels(params))
  # Weight decay inside the inner optimizer: S must see the loss gradient.
  inner = optax.chain(optax.add_decayed_weights(0.1),
                      optax.sgd(0.2, momentum=0.9))
  tx = fj.movement(inner, sparsity=SPARSITY, start_step=START, end_step=END,
                   every=EVERY)
  s_np = [np.zeros_like(k) for k in kernels(params)]
  target = 0.0
  for t, before, g, after, state in run(tx, params):
    masks = kernels(fj.get_masks(state))
    # Independent accumulation: S -= θ·g (θ before the step, g its loss
    # gradient), zeroed where the mask (after this step's event) is off.
    s_np = [np.where(m, s - th * gr, 0.0) for s, th, gr, m in zip(
        s_np, kernels(before), kernels(g), masks)]
    for s, s_fj in zip(s_np, kernels(state.method_state)):
      np.testing.assert_allclose(s_fj, s, rtol=1e-5, atol=1e-7)
    if t in (1, 3, 5, 7):
      target = cubic(t)
    pruned = sum(int(np.sum(~m)) for m in masks)
    assert pruned == round(target * n), (t, pruned, target)
    for k, m in zip(kernels(after), masks):
      assert np.all(k[~m] == 0.0)
      assert np.all(k[m] != 0.0)  # alive weights still moving
    for s, m in zip(kernels(state.method_state), masks):
      assert np.all(s[~m] == 0.0)
  assert target == pytest.approx(SPARSITY)


def test_events_keep_the_highest_scores_and_masks_only_shrink():
  params = make_params()
  tx = fj.movement(optax.adam(1e-2), sparsity=SPARSITY, start_step=START,
                   end_step=END, every=EVERY)
  prev_masks = [np.ones(k.shape, bool) for k in kernels(params)]
  s_before = [np.zeros_like(k) for k in kernels(params)]
  for t, before, g, _, state in run(tx, params, steps=END + 1):
    masks = kernels(fj.get_masks(state))
    # The score of this event: S after adding this step's −θ·g.
    score = [s - th * gr for s, th, gr in zip(s_before, kernels(before),
                                              kernels(g))]
    for m0, m1 in zip(prev_masks, masks):
      assert not np.any(m1 & ~m0)  # masks only shrink
    if t in (3, 5, 7):
      alive = np.concatenate([sc[m0] for sc, m0 in zip(score, prev_masks)])
      kept = np.concatenate([sc[m1] for sc, m1 in zip(score, masks)])
      dropped = np.concatenate(
          [sc[m0 & ~m1] for sc, m0, m1 in zip(score, prev_masks, masks)])
      assert dropped.size and kept.size + dropped.size == alive.size
      # A global hard top-k of S (up to the rounding of this recomputation).
      assert kept.min() >= dropped.max() - 1e-6
    s_before = [np.where(m, s, 0.0) for s, m in zip(score, masks)]
    prev_masks = masks


def test_schedule_is_cubic_at_the_event_steps():
  tx_schedule = fj.schedules.polynomial(SPARSITY, START, END, EVERY)
  assert tx_schedule.steps == (1, 3, 5, 7)
  np.testing.assert_allclose(tx_schedule.sparsities,
                             [cubic(t) for t in (1, 3, 5, 7)], rtol=1e-12)
  # An end step off the grid is an event too, at the final sparsity.
  params = make_params()
  n = sum(k.size for k in kernels(params))
  tx = fj.movement(optax.sgd(0.1), sparsity=0.5, start_step=0, end_step=5,
                   every=2)  # events at 0, 2, 4, 5
  counts = [sum(int(np.sum(~m)) for m in kernels(fj.get_masks(state)))
            for _, _, _, _, state in run(tx, params, steps=6)]
  expected = [round(0.5 * (1 - (1 - t / 5) ** 3) * n) for t in (0, 2, 4, 5)]
  assert counts == [expected[0]] * 2 + [expected[1]] * 2 + [expected[2],
                                                            expected[3]]


def test_uniform_distribution_prunes_each_layer_exactly():
  params = make_params()
  tx = fj.movement(optax.sgd(0.1), sparsity=0.5, start_step=0, end_step=2,
                   distribution="uniform")
  *_, (_, _, _, _, state) = run(tx, params, steps=3)
  for m in kernels(fj.get_masks(state)):
    assert int(np.sum(~m)) == round(0.5 * m.size)


def test_same_seed_is_bit_identical():
  outs = []
  for _ in range(2):
    tx = fj.movement(optax.adam(1e-2), sparsity=SPARSITY, start_step=START,
                     end_step=END, every=EVERY)
    *_, (_, _, _, after, state) = run(tx, make_params())
    outs.append((after, state.method_state))
  jax.tree.map(np.testing.assert_array_equal, outs[0], outs[1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), "sparsity: "),
    (dict(sparsity=True), "sparsity: "),
    (dict(end_step=0), "end_step: must be > start_step"),
    (dict(start_step=-1), "start_step: "),
    (dict(every=0), "every: "),
    (dict(every=1.5), "every: "),
    (dict(distribution="bogus"), "distribution"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
  args = dict(sparsity=0.5, start_step=0, end_step=10) | kwargs
  with pytest.raises(ValueError, match=match):
    fj.movement(optax.sgd(0.1), **args)


def test_registry_builds_movement():
  assert fj.registry.get("movement") is fj.movement
  kw = fj.registry.keywords("movement")
  assert kw["sparsity"] is fj.registry.REQUIRED and kw["every"] == 1
  tx = fj.registry.build("movement", optax.sgd(0.1), sparsity=0.5,
                         start_step=0, end_step=2)
  assert isinstance(tx.init(make_params()), fj.PruneState)
  with pytest.raises(ValueError, match="bogus: not an argument of movement"):
    fj.registry.build("movement", optax.sgd(0.1), bogus=1)
  with pytest.raises(ValueError, match="end_step: required by movement"):
    fj.registry.build("movement", optax.sgd(0.1), sparsity=0.5, start_step=0)
  with pytest.raises(ValueError, match="name: unknown method 'nope'"):
    fj.registry.get("nope")
