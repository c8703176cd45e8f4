"""Dependency groups found by tracing, and compaction of the removed units.

The expected groups are written out by hand from each architecture; the
compacted models are checked against the masked models they come from.
Everything runs at tiny widths on jaxpr traces and single forward passes.
"""

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

import flipout_jax as fj
from flipout_jax import dependency
from flipout_jax import models
from flipout_jax import trees

KEY = jax.random.PRNGKey(0)


def removable(groups):
  """{frozenset of (path, axis, stride)} of the removable groups, with the
  unit count, params-collection prefix dropped."""
  out = set()
  for g in groups:
    if g.removable:
      out.add((g.size, frozenset(
          (m.path.replace("params/", ""), m.axis, m.stride)
          for m in g.members)))
  return out


def readers(groups):
  return {frozenset((m.path.replace("params/", ""), m.axis)
                    for m in g.members):
          frozenset((m.path.replace("params/", ""), m.axis) for m in g.readers)
          for g in groups}


def check_cover(groups, variables):
  """Every axis of every leaf is split exactly into its groups' atoms."""
  atoms = {}
  for g in groups:
    for m in g.members:
      atoms.setdefault((m.path, m.axis), []).append((m.stride, g.size))
  for path, x in trees.leaves_with_paths(variables):
    for axis, n in enumerate(x.shape):
      got = sorted(atoms.pop((path, axis)), reverse=True)
      strides = [s for s, _ in got]
      inner = [int(np.prod([k for _, k in got[i + 1:]]))
               for i in range(len(got))]
      assert strides == inner, (path, axis, got)
      assert int(np.prod([k for _, k in got])) == n, (path, axis, got)
  assert not atoms


def group_of(groups, path, axis, stride=1):
  (g,) = [g for g in groups
          if any(m.path == path and m.axis == axis and m.stride == stride
                 for m in g.members)]
  return g


def zero_units(variables, groups, units):
  """``variables`` with units ``{group index: [unit, ...]}`` set to 0 in
  every member of the group (the whole unit removed by hand)."""
  flat = {p: np.array(x) for p, x in trees.leaves_with_paths(variables)}
  for gi, js in units.items():
    g = groups[gi]
    for m in g.members:
      x = flat[m.path]
      view = x.reshape(dependency._unit_view(x.shape, m, g.size))  # pylint: disable=protected-access
      view[:, :, js] = 0
  leaves = [jnp.asarray(flat[p]) for p, _ in trees.leaves_with_paths(variables)]
  return jax.tree.unflatten(jax.tree.structure(variables), leaves)


