"""fj.post_training: input capture from the jaxpr, Wanda and SparseGPT against
independent NumPy implementations, OWL's allocation, sequential pruning."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipout_jax as fj
from flipout_jax import post_training as pt
from flipout_jax.post_training import capture


def rng_data(seed, n, d, scales=True):
  r = np.random.default_rng(seed)
  x = r.normal(size=(n, d)).astype(np.float32)
  if scales:  # heterogeneous feature scales: what Wanda / SparseGPT exploit
    x *= np.exp(r.normal(size=d)).astype(np.float32)
  return x


def one_layer(w):
  return (lambda v, x: x @ v["params"]["w"]), {"params": {"w": jnp.asarray(w)}}


# --- Capture ---------------------------------------------------------------------


def test_conv_and_dense_inputs_match_their_outputs():
  """A conv's captured Gram G satisfies W2ᵀ G W2 = YᵀY for its output Y
  (so the receptive fields line up with the kernel's flattening)."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.Conv(5, (3, 3), strides=2, padding="SAME", use_bias=False)(x)
      return nn.Dense(3, use_bias=False)(jnp.tanh(y).reshape(x.shape[0], -1))

  x = jax.random.normal(jax.random.PRNGKey(0), (4, 9, 9, 6))
  net = Net()
  v = net.init(jax.random.PRNGKey(1), x)
  params = v["params"]
  paths = [p for p, _ in fj.trees.leaves_with_paths(params)]
  fn = lambda p: net.apply({"params": p}, x)
  assert capture.usage_order(fn, params, paths) == ["Conv_0/kernel", "Dense_0/kernel"]
  view, sq, g = capture.layer_stats(fn, params, "Conv_0/kernel", paths, gram=True)
  w = params["Conv_0"]["kernel"]
  assert view.num_in == 3 * 3 * 6 and view.num_out == 5 and view.last_in == 6
  w2 = view.to_matrix(w)
  np.testing.assert_array_equal(view.from_matrix(w2, w.shape), w)
  y = nn.Conv(5, (3, 3), strides=2, padding="SAME", use_bias=False).apply(
      {"params": params["Conv_0"]}, x).reshape(-1, 5)
  np.testing.assert_allclose(w2.T @ g @ w2, y.T @ y, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(sq, jnp.diag(g), rtol=1e-5)
  _, sq, g = capture.layer_stats(fn, params, "Dense_0/kernel", paths, gram=True)
  h = jnp.tanh(y.reshape(4, 5, 5, 5)).reshape(4, -1)
  np.testing.assert_allclose(g, h.T @ h, rtol=1e-4, atol=1e-4)


def test_kernel_as_left_operand_and_through_jit():
  """Equinox's layout (``W @ x``, W [out, in]) inside a jitted function."""
  x = rng_data(0, 10, 7)
  w = np.random.default_rng(1).normal(size=(4, 7)).astype(np.float32)
  fn = jax.jit(lambda p: jnp.einsum("oi,bi->bo", p["w"], x))
  view, sq, _ = capture.layer_stats(fn, {"w": w}, "w", ["w"], gram=False)
  assert view.perm == (1, 0) and (view.num_in, view.num_out) == (7, 4)
  assert capture.kernel_view(fn, {"w": w}, "w", ["w"]) == view
  np.testing.assert_allclose(sq, (x ** 2).sum(0), rtol=1e-5)


def test_a_kernel_not_used_as_a_weight_is_named():
  fn = lambda p: jnp.ones((2, 3)) @ (2.0 * p["w"])
  with pytest.raises(ValueError, match="w: not used as the weight"):
    capture.layer_stats(fn, {"w": jnp.ones((3, 2))}, "w", ["w"], gram=False)
  with pytest.raises(ValueError, match="target: 'v' is not a leaf"):
    capture.kernel_view(fn, {"w": jnp.ones((3, 2))}, "v", ["w"])


# --- Wanda ------------------------------------------------------------------------


def wanda_reference(w, x, k):
  """NumPy: |W|·‖X_i‖, per output the lowest counts pruned, later row first
  among ties; output j prunes ⌊k/out⌋ + [j < k mod out]."""
  score = np.abs(w) * np.sqrt((x.astype(np.float64) ** 2).sum(0))[:, None]
  num_in, num_out = w.shape
  keep = np.ones_like(w, bool)
  for j in range(num_out):
    c = k // num_out + (j < k % num_out)
    order = sorted(range(num_in), key=lambda i: (score[i, j], -i))
    keep[order[:c], j] = False
  return keep


def test_wanda_equals_numpy_reference_with_exact_per_output_counts():
  x = rng_data(0, 64, 24)
  w = np.random.default_rng(1).normal(size=(24, 5)).astype(np.float32)
  apply_fn, v = one_layer(w)
  r = pt.prune(apply_fn, v, x, sparsity=0.55, method="wanda")
  k = round(0.55 * w.size)  # 66: outputs 0 prunes 14, the others 13
  keep = np.asarray(r.masks["w"])
  np.testing.assert_array_equal(keep, wanda_reference(w, x, k))
  assert list((~keep).sum(0)) == [14, 13, 13, 13, 13]
  out = np.asarray(r.variables["params"]["w"])
  np.testing.assert_array_equal(out, np.where(keep, w, 0))  # no update
  assert r.report["layers"]["w"]["pruned"] == k


def test_wanda_two_four():
  x = rng_data(2, 32, 16)
  w = np.random.default_rng(3).normal(size=(16, 6)).astype(np.float32)
  apply_fn, v = one_layer(w)
  r = pt.prune(apply_fn, v, x, sparsity=None, method="wanda",
               structure=fj.n_m(2, 4))
  keep = np.asarray(r.masks["w"])
  score = np.abs(w) * np.sqrt((x ** 2).sum(0))[:, None]
  for g in range(4):
    rows = slice(4 * g, 4 * g + 4)
    assert (keep[rows].sum(0) == 2).all()
    top2 = np.argsort(-score[rows], axis=0, kind="stable")[:2]
    for j in range(6):
      assert set(np.flatnonzero(keep[rows, j])) == set(top2[:, j])


# --- SparseGPT --------------------------------------------------------------------


def sparsegpt_reference(w, x, counts=None, n_m=None, block=128, damp=0.01):
  """NumPy float64, following SPEC §7 (the reference's loop, [out, in])."""
  wt = w.astype(np.float64).T.copy()
  h = x.astype(np.float64).T @ x.astype(np.float64)
  num_out, num_in = wt.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  wt[:, dead] = 0
  h += damp * np.mean(np.diag(h)) * np.eye(num_in)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  pruned_all = np.zeros_like(wt, bool)
  for i1 in range(0, num_in, block):
    i2 = min(i1 + block, num_in)
    w1 = wt[:, i1:i2].copy()
    u1 = u[i1:i2, i1:i2]
    d = np.diag(u1)
    q1 = np.zeros_like(w1)
    e1 = np.zeros_like(w1)
    pruned = np.zeros_like(w1, bool)
    if n_m is None:
      tmp = w1 ** 2 / d[None, :] ** 2
      for j in range(num_out):
        c = int(round(counts[j] * i2 / num_in) - round(counts[j] * i1 / num_in))
        order = sorted(range(i2 - i1), key=lambda i: (tmp[j, i], -i))
        pruned[j, order[:c]] = True
    for i in range(i2 - i1):
      if n_m is not None and i % n_m[1] == 0:
        tmp = w1[:, i:i + n_m[1]] ** 2 / d[None, i:i + n_m[1]] ** 2
        for j in range(num_out):
          low = sorted(range(n_m[1]), key=lambda t: (-tmp[j, t], t))[n_m[0]:]
          pruned[j, [i + t for t in low]] = True
      q = np.where(pruned[:, i], 0.0, w1[:, i])
      e = (w1[:, i] - q) / d[i]
      w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
      q1[:, i], e1[:, i] = q, e
    wt[:, i1:i2] = q1
    wt[:, i2:] -= e1 @ u[i1:i2, i2:]
    pruned_all[:, i1:i2] = pruned
  return ~pruned_all.T, wt.T


def recon_error(x, w, w_hat):
  x = x.astype(np.float64)
  return np.linalg.norm(x @ w - x @ np.asarray(w_hat, np.float64))


@pytest.mark.parametrize("structure", [None, fj.n_m(2, 4)])
def test_sparsegpt_equals_numpy_reference_and_beats_wanda_and_magnitude(structure):
  x = rng_data(4, 200, 40)
  w = np.random.default_rng(5).normal(size=(40, 6)).astype(np.float32)
  apply_fn, v = one_layer(w)
  sparsity = 0.5
  r = pt.prune(apply_fn, v, x, sparsity=sparsity, method="sparsegpt",
               structure=structure, block_size=16)  # blocks 16, 16, 8
  counts = pt.solvers.output_counts(round(sparsity * w.size), 40, 6)
  keep_ref, w_ref = sparsegpt_reference(
      w, x, counts, None if structure is None else (2, 4), block=16)
  keep = np.asarray(r.masks["w"])
  np.testing.assert_array_equal(keep, keep_ref)
  out = np.asarray(r.variables["params"]["w"])
  np.testing.assert_allclose(out, w_ref, rtol=2e-3, atol=2e-4)
  assert (out[~keep] == 0).all() and (~keep).sum() == round(sparsity * w.size)
  if structure is not None:
    assert (keep.reshape(10, 4, 6).sum(1) == 2).all()
  # The same budget; the default block (128: one block of these 40 inputs,
  # so the adaptive selection sees each output's whole row, as Wanda does).
  errors = {m: recon_error(x, w, pt.prune(apply_fn, v, x, sparsity=sparsity,
                                          method=m, structure=structure)
                           .variables["params"]["w"])
            for m in ("magnitude", "wanda", "sparsegpt")}
  assert errors["sparsegpt"] < min(errors["magnitude"], errors["wanda"]), errors


# --- OWL and sequential pruning ---------------------------------------------------


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="a")(x))
    x = nn.relu(nn.Dense(24, name="b")(x))
    return nn.Dense(10, name="c")(x)


