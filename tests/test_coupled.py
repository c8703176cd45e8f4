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


# -- post-training: fj.post_training.prune(..., structure=fj.coupled) --------


def wide_mlp_vars(key=KEY):
  k = jax.random.split(key, 6)
  shapes = {"w1": (4, 12), "b1": (12,), "w2": (12, 10), "b2": (10,),
            "w3": (10, 3), "b3": (3,)}
  return {"params": {n: jax.random.normal(kk, s) for kk, (n, s)
                     in zip(k, shapes.items())}}


def wide_mlp(v, x):
  return mlp(v["params"], x)


def reference_units(p, x, method, allocation, sparsity):
  """NumPy: the kept units of both hidden groups by the L2 of their scores
  over the layer's column and the next layer's row (stable ties)."""
  w1, w2, w3 = (np.asarray(p[k], np.float64) for k in ("w1", "w2", "w3"))
  if method == "wanda":  # |W_ij| ‖X_i‖ on the dense model's activations
    xn = np.asarray(x, np.float64)
    h1 = np.maximum(xn @ w1 + np.asarray(p["b1"]), 0)
    h2 = np.tanh(h1 @ w2 + np.asarray(p["b2"]))
    norm = lambda a: np.sqrt((a ** 2).sum(0))[:, None]  # pylint: disable=unnecessary-lambda-assignment
    w1, w2, w3 = np.abs(w1) * norm(xn), np.abs(w2) * norm(h1), np.abs(w3) * norm(h2)
  s1 = np.sqrt((w1 ** 2).sum(0) + (w2 ** 2).sum(1))
  s2 = np.sqrt((w2 ** 2).sum(0) + (w3 ** 2).sum(1))
  if allocation == "uniform":
    keep = [np.sort(np.argsort(-s, kind="stable")[:len(s) - round(sparsity * len(s))])
            for s in (s1, s2)]
  else:
    both = np.concatenate([s1, s2])
    top = np.argsort(-both, kind="stable")[:len(both) - round(sparsity * len(both))]
    keep = [np.sort(top[top < 12]), np.sort(top[top >= 12] - 12)]
  return keep


@pytest.mark.parametrize("method,allocation,sparsity",
                         [("magnitude", "uniform", 0.5),
                          ("magnitude", "global", 0.75),
                          ("wanda", "uniform", 0.7)])
def test_post_training_coupled_matches_numpy_and_compacts(method, allocation,
                                                           sparsity):
  v = wide_mlp_vars()
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 4))
  groups = fj.dependency_groups(wide_mlp, v, x)
  r = fj.post_training.prune(wide_mlp, v, x, sparsity=sparsity, method=method,
                             allocation=allocation,
                             structure=fj.coupled(groups, reduce="l2"))
  keep1, keep2 = reference_units(v["params"], x, method, allocation, sparsity)
  if allocation == "uniform":  # exact unit counts n - round(s n)
    assert (len(keep1), len(keep2)) == (12 - round(12 * sparsity),
                                        10 - round(10 * sparsity))
  else:
    assert len(keep1) + len(keep2) == 22 - round(22 * sparsity)
  u1, u2 = np.zeros(12, bool), np.zeros(10, bool)
  u1[keep1], u2[keep2] = True, True
  m = r.masks
  np.testing.assert_array_equal(m["w1"], np.broadcast_to(u1, (4, 12)))
  np.testing.assert_array_equal(m["w2"], u1[:, None] & u2[None, :])
  np.testing.assert_array_equal(m["w3"], np.broadcast_to(u2[:, None], (10, 3)))
  assert m["b1"] is None and m["b3"] is None
  p = r.variables["params"]
  for k in ("w1", "w2", "w3"):  # pruned weights exactly 0, the rest as given
    np.testing.assert_array_equal(
        p[k], np.where(m[k], v["params"][k], 0.0))
  res = fj.compact(wide_mlp, r.variables, x, masks=r.masks)
  kept = {g.size: k for g, k in zip(res.groups, res.kept) if g.removable}
  np.testing.assert_array_equal(kept[12], keep1)
  np.testing.assert_array_equal(kept[10], keep2)
  assert res.shapes["params/w1"] == (4, len(keep1))
  assert res.shapes["params/w2"] == (len(keep1), len(keep2))
  assert res.shapes["params/w3"] == (len(keep2), 3)
  np.testing.assert_allclose(wide_mlp(res.variables, x),
                             wide_mlp(r.variables, x), rtol=1e-5, atol=1e-5)


def test_post_training_coupled_lenet5_rebuilds_at_the_new_widths():
  model = models.LeNet5(width=0.5)
  x = jax.random.normal(KEY, (8, 28, 28, 1))
  v = jax.jit(model.init)(KEY, x)
  fn = lambda w, xb: model.apply(w, xb, train=False)  # pylint: disable=unnecessary-lambda-assignment
  groups = fj.dependency_groups(fn, v, x)
  r = fj.post_training.prune(fn, v, x, sparsity=0.75, method="wanda",
                             structure=fj.coupled(groups, reduce="l2",
                                                  min_per_layer=2))
  res = fj.compact(fn, r.variables, x, masks=r.masks)
  # 3, 8, 60, 42 units -> max(n - round(0.75 n), 2)
  assert res.widths == {"conv1": 2, "conv2": 2, "fc1": 15, "fc2": 10,
                        "fc3": 10}
  small = models.LeNet5(width=0.5, layer_widths=res.widths)
  np.testing.assert_allclose(small.apply(res.variables, x), fn(r.variables, x),
                             rtol=1e-5, atol=1e-5)


def test_post_training_coupled_undefined_pairs_name_the_argument():
  v = wide_mlp_vars()
  x = jnp.ones((4, 4))
  st = fj.coupled(fj.dependency_groups(wide_mlp, v, x))
  with pytest.raises(ValueError, match="^structure: .*SparseGPT"):
    fj.post_training.prune(wide_mlp, v, x, sparsity=0.5, method="sparsegpt",
                           structure=st)
  with pytest.raises(ValueError, match="^structure: .*'unipts'"):
    fj.post_training.prune(wide_mlp, v, x, sparsity=0.5, method="unipts",
                           structure=st)
  with pytest.raises(ValueError, match="^allocation: .*'owl'"):
    fj.post_training.prune(wide_mlp, v, x, sparsity=0.5, method="wanda",
                           allocation="owl", structure=st)
  with pytest.raises(ValueError, match="^allocation: 'global'"):
    fj.post_training.prune(wide_mlp, v, x, sparsity=0.5, method="wanda",
                           allocation="global", structure=st)
