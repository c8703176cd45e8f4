"""The coupled structure: whole dependency groups pruned as units."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import dependency
from flipout_jax import models
from flipout_jax import trees

from test_dependency import mlp, mlp_vars  # pylint: disable=wrong-import-order

KEY = jax.random.PRNGKey(0)


def unit_state(groups, masks_by_path, prunable):
  """Per removable group with prunable members: bool [n] alive units,
  asserting every unit is whole (all its entries alive or all dead)."""
  out = []
  for g in groups:
    ms = [m for m in g.members if m.path in prunable]
    if not g.removable or not ms:
      continue
    units = []
    for m in ms:
      x = np.asarray(masks_by_path[m.path])
      v = np.moveaxis(x.reshape(dependency._unit_view(x.shape, m, g.size)),  # pylint: disable=protected-access
                      2, 0).reshape(g.size, -1)
      units.append(v)
    rows = np.concatenate(units, axis=1)
    alive = rows.any(axis=1)
    # A weight of a dead unit is dead in every member; a live unit's
    # entries may be dead only through another group (rows and columns).
    assert not rows[~alive].any()
    out.append(alive)
  return out


def test_magnitude_training_prunes_whole_groups_and_compacts():
  v = mlp_vars()
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
  groups = fj.dependency_groups(mlp, v, x)
  tx = fj.global_magnitude(optax.sgd(0.01), sparsity=0.5, every=2,
                           structure=fj.coupled(groups, reduce="l2"),
                           distribution="uniform")
  state = tx.init(v)
  loss = lambda p: jnp.mean(mlp(p, x) ** 2)  # pylint: disable=unnecessary-lambda-assignment
  for _ in range(6):
    u, state = tx.update(jax.grad(loss)(v), state, v)
    v = optax.apply_updates(v, u)
  masks = fj.get_masks(state)
  flat = {p: m for p, m in trees.leaves_with_paths(masks)}
  alive = unit_state(groups, flat, {"w1", "w2", "w3"})
  # uniform 50 %: 6 - round(3) = 3 and 5 - round(2.5) = 3 units kept.
  assert [int(a.sum()) for a in alive] == [3, 3]
  # The kept units are the largest by L2 norm over all their weights.
  masked = trees.apply_masks(v, masks)
  res = fj.compact(mlp, v, x, masks=masks)
  assert res.shapes == {"b1": (3,), "b2": (3,), "b3": (3,), "w1": (4, 3),
                        "w2": (3, 3), "w3": (3, 3)}
  np.testing.assert_allclose(mlp(res.variables, x), mlp(masked, x),
                             rtol=1e-6, atol=1e-6)


def test_structure_ops_on_lenet5():
  model = models.LeNet5(width=0.5)
  x = jnp.ones((1, 28, 28, 1))
  v = model.init(KEY, x)
  groups = fj.dependency_groups(model.apply, v, x)
  params = v["params"]
  flat = trees.leaves_with_paths(params)
  prunable = [(p, a) for p, a in flat if a.ndim >= 2]
  paths = tuple(p for p, _ in prunable)
  st = fj.coupled(groups, min_per_layer=2)
  lay = st.layout(paths, [a.shape for _, a in prunable])
  assert lay.active == (True,) * 5  # conv1..fc3: every kernel is a member
  bgroups, table = st.budget("uniform", lay, (0.5, 0.9), 0.9)
  # Units 3, 8, 60, 42 (conv1, conv2, fc1, fc2 filters/neurons).
  np.testing.assert_array_equal(table, [[2, 4, 30, 21], [2, 2, 6, 4]])
  ones = [jnp.ones(a.shape, bool) for _, a in prunable]
  scores = [jnp.abs(a) for _, a in prunable]
  masks = st.shrink(lay, ones, scores, bgroups, table[1])
  by_path = dict(zip(paths, masks))
  names = {p.replace("params/", "") for p in paths}
  regroup = [g._replace(members=tuple(m._replace(path=m.path.replace(
      "params/", "")) for m in g.members)) for g in groups]
  alive = unit_state(regroup, by_path, names)
  assert [int(a.sum()) for a in alive] == [2, 2, 6, 4]
  # Unit scores are sums of |w| over every member: the kept fc2 neurons
  # are the 4 largest by |fc2 column| + |fc3 row| (+ fc2 has no other).
  fc2, fc3 = np.abs(params["fc2"]["kernel"]), np.abs(params["fc3"]["kernel"])
  score = fc2.sum(0) + fc3.sum(1)
  want = np.zeros(42, bool)
  want[np.argsort(-score, kind="stable")[:4]] = True
  np.testing.assert_array_equal(alive[3], want)
  rand = st.random(lay, KEY, bgroups, table[0])
  assert [int(a.sum()) for a in unit_state(
      regroup, dict(zip(paths, rand)), names)] == [2, 4, 30, 21]
  with pytest.raises(ValueError, match="soft-threshold"):
    st.threshold(lay, scores, 0.5)
  with pytest.raises(ValueError, match="erk"):
    st.budget("erk", lay, (0.5,), 0.5)


def test_coupled_arguments_are_checked():
  with pytest.raises(ValueError, match="reduce"):
    fj.coupled((), reduce="median")
  with pytest.raises(ValueError, match="min_per_layer"):
    fj.coupled((), min_per_layer=0)
  with pytest.raises(ValueError, match="groups"):
    fj.coupled([1, 2])


def test_drop_and_grow_moves_whole_units_at_a_constant_count():
  v = mlp_vars()
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
  groups = fj.dependency_groups(mlp, v, x)
  tx = fj.set_(optax.sgd(0.01), sparsity=0.5, every=1, end_step=10,
               structure=fj.coupled(groups), distribution="global")
  state = tx.init(v)
  loss = lambda p: jnp.mean(mlp(p, x) ** 2)  # pylint: disable=unnecessary-lambda-assignment
  seen = []
  for _ in range(4):
    u, state = tx.update(jax.grad(loss)(v), state, v)
    v = optax.apply_updates(v, u)
    flat = dict(trees.leaves_with_paths(fj.get_masks(state)))
    alive = unit_state(groups, flat, {"w1", "w2", "w3"})
    # global 50 % of 6 + 5 units: 11 - round(5.5) = 5 kept, every step.
    assert sum(int(a.sum()) for a in alive) == 5
    seen.append(np.concatenate(alive))
  assert any((a != seen[0]).any() for a in seen[1:])  # units moved