def n_params(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


# -- a pure-function MLP -----------------------------------------------------


def mlp(v, x):
  h = jax.nn.relu(x @ v["w1"] + v["b1"])
  h = jnp.tanh(h @ v["w2"] + v["b2"])
  return h @ v["w3"] + v["b3"]


def mlp_vars(key=KEY):
  k = jax.random.split(key, 6)
  shapes = {"w1": (4, 6), "b1": (6,), "w2": (6, 5), "b2": (5,), "w3": (5, 3),
            "b3": (3,)}
  return {n: jax.random.normal(kk, s) for kk, (n, s) in zip(k, shapes.items())}


def test_mlp_groups():
  v = mlp_vars()
  groups = fj.dependency_groups(mlp, v, jnp.ones((2, 4)))
  check_cover(groups, v)
  assert removable(groups) == {
      (6, frozenset({("b1", 0, 1), ("w1", 1, 1), ("w2", 0, 1)})),
      (5, frozenset({("b2", 0, 1), ("w2", 1, 1), ("w3", 0, 1)})),
  }
  assert group_of(groups, "w1", 0).reason == "tied to the input"
  assert group_of(groups, "w3", 1).reason == "tied to the output"
  assert {m.path for m in group_of(groups, "b3", 0).members} == {"b3", "w3"}
  assert [m.path for m in group_of(groups, "w1", 1).readers] == ["w2"]


def test_mlp_compact_equals_masked_model():
  v = mlp_vars()
  x = jax.random.normal(KEY, (7, 4))
  groups = fj.dependency_groups(mlp, v, x)
  g1 = groups.index(group_of(groups, "w1", 1))
  g2 = groups.index(group_of(groups, "w2", 1))
  # Only the readers are masked (rows of w2 and w3); the bias b1 of the
  # removed units stays nonzero.
  masks = {k: None for k in v}
  masks["w2"] = jnp.ones((6, 5), bool).at[jnp.array([1, 4])].set(False)
  masks["w3"] = jnp.ones((5, 3), bool).at[2].set(False)
  res = fj.compact(mlp, v, x, masks=masks)
  assert res.shapes == {"b1": (4,), "b2": (4,), "b3": (3,), "w1": (4, 4),
                        "w2": (4, 4), "w3": (4, 3)}
  np.testing.assert_array_equal(res.kept[g1], [0, 2, 3, 5])
  np.testing.assert_array_equal(res.kept[g2], [0, 1, 3, 4])
  masked = trees.apply_masks(v, masks)
  np.testing.assert_allclose(mlp(res.variables, x), mlp(masked, x),
                             rtol=1e-6, atol=1e-6)
  # masks=None reads the zeros of the params themselves.
  again = fj.compact(mlp, masked, x)
  assert again.shapes == res.shapes
  for a, b in zip(jax.tree.leaves(again.variables),
                  jax.tree.leaves(res.variables)):
    np.testing.assert_array_equal(a, b)


def test_zero_incoming_weights_with_a_bias_are_not_removed():
  """A unit whose input weights are zero still sends relu(b) onward."""
  v = mlp_vars()
  v["w1"] = v["w1"].at[:, 3].set(0.0)
  v["b1"] = v["b1"].at[3].set(1.0)
  res = fj.compact(mlp, v, jnp.ones((2, 4)))
  assert res.shapes["w1"] == (4, 6)
  # Zero reader rows: removed (one unit kept at least when all are zero).
  v["w2"] = jnp.zeros_like(v["w2"])
  res = fj.compact(mlp, v, jnp.ones((2, 4)))
  assert res.shapes["w1"] == (4, 1) and res.shapes["w2"] == (1, 5)


def test_compact_rejects_masks_of_another_tree():
  v = mlp_vars()
  with pytest.raises(ValueError, match="masks"):
    fj.compact(mlp, v, jnp.ones((2, 4)), masks={"w1": None})


def test_unknown_ops_concat_scan_and_depthwise():
  x = jnp.ones((2, 4))

  def topk(v, x):
    h, _ = lax.top_k(x @ v["w1"], 6)
    return h @ v["w2"]

  v = {"w1": jnp.ones((4, 6)), "w2": jnp.ones((6, 3))}
  g = group_of(fj.dependency_groups(topk, v, x), "w1", 1)
  assert not g.removable and "top_k" in g.reason

  def cat(v, x):
    h = jnp.concatenate([x @ v["a"], x @ v["b"]], axis=-1)
    return jax.nn.relu(h) @ v["w"]

  v = {"a": jnp.ones((4, 2)), "b": jnp.ones((4, 3)), "w": jnp.ones((5, 3))}
  groups = fj.dependency_groups(cat, v, x)
  assert not removable(groups)
  assert group_of(groups, "a", 1).reason == "concatenated along"

  def scan(v, x):
    h = x @ v["w_in"]
    h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, v["ws"])
    return h @ v["w_out"]

  v = {"w_in": jnp.ones((4, 5)), "ws": jnp.ones((2, 5, 5)),
       "w_out": jnp.ones((5, 3))}
  groups = fj.dependency_groups(scan, v, x)
  check_cover(groups, v)
  assert removable(groups) == {(5, frozenset(
      {("w_in", 1, 1), ("ws", 1, 1), ("ws", 2, 1), ("w_out", 0, 1)}))}
  assert group_of(groups, "ws", 0).reason == "scanned over"

  def depthwise(v, x):
    dn = ("NHWC", "HWIO", "NHWC")
    h = lax.conv_general_dilated(x, v["c1"], (1, 1), "SAME",
                                 dimension_numbers=dn)
    h = lax.conv_general_dilated(jax.nn.relu(h), v["dw"], (1, 1), "SAME",
                                 dimension_numbers=dn, feature_group_count=4)
    h = lax.conv_general_dilated(jax.nn.relu(h), v["c2"], (1, 1), "SAME",
                                 dimension_numbers=dn)
    return h.mean((1, 2))

  # 4 channels, 2 depthwise filters per channel (multiplier 2).
  v = {"c1": jnp.ones((1, 1, 3, 4)), "dw": jnp.ones((3, 3, 1, 8)),
       "c2": jnp.ones((1, 1, 8, 5))}
  groups = fj.dependency_groups(depthwise, v, jnp.ones((1, 6, 6, 3)))
  check_cover(groups, v)
  assert removable(groups) >= {
      (4, frozenset({("c1", 3, 1), ("dw", 3, 2), ("c2", 2, 2)})),
      (2, frozenset({("dw", 3, 1), ("c2", 2, 1)})),
  }