def mlp(seed=0):
  x = rng_data(seed, 96, 20)
  net = MLP()
  v = net.init(jax.random.PRNGKey(seed), x[:1])
  return net, v, x


def test_owl_layer_sparsities_in_range_and_global_count_exact():
  net, v, x = mlp()
  s, lam = 0.7, 0.08
  r = pt.prune(net.apply, v, x, sparsity=s, method="wanda", allocation="owl",
               owl_lambda=lam)
  layers = r.report["layers"]
  n = sum(l["size"] for l in layers.values())
  assert sum(l["pruned"] for l in layers.values()) == round(s * n)
  for p, l in layers.items():
    assert s - lam - 1 / l["size"] <= l["sparsity"] <= s + lam + 1 / l["size"], p
  assert len({round(l["sparsity"], 3) for l in layers.values()}) > 1
  # D_l of the first layer, independently: Wanda scores on the dense model.
  w = np.asarray(v["params"]["a"]["kernel"])
  score = np.abs(w) * np.sqrt((x.astype(np.float64) ** 2).sum(0))[:, None]
  np.testing.assert_allclose(r.report["outlier_ratios"]["a/kernel"],
                             np.mean(score > 5 * score.mean()), atol=1e-6)
  # Higher outlier ratio, lower sparsity.
  ratios = r.report["outlier_ratios"]
  order = sorted(layers, key=lambda p: ratios[p])
  assert layers[order[0]]["sparsity"] >= layers[order[-1]]["sparsity"]


