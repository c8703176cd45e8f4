"""Sparsity structures (flipout_jax.structure) and their use by core.prune."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import core
from flipout_jax import structure as st


def params3(key=0, hidden=(8, 12)):
  k = jax.random.split(jax.random.PRNGKey(key), 3)
  d0, d1 = hidden
  return {
      "fc1": {"kernel": jax.random.normal(k[0], (16, d0)),
              "bias": jnp.zeros((d0,))},
      "fc2": {"kernel": jax.random.normal(k[1], (d0, d1)),
              "bias": jnp.zeros((d1,))},
      "fc3": {"kernel": jax.random.normal(k[2], (d1, 4)),
              "bias": jnp.zeros((4,))},
  }


def kernels(tree):
  return [tree[f"fc{i}"]["kernel"] for i in (1, 2, 3)]


def run_one_shot(structure, sparsity, params, distribution="global",
                 score_fn=fj.scores.magnitude):
  tx = fj.prune(optax.sgd(0.0), score_fn=score_fn,
                schedule=fj.schedules.one_shot(sparsity),
                distribution=distribution, structure=structure)
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  return optax.apply_updates(params, updates), fj.get_masks(state)


def np_nm_masks(scores, n, m):
  """Independent reference: per group of m along axis 0 of a 2-D array,
  keep the n largest (stable: earlier index wins ties)."""
  rows, cols = scores.shape
  out = np.zeros(scores.shape, bool)
  for c in range(cols):
    for g in range(rows // m):
      block = scores[g * m:(g + 1) * m, c]
      order = sorted(range(m), key=lambda i: (-block[i], i))
      for i in order[:n]:
        out[g * m + i, c] = True
  return out


class TestNM:

  def test_one_shot_matches_reference_and_params_are_zero(self):
    params = params3()
    new, masks = run_one_shot(fj.n_m(2, 4), 0.5, params)
    for w, m_new, m in zip(kernels(params), kernels(new), kernels(masks)):
      ref = np_nm_masks(np.abs(np.asarray(w)), 2, 4)
      np.testing.assert_array_equal(np.asarray(m), ref)
      assert np.all(np.asarray(m_new)[~ref] == 0.0)
      # Every group of 4 inputs of every output holds exactly 2 weights.
      counts = np.asarray(st.nm_group_counts(m, 4))
      assert np.all(counts == 2)

  def test_intermediate_target_gives_three_of_four(self):
    params = params3()
    _, masks = run_one_shot(fj.n_m(2, 4), 0.5, params)
    tx = fj.prune(optax.sgd(0.0), score_fn=fj.scores.magnitude,
                  schedule=fj.schedules.Schedule((0, 1), (0.25, 0.5)),
                  structure=fj.n_m(2, 4))
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    _, state = tx.update(zeros, state, params)
    counts = [np.asarray(st.nm_group_counts(m, 4))
              for m in kernels(fj.get_masks(state))]
    assert all(np.all(c == 3) for c in counts)
    _, state = tx.update(zeros, state, params)
    np.testing.assert_array_equal(
        np.asarray(kernels(fj.get_masks(state))[0]),
        np.asarray(kernels(masks)[0]))

  def test_incompatible_layer_is_named_or_skipped(self):
    params = params3(hidden=(8, 10))  # fc3 has 10 inputs: not 4-divisible
    tx = fj.prune(optax.sgd(0.1), score_fn=fj.scores.magnitude,
                  schedule=fj.schedules.one_shot(0.5), structure=fj.n_m(2, 4))
    with pytest.raises(ValueError, match="fc3/kernel"):
      tx.init(params)
    new, masks = run_one_shot(fj.n_m(2, 4, skip_incompatible=True), 0.5,
                              params)
    assert bool(jnp.all(kernels(masks)[2]))
    assert np.all(np.asarray(st.nm_group_counts(kernels(masks)[0], 4)) == 2)

  def test_final_sparsity_must_match_pattern(self):
    tx = fj.prune(optax.sgd(0.1), score_fn=fj.scores.magnitude,
                  schedule=fj.schedules.one_shot(0.9), structure=fj.n_m(2, 4))
    with pytest.raises(ValueError, match="sparsity: with structure n_m"):
      tx.init(params3())

  @pytest.mark.parametrize("bad, match", [
      (dict(n=5, m=4), "n: must be an int in"),
      (dict(n=2, m=0), "m: must be an int in"),
      (dict(n=2, m=4, axis=1.5), "axis"),
  ])
  def test_bad_arguments(self, bad, match):
    with pytest.raises(ValueError, match=match):
      fj.n_m(**bad)

  def test_distribution_has_no_effect(self):
    params = params3()
    _, a = run_one_shot(fj.n_m(2, 4), 0.5, params, distribution="erk")
    _, b = run_one_shot(fj.n_m(2, 4), 0.5, params, distribution="global")
    for x, y in zip(kernels(a), kernels(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class TestUnits:

  def test_global_counts_whole_units_and_output_layer_whole(self):
    params = params3()
    _, masks = run_one_shot(fj.units(), 0.5, params)
    m1, m2, m3 = (np.asarray(m) for m in kernels(masks))
    assert m3.all()  # the classifier is excluded
    for m in (m1, m2):  # whole columns
      assert np.all(m.all(axis=0) | ~m.any(axis=0))
    alive = int(m1.any(axis=0).sum() + m2.any(axis=0).sum())
    assert alive == 20 - round(0.5 * 20)

  def test_matches_reference_ranking(self):
    params = params3()
    _, masks = run_one_shot(fj.units(reduce="l2", min_per_layer=1), 0.5,
                            params, distribution="uniform")
    for w, m in zip(kernels(params)[:2], kernels(masks)[:2]):
      norms = np.linalg.norm(np.asarray(w), axis=0)
      f = norms.shape[0]
      keep = f - round(0.5 * f)
      ref = np.zeros(f, bool)
      ref[np.argsort(-norms, kind="stable")[:keep]] = True
      np.testing.assert_array_equal(np.asarray(m).any(axis=0), ref)

  def test_min_per_layer_guard(self):
    # Layer fc1 has units 100x larger: a global budget of 2 units would take
    # them all; the guard keeps 3 of fc2.
    params = params3()
    params["fc1"]["kernel"] = params["fc1"]["kernel"] * 100.0
    _, masks = run_one_shot(fj.units(min_per_layer=3), 0.9, params)
    assert int(np.asarray(kernels(masks)[1]).any(axis=0).sum()) == 3

  def test_erk_rejected_and_bad_reduce(self):
    with pytest.raises(ValueError, match="reduce"):
      fj.units(reduce="median")
    tx = fj.prune(optax.sgd(0.1), score_fn=fj.scores.magnitude,
                  schedule=fj.schedules.one_shot(0.5), distribution="erk",
                  structure=fj.units())
    with pytest.raises(ValueError, match="'erk' is not defined for unit"):
      tx.init(params3())


@pytest.mark.parametrize("structure", [
    fj.unstructured(), fj.n_m(2, 4), fj.units(exclude=None)],
    ids=["unstructured", "2:4", "units"])
def test_drop_and_grow_conserves_counts(structure):
  params = params3()
  lay = core.layout(structure, jax.tree.map(lambda x: x, {
      k: {"kernel": v["kernel"]} for k, v in params.items()}))
  groups, table = structure.budget("uniform", lay, (0.5,), 0.5)
  masks = structure.random(lay, jax.random.PRNGKey(1), groups, table[0])
  mags = [jnp.abs(w) for w in kernels(params)]
  grow = [jax.random.normal(jax.random.PRNGKey(i), w.shape)
          for i, w in enumerate(kernels(params))]
  new, grown = structure.drop_and_grow(lay, masks, mags, grow, groups,
                                       table[0], jnp.float32(0.5))
  for m0, m1, g in zip(masks, new, grown):
    assert int(m0.sum()) == int(m1.sum())
    assert not bool(jnp.any(g & ~m1))
    assert int(g.sum()) > 0
  if structure.name == "2:4":
    assert all(np.all(np.asarray(st.nm_group_counts(m, 4)) == 2) for m in new)
  if structure.name == "units":
    for m in new:
      m = np.asarray(m)
      assert np.all(m.all(axis=0) | ~m.any(axis=0))


def test_random_masks_exact_counts():
  params = params3()
  dense = core.layout(fj.unstructured(), params)
  del dense
  masks = {k: {"kernel": jnp.ones(v["kernel"].shape, bool), "bias": None}
           for k, v in params.items()}
  out = core.random_masks(0.75, "uniform", fj.unstructured())(
      params, masks, jax.random.PRNGKey(0))
  for k, v in out.items():
    n = v["kernel"].size
    assert int(v["kernel"].sum()) == n - round(0.75 * n)


@pytest.mark.parametrize("seed", range(6))
def test_random_unit_masks_keep_min_per_layer(seed):
  """A global random start of whole units: every layer keeps at least
  min_per_layer units (drawn among its own), the global count is exact."""
  masks = {"big": {"kernel": jnp.ones((3, 100), bool)},
           "tiny": {"kernel": jnp.ones((3, 4), bool)}}
  st = fj.units(min_per_layer=2, exclude=None)
  out = core.random_masks(0.95, "global", st)(None, masks,
                                              jax.random.PRNGKey(seed))
  units = {k: np.asarray(v["kernel"]).all(axis=0) for k, v in out.items()}
  for k, v in out.items():  # whole units only
    m = np.asarray(v["kernel"])
    assert np.all(m.all(axis=0) | ~m.any(axis=0)), k
  assert units["big"].sum() >= 2 and units["tiny"].sum() >= 2
  assert units["big"].sum() + units["tiny"].sum() == 104 - round(0.95 * 104)


def test_structure_argument_checked():
  with pytest.raises(ValueError, match="structure: expected"):
    fj.prune(optax.sgd(0.1), score_fn=fj.scores.magnitude,
             schedule=fj.schedules.one_shot(0.5), structure="2:4")