def test_calls_control_flow_and_odd_reshapes():
  """remat, custom_vjp, cond and while bodies are entered; a reshape whose
  factors do not nest with another fixes the axis."""

  @jax.custom_vjp
  def sin(h):
    return jnp.sin(h)

  sin.defvjp(lambda h: (jnp.sin(h), h), lambda h, g: (g * jnp.cos(h),))

  def f(v, x):
    h = jax.checkpoint(lambda h: jax.nn.gelu(h @ v["w1"]))(x)
    h = lax.cond(x.sum() > 0, lambda h: sin(h) * 2, lambda h: h + 1, h)
    h = lax.while_loop(lambda c: c[0] < 3,
                       lambda c: (c[0] + 1, jnp.tanh(c[1])), (0, h))[1]
    return h @ v["w2"]

  v = {"w1": jnp.ones((4, 6)), "w2": jnp.ones((6, 3))}
  groups = fj.dependency_groups(f, v, jnp.ones((2, 4)))
  assert removable(groups) == {(6, frozenset({("w1", 1, 1), ("w2", 0, 1)}))}
  assert readers(groups)[frozenset({("w1", 1), ("w2", 0)})] == {("w2", 0)}

  def odd(v, x):
    h = x @ v["w1"]  # 6 units seen as (2, 3) and as (3, 2)
    a = h.reshape(2, 2, 3).sum(-1)
    b = h.reshape(2, 3, 2).sum(-1)
    return a @ v["wa"] + b @ v["wb"]

  v = {"w1": jnp.ones((4, 6)), "wa": jnp.ones((2, 3)), "wb": jnp.ones((3, 3))}
  groups = fj.dependency_groups(odd, v, jnp.ones((2, 4)))
  check_cover(groups, v)
  g = group_of(groups, "w1", 1)
  assert g.size == 6 and g.reason == "reshapes whose factors do not nest"


# -- LeNet-5 ------------------------------------------------------------------


def test_lenet5_groups():
  model = models.LeNet5(width=0.5)  # 3, 8, 60, 42 units
  x = jnp.ones((1, 28, 28, 1))
  v = model.init(KEY, x)
  groups = fj.dependency_groups(model.apply, v, x)
  check_cover(groups, v)
  assert removable(groups) == {
      (3, frozenset({("conv1/kernel", 3, 1), ("conv1/bias", 0, 1),
                     ("conv2/kernel", 2, 1)})),
      # The flatten (5, 5, 8) -> 200: channel c is rows c, c+8, ... of fc1.
      (8, frozenset({("conv2/kernel", 3, 1), ("conv2/bias", 0, 1),
                     ("fc1/kernel", 0, 1)})),
      (60, frozenset({("fc1/kernel", 1, 1), ("fc1/bias", 0, 1),
                      ("fc2/kernel", 0, 1)})),
      (42, frozenset({("fc2/kernel", 1, 1), ("fc2/bias", 0, 1),
                      ("fc3/kernel", 0, 1)})),
  }
  for stride in (8, 40):  # the spatial factors of the flatten
    g = group_of(groups, "params/fc1/kernel", 0, stride)
    assert g.size == 5 and not g.removable
  assert group_of(groups, "params/conv1/kernel", 2).reason == (
      "tied to the input")
  assert not group_of(groups, "params/conv2/kernel", 0).removable


def masked_and_compacted(model, rebuild, x, units, variables=None):
  v = model.init(KEY, x) if variables is None else variables
  groups = fj.dependency_groups(model.apply, v, x)
  cand = [i for i, g in enumerate(groups) if g.removable and g.readers]
  z = zero_units(v, groups, {cand[i]: js for i, js in units.items()})
  res = fj.compact(model.apply, z, x)
  want = model.apply(z, x)
  got = rebuild(res.widths).apply(res.variables, x)
  return groups, cand, res, want, got