def test_split_count_is_exact_and_near():
  # Wanted 25.5, 30.3, 27.0 of 83: the largest remainder (0.5) gets the 1.
  assert list(pt.split_count(83, [0.51, 0.303, 0.9], [50, 100, 30])) == [26, 30, 27]
  assert list(pt.split_count(82, [0.51, 0.303, 0.9], [50, 100, 30])) == [25, 30, 27]
  # OWL at a high S: S + λ > 1 is capped (one weight stays), the excess goes
  # to the layers with room, the total stays exact.
  k = pt.split_count(round(0.95 * 180), [1.03, 0.9, 0.93], [50, 100, 30])
  assert k.sum() == 171 and k[0] == 49 and (k <= [49, 99, 29]).all()


def test_layers_are_pruned_sequentially_through_the_pruned_ones():
  """Layer b's inputs come from the already pruned layer a."""
  net, v, x = mlp(1)
  r = pt.prune(net.apply, v, x, sparsity=0.6, method="wanda")
  assert r.report["order"] == ["a/kernel", "b/kernel", "c/kernel"]
  p = jax.tree.map(np.asarray, v["params"])
  wa, wb = p["a"]["kernel"], p["b"]["kernel"]
  keep_a = wanda_reference(wa, x, round(0.6 * wa.size))
  h = np.maximum(x @ np.where(keep_a, wa, 0) + p["a"]["bias"], 0)
  keep_b = wanda_reference(wb, h, round(0.6 * wb.size))
  np.testing.assert_array_equal(np.asarray(r.masks["a"]["kernel"]), keep_a)
  np.testing.assert_array_equal(np.asarray(r.masks["b"]["kernel"]), keep_b)
  assert r.masks["a"]["bias"] is None
  # Through the dense layer a instead, b's mask would differ here.
  h_dense = np.maximum(x @ wa + p["a"]["bias"], 0)
  assert (wanda_reference(wb, h_dense, round(0.6 * wb.size)) != keep_b).any()


