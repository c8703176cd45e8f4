"""Tests for exporting pruned models (flipout_jax.sparse_export)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse

from flipout_jax import sparse_export as ex
from flipout_jax import structure as nm


def _model(seed=0):
  # NumPy data: eager jax.random would compile a PRNG program per shape.
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = {
      "conv": {"kernel": normal(3, 3, 4, 8), "bias": normal(8)},
      "dense0": {"kernel": normal(16, 12), "bias": normal(12)},
      "dense1": {"kernel": normal(12, 5), "bias": jnp.zeros((5,))},
  }
  masks = {
      "conv": {"kernel": jnp.asarray(rng.random((3, 3, 4, 8)) < 0.3),
               "bias": None},
      "dense0": {"kernel": nm.nm_masks(params["dense0"]["kernel"], 2, 4),
                 "bias": None},
      "dense1": {"kernel": nm.nm_masks(params["dense1"]["kernel"], 1, 4),
                 "bias": None},
  }
  # A kept weight that is exactly 0.0 must survive the round trip as kept.
  mask = np.asarray(masks["dense0"]["kernel"])
  first = tuple(np.argwhere(mask)[0])
  params["dense0"]["kernel"] = params["dense0"]["kernel"].at[first].set(0.0)
  return params, masks


def _masked(params, masks):
  return jax.tree.map(lambda p, m: p if m is None else jnp.where(m, p, 0.0),
                      params, masks, is_leaf=lambda x: x is None)


@pytest.mark.parametrize("fmt", ["bcoo", "auto"])
def test_round_trip_is_exact(fmt):
  params, masks = _model()
  kwargs = {} if fmt == "bcoo" else {"n": 2, "m": 4}
  exported = ex.export(params, masks, format=fmt, **kwargs)
  dense = ex.to_dense(exported)
  want = _masked(params, masks)
  for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  got_masks = ex.masks_of(exported)
  for a, b in zip(jax.tree.leaves(got_masks), jax.tree.leaves(masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  kinds = {k: type(v["kernel"]).__name__ for k, v in exported.items()}
  if fmt == "bcoo":
    assert set(kinds.values()) == {"BCOO"}
  else:  # conv mask is random (not 2:4); both Dense masks are N:M
    assert kinds == {"conv": "BCOO", "dense0": "NMKernel",
                     "dense1": "NMKernel"}
  assert isinstance(exported["dense0"]["bias"], jax.Array)


def test_nm_compress_empty_slots_and_values():
  w = jnp.arange(1.0, 33.0).reshape(8, 4)
  mask = nm.nm_masks(w, 2, 4).at[0:4, 1].set(False)  # a group keeping none
  mask = mask.at[7, 2].set(False)  # a group keeping one (rows 6, 7 kept)
  k = ex.nm_compress(w, mask, 2, 4)
  assert k.values.shape == (4, 4) and k.indices.dtype == jnp.uint8
  assert int(jnp.sum(k.indices == 4)) == 3  # three empty slots
  np.testing.assert_array_equal(np.asarray(k.todense()),
                                np.where(mask, w, 0.0))
  assert k.nse == int(mask.sum())
  with pytest.raises(ValueError, match="mask: a group keeps 4 > n=2"):
    ex.nm_compress(w, jnp.ones((8, 4), bool), 2, 4)


def test_sparse_inference_matches_dense():
  params, masks = _model(1)
  dense = _masked(params, masks)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 3, 16)),
                  jnp.float32)
  for fmt, kwargs in (("bcoo", {}), ("nm", {})):
    if fmt == "nm":
      sub_p = {k: params[k] for k in ("dense0",)}
      sub_m = {k: masks[k] for k in ("dense0",)}
      exported = ex.export(sub_p, sub_m, format="nm", n=2, m=4)
    else:
      exported = ex.export(params, masks, **kwargs)
    k, b = exported["dense0"]["kernel"], exported["dense0"]["bias"]
    want = x @ dense["dense0"]["kernel"] + dense["dense0"]["bias"]
    got = ex.sparse_dense_apply(x, k, b)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5)
    got = jax.jit(ex.sparse_dense_apply)(x, k, b)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5)
  # A two-layer MLP on BCOO kernels equals the dense masked MLP.
  exported = ex.export(params, masks)

  def mlp(p, x, apply):
    h = jax.nn.relu(apply(x, p["dense0"]["kernel"], p["dense0"]["bias"]))
    return apply(h, p["dense1"]["kernel"], p["dense1"]["bias"])

  np.testing.assert_allclose(
      np.asarray(mlp(exported, x, ex.sparse_dense_apply)),
      np.asarray(mlp(dense, x, lambda x, w, b: x @ w + b)),
      rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="x: last axis"):
    ex.sparse_dense_apply(jnp.ones((2, 5)), k, b)
  with pytest.raises(ValueError, match="kernel: a Dense kernel is 2-d"):
    ex.sparse_dense_apply(x, exported["conv"]["kernel"])


def test_byte_sizes():
  params, masks = _model(2)
  exported = ex.export(params, masks, format="auto", n=2, m=4)
  report = ex.export_report(exported)
  rows = {l.path: l for l in report.layers}
  conv_nse = int(np.sum(np.asarray(masks["conv"]["kernel"])))
  # BCOO: float32 data + 4 int16 indices per stored entry.
  assert rows["conv/kernel"].stored == conv_nse
  assert rows["conv/kernel"].sparse_bytes == conv_nse * (4 + 4 * 2)
  assert rows["conv/kernel"].dense_bytes == 3 * 3 * 4 * 8 * 4
  # 2:4 compact: half the entries, 4 + 1 bytes each.
  assert rows["dense0/kernel"].format == "nm"
  assert rows["dense0/kernel"].sparse_bytes == 16 * 12 // 2 * 5
  # A 1:4 mask exported as 2:4: one of each group's two slots is empty.
  assert rows["dense1/kernel"].stored == 12 * 5 // 4
  assert rows["dense1/kernel"].sparse_bytes == 12 * 5 // 2 * 5
  assert rows["conv/bias"].format == "dense"
  assert rows["conv/bias"].sparse_bytes == rows["conv/bias"].dense_bytes == 32
  assert report.dense_bytes == sum(
      x.size * 4 for x in jax.tree.leaves(params))
  assert report.sparse_bytes == sum(l.sparse_bytes for l in report.layers)
  assert "| **total** |" in str(report)
  # int32 indices on request.
  big = ex.export(params, masks, index_dtype="int32")
  big_rows = {l.path: l for l in ex.export_report(big).layers}
  assert big_rows["conv/kernel"].sparse_bytes == conv_nse * (4 + 4 * 4)
  assert isinstance(big["conv"]["kernel"], sparse.BCOO)


def test_argument_errors():
  params, masks = _model()
  with pytest.raises(ValueError, match="format"):
    ex.export(params, masks, format="csr")
  with pytest.raises(ValueError, match="n:"):
    ex.export(params, masks, format="nm")
  with pytest.raises(ValueError, match="'conv/kernel'"):
    ex.export(params, masks, format="nm", n=2, m=4)
  with pytest.raises(ValueError, match="index_dtype"):
    ex.export(params, masks, index_dtype="int8")
  with pytest.raises(ValueError, match="params"):
    ex.export({"a": params["conv"]}, masks)