def test_lenet5_compact():
  model = models.LeNet5(width=0.5)
  x = jax.random.normal(KEY, (3, 28, 28, 1))
  groups, cand, res, want, got = masked_and_compacted(
      model, lambda w: models.LeNet5(width=0.5, layer_widths=w), x,
      {0: [1], 1: [0, 5, 7], 2: list(range(0, 60, 2)), 3: [41]})
  assert [groups[i].size for i in cand] == [3, 8, 60, 42]
  assert res.widths == {"conv1": 2, "conv2": 5, "fc1": 30, "fc2": 41,
                        "fc3": 10}
  assert res.shapes["params/fc1/kernel"] == (5 * 5 * 5, 30)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_model_layer_widths_are_checked():
  x = jnp.ones((1, 28, 28, 1))
  with pytest.raises(ValueError, match=r"layer_widths\['fc1'\]"):
    models.LeNet5(layer_widths={"fc1": 0})
  with pytest.raises(ValueError, match="'fc9' is not a layer"):
    models.LeNet5(layer_widths={"fc9": 3}).init(KEY, x)
  with pytest.raises(ValueError, match=r"layer_widths\['fc3'\]: must be 10"):
    models.LeNet5(layer_widths={"fc3": 4}).init(KEY, x)


# -- VGG-11 -------------------------------------------------------------------


def randomize_stats(v):
  """Non-trivial BatchNorm statistics (eval mode reads them)."""
  stats = jax.tree.map(lambda s: jax.random.uniform(KEY, s.shape, minval=0.5,
                                                    maxval=1.5),
                       v["batch_stats"])
  return {**v, "batch_stats": stats}


def test_vgg11_groups_and_compact():
  model = models.VGG11(width=1 / 16)  # 4, 8, 16, 16, 32, 32, 32, 32
  x = jax.random.normal(KEY, (2, 32, 32, 3))
  v = randomize_stats(model.init(KEY, x))
  groups = fj.dependency_groups(model.apply, v, x)
  check_cover(groups, v)
  widths = (4, 8, 16, 16, 32, 32, 32, 32)
  expected = set()
  for i, n in enumerate(widths, start=1):
    nxt = ("head/kernel", 0, 1) if i == 8 else (f"conv{i + 1}/kernel", 2, 1)
    expected.add((n, frozenset({
        (f"conv{i}/kernel", 3, 1), (f"conv{i}/bias", 0, 1),
        (f"bn{i}/scale", 0, 1), (f"bn{i}/bias", 0, 1),
        (f"batch_stats/bn{i}/mean", 0, 1), (f"batch_stats/bn{i}/var", 0, 1),
        nxt})))
  assert removable(groups) == expected
  _, cand, res, want, got = masked_and_compacted(
      model, lambda w: models.VGG11(width=1 / 16, layer_widths=w), x,
      {0: [0], 3: [1, 2, 3], 7: list(range(20))}, variables=v)
  assert len(cand) == 8
  assert res.widths == {"conv1": 3, "conv2": 8, "conv3": 16, "conv4": 13,
                        "conv5": 32, "conv6": 32, "conv7": 32, "conv8": 12,
                        "head": 10}
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# -- ResNet-18 ----------------------------------------------------------------


def resnet_expected():
  """ResNet-18 at width 1/32: planes 2, 4, 8, 16 (stem 2)."""
  planes = (2, 4, 8, 16)
  bn = lambda name: {(f"{name}/scale", 0, 1), (f"{name}/bias", 0, 1),  # pylint: disable=unnecessary-lambda-assignment
                     (f"batch_stats/{name}/mean", 0, 1),
                     (f"batch_stats/{name}/var", 0, 1)}
  groups = set()
  for s, n in enumerate(planes, start=1):
    # conv1 -> bn1 -> conv2 inside every block.
    for b in (1, 2):
      blk = f"stage{s}_block{b}"
      groups.add((n, frozenset({(f"{blk}/conv1/kernel", 3, 1),
                                (f"{blk}/conv2/kernel", 2, 1)}
                               | bn(f"{blk}/bn1"))))
    # The residual stream of stage s: every add of the stage joins it; it
    # enters stage s+1's first block (conv1 and the projection shortcut).
    res = set()
    for b in (1, 2):
      blk = f"stage{s}_block{b}"
      res |= {(f"{blk}/conv2/kernel", 3, 1)} | bn(f"{blk}/bn2")
    res.add((f"stage{s}_block2/conv1/kernel", 2, 1))
    if s == 1:  # identity shortcut: the stem's channels run through
      res |= {("stem_conv/kernel", 3, 1), ("stage1_block1/conv1/kernel", 2, 1)
              } | bn("stem_bn")
    else:
      blk = f"stage{s}_block1"
      res |= {(f"{blk}/shortcut_conv/kernel", 3, 1)} | bn(
          f"{blk}/shortcut_bn")
    if s < 4:
      res |= {(f"stage{s + 1}_block1/conv1/kernel", 2, 1),
              (f"stage{s + 1}_block1/shortcut_conv/kernel", 2, 1)}
    else:
      res.add(("head/kernel", 0, 1))
    groups.add((n, frozenset(res)))
  return groups