def test_global_magnitude_and_lenet5_conv_layers():
  from flipout_jax import models  # pylint: disable=g-import-not-at-top
  m = models.get_model("lenet5", width=0.25)
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 28, 28, 1))
  v = m.init(jax.random.PRNGKey(1), x[:1], train=False)
  f = lambda v, x: m.apply(v, x, train=False)
  r = pt.prune(f, v, x, sparsity=0.8, method="magnitude", allocation="global")
  flat = dict(fj.trees.leaves_with_paths(v["params"]))
  ks = [p for p in flat if p.endswith("kernel")]
  allw = np.concatenate([np.abs(np.asarray(flat[p])).ravel() for p in ks])
  n = allw.size
  assert sum(l["pruned"] for l in r.report["layers"].values()) == round(0.8 * n)
  thr = np.sort(allw)[round(0.8 * n)]
  for p in ks:
    kept = np.asarray(r.masks[p.split("/")[0]]["kernel"])
    assert (np.abs(np.asarray(flat[p]))[kept] >= thr).all()
  r = pt.prune(f, v, x, sparsity=0.5, method="sparsegpt")
  assert r.report["order"] == ks and all(
      abs(l["sparsity"] - 0.5) <= 1 / l["size"] for l in r.report["layers"].values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="obs"), "method"),
    (dict(method="wanda", allocation="global"), "allocation"),
    (dict(allocation="owl2"), "allocation"),
    (dict(allocation="search"), "allocation"),
    (dict(method="unipts", allocation="owl"), "allocation"),
    (dict(structure=fj.n_m(2, 4), allocation="owl"), "allocation"),
    (dict(structure=fj.n_m(2, 4), sparsity=0.6), "sparsity"),
    (dict(structure=fj.units()), "structure"),
    (dict(structure="2:4"), "structure"),
    (dict(method="unipts", structure=fj.units()), "structure"),
    (dict(method="unipts", structure=fj.n_m(2, 4), allocation="search"),
     "allocation"),
    (dict(method="unipts", structure=fj.n_m(2, 4), sparsity=0.6), "sparsity"),
    (dict(method="unipts", unipts_kw={"structure": fj.n_m(2, 4)}),
     "unipts_kw"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity="0.5"), "sparsity"),
    (dict(sparsity=None), "sparsity"),
    (dict(block_size=0), "block_size"),
    (dict(method="sparsegpt", structure=fj.n_m(2, 4), sparsity=None,
          block_size=6), "block_size"),
    (dict(dampening=-0.1), "dampening"),
    (dict(owl_threshold=0.0), "owl_threshold"),
    (dict(owl_lambda=1.0), "owl_lambda"),
    (dict(owl_lambda=-0.1), "owl_lambda"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2.0), "batch_size"),
    (dict(batch_size=True), "batch_size"),
    (dict(method="unipts", batch_size=8), "batch_size"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(filter_fn=3), "filter_fn"),
    (dict(unipts_kw={"epochs": 1}), "unipts_kw"),
    (dict(method="unipts", unipts_kw={"seed": 1}), "unipts_kw"),
    (dict(method="unipts", unipts_kw=[("epochs", 1)]), "unipts_kw"),
    (dict(apply_fn=3), "apply_fn"),
    (dict(variables={"batch_stats": {}}), "variables"),
    (dict(calibration_x=np.zeros((0, 20), np.float32)), "calibration_x"),
    (dict(calibration_x=(np.zeros((4, 20)), np.zeros((5, 20)))),
     "calibration_x"),
])
def test_bad_arguments_are_named(kwargs, match):
  """Each error starts with the argument's name (the shared checks)."""
  net, v, x = mlp()
  kw = {"sparsity": 0.5, "apply_fn": net.apply, "variables": v,
        "calibration_x": x, **kwargs}
  args = [kw.pop(k) for k in ("apply_fn", "variables", "calibration_x")]
  with pytest.raises(ValueError, match=f"^{match}:"):
    pt.prune(*args, **kw)


def test_unknown_names_list_the_valid_ones():
  net, v, x = mlp()
  with pytest.raises(ValueError, match="'magnitude', 'wanda', 'sparsegpt', "
                     "'unipts'"):
    pt.prune(net.apply, v, x, sparsity=0.5, method="obs")
  with pytest.raises(ValueError, match="'uniform', 'global', 'owl', 'search'"):
    pt.prune(net.apply, v, x, sparsity=0.5, allocation="owl2")


@pytest.mark.parametrize("call, match", [
    (lambda: pt.split_count(-1, [0.5], [10]), "total"),
    (lambda: pt.split_count(10, [0.5], [10]), "total"),  # > n_l − 1
    (lambda: pt.split_count(2.0, [0.5], [10]), "total"),
    (lambda: pt.split_count(3, [0.5, 0.5], [10]), "sparsities"),
    (lambda: pt.split_count(3, [float("nan")], [10]), "sparsities"),
    (lambda: pt.split_count(3, [0.5], [10.5]), "sizes"),
    (lambda: pt.split_count(3, [0.5], [-1]), "sizes"),
    (lambda: pt.split_count(3, [], []), "sizes"),
    (lambda: pt.owl_sparsities([0.1, 1.5], [10, 10], 0.5), "outlier_ratios"),
    (lambda: pt.owl_sparsities([0.1], [10, 10], 0.5), "outlier_ratios"),
    (lambda: pt.owl_sparsities([0.1, 0.2], [10, 0], 0.5), "sizes"),
    (lambda: pt.owl_sparsities([0.1, 0.2], [10, 10], 1.0), "sparsity"),
    (lambda: pt.owl_sparsities([0.1, 0.2], [10, 10], 0.5, lam=1.0), "lam"),
    (lambda: pt.check_arguments("wanda", "uniform", None, -0.1), "sparsity"),
])
def test_helpers_name_their_bad_argument(call, match):
  with pytest.raises(ValueError, match=f"^{match}:"):
    call()


# --- Calibration in batches -------------------------------------------------------


@pytest.mark.parametrize("method, allocation", [
    ("wanda", "uniform"), ("sparsegpt", "uniform"), ("wanda", "owl")])
def test_batched_calibration_equals_one_shot(method, allocation):
  """96 examples in batches of 25 (25, 25, 25, 21): the statistics are sums
  over examples, so the result is the one-shot one up to float32 order."""
  net, v, x = mlp(2)
  kw = dict(sparsity=0.6, method=method, allocation=allocation)
  one = pt.prune(net.apply, v, x, **kw)
  chunked = pt.prune(net.apply, v, x, batch_size=25, **kw)
  big = pt.prune(net.apply, v, x, batch_size=1000, **kw)  # one batch
  for r in (chunked, big):
    for a, b in zip(jax.tree.leaves(one.masks), jax.tree.leaves(r.masks)):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(one.variables),
                    jax.tree.leaves(r.variables)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert r.sparsities == one.sparsities
  if allocation == "owl":
    assert chunked.report["outlier_ratios"] == pytest.approx(
        one.report["outlier_ratios"], abs=1e-6)