def test_resnet18_groups():
  model = models.ResNet18(width=1 / 32)
  x = jnp.ones((1, 8, 8, 3))
  v = model.init(KEY, x)
  groups = fj.dependency_groups(model.apply, v, x)
  check_cover(groups, v)
  assert removable(groups) == resnet_expected()
  assert group_of(groups, "params/stem_conv/kernel", 2).reason == (
      "tied to the input")
  assert not group_of(groups, "params/head/kernel", 1).removable


def test_resnet18_compact_and_residual_units_kept():
  model = models.ResNet18(width=1 / 32)
  rebuild = lambda w: models.ResNet18(width=1 / 32, layer_widths=w)  # pylint: disable=unnecessary-lambda-assignment
  x = jax.random.normal(KEY, (2, 8, 8, 3))
  v = randomize_stats(model.init(KEY, x))
  groups = fj.dependency_groups(model.apply, v, x)
  stage1 = groups.index(group_of(groups, "params/stem_conv/kernel", 3))
  inner = groups.index(group_of(groups, "params/stage2_block1/conv1/kernel",
                                3))
  # A block's output filter and its BatchNorm zeroed: the residual add
  # still carries the stem's channel, so nothing is removed.
  flat = dict(trees.leaves_with_paths(v))
  z = {**v, "params": jax.tree.map(lambda a: a, v["params"])}
  blk = z["params"]["stage1_block1"]
  blk["conv2"] = {"kernel": flat["params/stage1_block1/conv2/kernel"].at[
      ..., 1].set(0.0)}
  blk["bn2"] = {"scale": blk["bn2"]["scale"].at[1].set(0.0),
                "bias": blk["bn2"]["bias"].at[1].set(0.0)}
  res = fj.compact(model.apply, z, x)
  assert res.widths["stem_conv"] == 2
  assert len(res.kept[stage1]) == 2
  # The channel zeroed where the stage's residual stream is read (the whole
  # group): removed from the stem, both blocks and stage 2's entry.
  z = zero_units(v, groups, {stage1: [1], inner: [0, 3]})
  res = fj.compact(model.apply, z, x)
  assert res.widths["stem_conv"] == 1
  assert res.widths["stage1_block2/conv2"] == 1
  assert res.widths["stage2_block1/conv1"] == 2
  assert res.shapes["params/stage2_block1/shortcut_conv/kernel"] == (
      1, 1, 1, 4)
  np.testing.assert_allclose(rebuild(res.widths).apply(res.variables, x),
                             model.apply(z, x), rtol=1e-5, atol=1e-5)


# -- GPT ----------------------------------------------------------------------

GPT = dict(vocab_size=11, d_model=8, num_heads=2, num_layers=2, mlp_dim=6,
           max_len=5)