def test_batched_calibration_of_a_pytree_input():
  """Two inputs (a tuple), both cut along the leading axis."""
  x = rng_data(3, 30, 8)
  w = np.random.default_rng(4).normal(size=(8, 4)).astype(np.float32)
  f = lambda v, xs: xs[0] @ v["params"]["w"] + xs[1] @ v["params"]["w"]
  v = {"params": {"w": jnp.asarray(w)}}
  one = pt.prune(f, v, (x, 2 * x), sparsity=0.5, method="sparsegpt")
  chunked = pt.prune(f, v, (x, 2 * x), sparsity=0.5, method="sparsegpt",
                     batch_size=7)
  np.testing.assert_array_equal(one.masks["w"], chunked.masks["w"])
  np.testing.assert_allclose(one.variables["params"]["w"],
                             chunked.variables["params"]["w"], rtol=1e-5,
                             atol=1e-6)


# --- UniPTS behind the same entry point -------------------------------------------


TINY_UNIPTS = dict(epochs=1, population_size=4, generations=1, num_parents=2,
                   crossover_children=2, mutation_children=2, batch_size=32)


@pytest.mark.parametrize("allocation, search", [("uniform", False),
                                                ("search", True)])
def test_unipts_method_equals_unipts_run(allocation, search):
  net, v, x = mlp(3)
  r = pt.prune(net.apply, v, x, sparsity=0.7, method="unipts",
               allocation=allocation, seed=5, unipts_kw=TINY_UNIPTS)
  ref = fj.unipts.run(net.apply, v, x, sparsity=0.7, seed=5, search=search,
                      **TINY_UNIPTS)
  assert isinstance(r, pt.PostTrainingResult)
  assert r.sparsities == ref.sparsities
  for a, b in zip(jax.tree.leaves(ref.masks), jax.tree.leaves(r.masks)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(ref.variables), jax.tree.leaves(r.variables)):
    np.testing.assert_array_equal(a, b)
  assert r.report["method"] == "unipts" and r.report["allocation"] == allocation
  assert r.report["layers"] == ref.report["layers"]


class _TokenMLP(nn.Module):
  """Token ids -> embedding (no product uses it: stays dense) -> 2 Dense."""
  @nn.compact
  def __call__(self, t):
    x = nn.Embed(16, 8, name="embed")(t)
    return nn.Dense(16, name="c")(nn.relu(nn.Dense(12, name="a")(x)))


def _group_counts(mask, m):
  mask = np.asarray(mask)
  return mask.reshape(mask.shape[0] // m, m, -1).sum(1)


def test_unipts_n_m_masks_and_weights_hold_the_pattern_exactly():
  """UniPTS 2:4: exactly 2 of every 4 inputs kept per output in each kernel,
  after sparse training (weights zero exactly off the mask) and, without it,
  the 2 largest |w| of each group (an independent NumPy top-2)."""
  t = np.random.default_rng(0).integers(0, 16, (64, 6)).astype(np.int32)
  net = _TokenMLP()
  v = net.init(jax.random.PRNGKey(0), t[:1])
  kw = dict(epochs=2, batch_size=16, learning_rate=0.05)
  r = pt.prune(net.apply, v, t, sparsity=None, method="unipts",
               structure=fj.n_m(2, 4), unipts_kw=kw)
  assert r.report["structure"] == "2:4" and r.report["dense"] == [
      "embed/embedding"]
  assert sorted(r.sparsities) == ["a/kernel", "c/kernel"]
  assert all(s == 0.5 for s in r.sparsities.values())
  assert r.masks["embed"]["embedding"] is None
  # Trained like every unmasked leaf, never pruned (as unstructured).
  assert (np.asarray(r.variables["params"]["embed"]["embedding"]) != 0).all()
  for name in ("a", "c"):
    mask = np.asarray(r.masks[name]["kernel"])
    w = np.asarray(r.variables["params"][name]["kernel"])
    assert (_group_counts(mask, 4) == 2).all()
    assert (w[~mask] == 0).all() and (w[mask] != 0).all()
    assert not np.array_equal(w[mask], np.asarray(
        v["params"][name]["kernel"])[mask])  # it did train
  # Unstructured with the same budget is not N:M (the structure did it).
  u = pt.prune(net.apply, v, t, sparsity=0.5, method="unipts", unipts_kw=kw)
  assert any((_group_counts(u.masks[p]["kernel"], 4) != 2).any()
             for p in ("a", "c"))
  assert u.report["dense"] == r.report["dense"] and u.masks["embed"][
      "embedding"] is None
  # epochs=0: the masks on the dense weights, the 2 largest |w| per group.
  net, v, x = mlp(1)
  r0 = fj.unipts.run(net.apply, v, x, sparsity=0.5, search=False,
                     structure=fj.n_m(2, 4), epochs=0)
  for name in ("a", "b", "c"):
    w = np.abs(np.asarray(v["params"][name]["kernel"]))
    g = w.reshape(w.shape[0] // 4, 4, -1)
    rank = (g[:, None, :, :] > g[:, :, None, :]).sum(2)  # larger ones
    np.testing.assert_array_equal(np.asarray(r0.masks[name]["kernel"]),
                                  (rank < 2).reshape(w.shape))
  assert r0.report["achieved_sparsity"] == 0.5


def test_unipts_n_m_incompatible_layer_and_bad_arguments():
  net, v, x = mlp()  # a: 20 inputs, b: 32, c: 24; m=8 fits b and c only
  with pytest.raises(ValueError, match="^structure: layer 'a/kernel'"):
    pt.prune(net.apply, v, x, sparsity=None, method="unipts",
             structure=fj.n_m(2, 8), unipts_kw={"epochs": 0})
  r = pt.prune(net.apply, v, x, sparsity=None, method="unipts",
               structure=fj.n_m(2, 8, skip_incompatible=True),
               unipts_kw={"epochs": 1, "batch_size": 32})
  assert r.sparsities == {"a/kernel": 0.0, "b/kernel": 0.75, "c/kernel": 0.75}
  assert np.asarray(r.masks["a"]["kernel"]).all()
  for name in ("b", "c"):
    assert (_group_counts(r.masks[name]["kernel"], 8) == 2).all()
  for kw, match in [(dict(search=True), "search"),
                    (dict(layer_sparsities={"a/kernel": 0.5}),
                     "layer_sparsities"),
                    (dict(sparsity=0.7), "sparsity"),
                    (dict(structure=fj.n_m(2, 4, axis=-1)), "structure"),
                    (dict(structure=fj.units()), "structure")]:
    kw = {"sparsity": 0.5, "search": False, "structure": fj.n_m(2, 4), **kw}
    with pytest.raises(ValueError, match=f"^{match}:"):
      fj.unipts.run(net.apply, v, x, **kw)


def test_n_m_incompatible_layer_is_named_or_skipped():
  net, v, x = mlp()  # a: 20 inputs, b: 32, c: 24; m=8 fits b and c only
  with pytest.raises(ValueError, match="a/kernel"):
    pt.prune(net.apply, v, x, sparsity=None, structure=fj.n_m(2, 8))
  r = pt.prune(net.apply, v, x, sparsity=None,
               structure=fj.n_m(2, 8, skip_incompatible=True))
  assert r.report["skipped"] == ["a/kernel"] and sorted(r.sparsities) == [
      "b/kernel", "c/kernel"]


# --- Sharded calibration ---------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  """tests/post_training_sharding_worker.py on 4 CPU devices (a subprocess:
  a process's device count is fixed when its backend starts), with
  test_sharding's environment."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from test_sharding import REPO, _env, _load  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp("pt_sharding") / "worker.npz"
  proc = subprocess.run(
      [sys.executable, str(REPO / "tests" / "post_training_sharding_worker.py"),
       str(out)], cwd=REPO, env=_env(4), capture_output=True, text=True,
      timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return _load(out)


def test_sharded_calibration_equals_one_device(sharded):
  """Calibration batch over "data", kernels over their outputs ("model"):
  the same masks, the same weights up to the float sums' order, and the
  pruned kernels stay sharded over their outputs."""
  report, arrays = sharded
  assert report["device_count"] == 4
  singles = [k for k in arrays if "/single/" in k and
             not k.startswith("seq/")]
  assert len(singles) > 40
  for key in singles:
    for where in ("sharded", "explicit"):
      other = key.replace("/single/", f"/{where}/")
      a, b = arrays[key], arrays[other]
      if a.dtype == bool or key.startswith(("magnitude/", "wanda")):
        np.testing.assert_array_equal(b, a, err_msg=other)  # no float sum
      else:
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=other)
  runs = {k.split("/")[0] for k in singles}
  assert runs == {"magnitude", "magnitude_2_4", "wanda", "wanda_2_4",
                  "wanda_owl", "wanda_owl_batched", "sparsegpt",
                  "sparsegpt_batched", "sparsegpt_2_4"}
  specs = {k: v for k, v in report["result_specs"].items()
           if not k.startswith("seq/")}
  assert len(specs) == 2 * 3 * len(runs)  # auto, explicit
  assert set(specs.values()) == {"P(None, 'model')"}
  for key in arrays:
    if "_2_4/" in key and "/masks/" in key:  # 2:4 groups on every mesh
      groups = arrays[key].reshape(-1, 4, arrays[key].shape[-1])
      assert (groups.sum(axis=1) == 2).all(), key


def test_explicit_axes_sequence_model_with_a_conv(sharded):
  """[batch, seq, features] inputs (rows merging the sharded batch) and a
  1-D conv's receptive fields on explicit axes: 2:4 Wanda in batches
  equals one device exactly, the Dense kernels stay over "model"."""
  report, arrays = sharded
  singles = [k for k in arrays if k.startswith("seq/single/")]
  assert len(singles) == 6 + 3  # params, masks of conv, a, b
  for key in singles:
    a, b = arrays[key], arrays[key.replace("/single/", "/explicit/")]
    np.testing.assert_array_equal(b, a, err_msg=key)  # no float sum
    if a.dtype == bool:
      groups = a.reshape(-1, 4, a.shape[-1])
      assert (groups.sum(axis=1) == 2).all(), key
  assert report["result_specs"]["seq/a/kernel"] == "float32[16,16@model]"
  assert report["result_specs"]["seq/b/kernel"] == "float32[16,8@model]"
  assert report["result_specs"]["seq/conv/kernel"] == "float32[3,8,16]"


def test_explicit_axes_statistics_and_solves_gather_no_kernel(sharded):
  """On explicit axes (layer b as above): the statistics gather each
  example's features once and all-reduce ``‖X_i‖²`` and ``XᵀX`` over the
  batch shards, then gather the [in] norms; both come back replicated; the
  solves (SparseGPT, Wanda, unstructured and 2:4) exchange nothing, and
  per-layer magnitude all-reduces its histogram."""
  report, _ = sharded
  stats = [re.sub(r"\{[0-9,]*\}", "", c)  # layouts dropped
           for c in report["explicit_stats_collectives"]]
  # [batch/2, in] gathered over "model"; sq's halves and XᵀX all-reduced.
  assert stats == ["all-gather f32[32,32]",
                   "all-reduce (f32[16], f32[32,32])",
                   "all-gather f32[32]"], stats
  assert report["explicit_stat_types"] == ["float32[32]", "float32[32,32]"]
  solves = report["explicit_solve_collectives"]
  for name in ("sparsegpt", "sparsegpt_2_4", "wanda", "wanda_2_4"):
    assert solves[name] == [], (name, solves[name])
  assert solves["magnitude"] and all(
      c.startswith("all-reduce s32") for c in solves["magnitude"])


def test_sharded_statistics_reduce_over_the_batch_and_keep_the_kernel_sharded(
    sharded):
  """What crosses devices (layer b: input 32 = a's outputs, sharded over
  "model"; kernel 32×24 over "model"): the statistics gather each example's
  features and all-reduce sq / XᵀX over the batch shards; the SparseGPT
  solve gathers the [in, in] Gram matrix (and small vectors), Wanda the
  [in] norms, per-layer magnitude all-reduces a histogram; none gathers the
  kernel."""
  report, _ = sharded
  stats = report["stats_collectives"]
  assert any(c.startswith("all-reduce") for c in stats), stats
  assert not any(c.startswith("all-gather") and "f32[64" in c for c in stats)
  solve = report["sparsegpt_collectives"]
  assert any(c.startswith("all-gather f32[32,32]") for c in solve), solve
  assert report["wanda_collectives"] == ["all-gather f32[32]{0}"]  # ‖X_i‖²
  assert all(c.startswith("all-reduce s32") for c in
             report["magnitude_collectives"])  # the top-k's histogram
  for c in stats + solve:
    assert "[32,24]" not in c and "[24,32]" not in c, c  # the kernel