def test_gpt_groups():
  model = models.GPT(**GPT)
  x = jnp.array([[1, 2, 3, 4, 5]])
  v = model.init(KEY, x)
  groups = fj.dependency_groups(model.apply, v, x)
  check_cover(groups, v)
  expected = set()
  for i in range(2):
    a = f"block{i}/attn/"
    qkv = ("query", "key", "value")
    # Heads: 2 units of 4 in every projection (stride 4).
    expected.add((2, frozenset(
        {(a + p + "/kernel", 1, 4) for p in qkv}
        | {(a + p + "/bias", 0, 4) for p in qkv}
        | {(a + "out/kernel", 0, 4)})))
    # The query/key dimension within a head (q·k contracts it).
    expected.add((4, frozenset(
        {(a + p + "/kernel", 1, 1) for p in ("query", "key")}
        | {(a + p + "/bias", 0, 1) for p in ("query", "key")})))
    # The value dimension within a head, read by the output projection.
    expected.add((4, frozenset({(a + "value/kernel", 1, 1),
                                (a + "value/bias", 0, 1),
                                (a + "out/kernel", 0, 1)})))
    expected.add((6, frozenset({(f"block{i}/fc1/kernel", 1, 1),
                                (f"block{i}/fc1/bias", 0, 1),
                                (f"block{i}/fc2/kernel", 0, 1)})))
  assert removable(groups) == expected
  qk = group_of(groups, "params/block0/attn/query/kernel", 1, 1)
  assert qk.readers == ()
  heads = group_of(groups, "params/block0/attn/query/kernel", 1, 4)
  assert [(m.path, m.axis) for m in heads.readers] == [
      ("params/block0/attn/out/kernel", 0)]
  # The residual stream: LayerNorm reduces over it.
  res = group_of(groups, "params/token_embed/embedding", 1)
  assert res.reason == "reduced by reduce_sum"
  assert {(m.path, m.axis) for m in res.members} >= {
      ("params/head/kernel", 0), ("params/block1/fc2/bias", 0),
      ("params/ln_f/scale", 0), ("params/pos_embed/embedding", 1)}
  assert group_of(groups, "params/token_embed/embedding", 0).reason == (
      "indexed by gather")
  assert group_of(groups, "params/head/kernel", 1).reason == (
      "tied to the output")


def test_gpt_compact_heads_and_mlp_units():
  model = models.GPT(**GPT)
  x = jnp.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
  v = model.init(KEY, x)
  groups = fj.dependency_groups(model.apply, v, x)
  heads0 = groups.index(group_of(groups, "params/block0/attn/query/kernel",
                                 1, 4))
  mlp1 = groups.index(group_of(groups, "params/block1/fc1/kernel", 1))
  z = zero_units(v, groups, {heads0: [1], mlp1: [0, 2, 5]})
  res = fj.compact(model.apply, z, x)
  assert res.widths["block0/attn/query"] == 4
  assert res.widths["block0/attn/value"] == 4
  assert res.widths["block1/attn/query"] == 8
  assert res.widths["block0/fc1"] == 6 and res.widths["block1/fc1"] == 3
  assert n_params(res.variables) == n_params(v) - (3 * (8 * 4 + 4) + 4 * 8) - (
      3 * (8 + 1 + 8))
  small = models.GPT(**GPT, layer_widths=res.widths)
  np.testing.assert_allclose(small.apply(res.variables, x), model.apply(z, x),
                             rtol=1e-5, atol=1e-5)


def test_nnx_module_compacts_and_rebuilds():
  nnx = pytest.importorskip("flax.nnx")

  class MLP(nnx.Module):

    def __init__(self, hidden, rngs):
      self.fc1 = nnx.Linear(4, hidden, rngs=rngs)
      self.fc2 = nnx.Linear(hidden, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc2(jax.nn.relu(self.fc1(x)))

  model = MLP(6, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  kernel = state["fc2"]["kernel"]
  kernel.set_value(kernel.get_value().at[jnp.array([1, 3])].set(0.0))
  apply = lambda s, x: nnx.merge(graphdef, s)(x)  # pylint: disable=unnecessary-lambda-assignment
  x = jax.random.normal(KEY, (5, 4))
  res = fj.compact(apply, state, x)
  assert res.widths == {"fc1": 4, "fc2": 3}
  small = MLP(res.widths["fc1"], nnx.Rngs(1))
  nnx.update(small, res.variables)
  np.testing.assert_allclose(small(x), apply(state, x), rtol=1e-6, atol=1e-6)


def test_flax_masks_over_params():
  """Masks over ``variables["params"]`` (kernels only, as a pruning state
  holds them): the fc1 units whose fc2 rows are masked are removed."""
  model = models.LeNet5(width=0.5)
  x = jax.random.normal(KEY, (2, 28, 28, 1))
  v = model.init(KEY, x)
  masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool) if p.ndim >= 2
                       else None, v["params"])
  masks["fc2"]["kernel"] = masks["fc2"]["kernel"].at[jnp.arange(10)].set(
      False)
  res = fj.compact(model.apply, v, x, masks=masks)
  assert res.widths == {"conv1": 3, "conv2": 8, "fc1": 50, "fc2": 42,
                        "fc3": 10}
  masked = {"params": trees.apply_masks(v["params"], masks)}
  small = models.LeNet5(width=0.5, layer_widths=res.widths)
  np.testing.assert_allclose(small.apply(res.variables, x),
                             model.apply(masked, x), rtol=1e-5, atol=1e-5)
