"""Tests for flipout_jax.models.

Convolutions are slow on CPU, so forward passes run only at narrow widths on a
batch of 2; full-width models are only traced with `jax.eval_shape`.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipout_jax import models

BATCH = 2
# Narrow enough to keep every forward pass cheap, wide enough that every
# layer keeps more than one channel where the base count allows it.
SMALL_WIDTH = 0.125


def _input_shape(name, batch=BATCH):
  return (batch, 28, 28, 1) if name.startswith("lenet") else (batch, 32, 32, 3)


def _abstract_variables(model, shape):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32)))


def _num_params(variables):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))


# Parameter-count building blocks, written from the layer shapes.
def _conv(k, cin, cout, bias):
  return k * k * cin * cout + (cout if bias else 0)


def _dense(n_in, n_out):
  return n_in * n_out + n_out


def _bn(c):
  return 2 * c  # scale and bias; running mean/var are not params.


def _basic_block(cin, cout):
  n = _conv(3, cin, cout, False) + _bn(cout) + _conv(3, cout, cout, False) + _bn(cout)
  if cin != cout:  # Option-B projection shortcut.
    n += _conv(1, cin, cout, False) + _bn(cout)
  return n


def _cifar_resnet(stage_sizes, planes, num_classes=10):
  n = _conv(3, 3, planes[0], False) + _bn(planes[0])
  cin = planes[0]
  for blocks, cout in zip(stage_sizes, planes):
    for _ in range(blocks):
      n += _basic_block(cin, cout)
      cin = cout
  return n + _dense(cin, num_classes)


# ---------------------------------------------------------------- forward pass


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_forward_shapes_train_and_eval(name):
  num_classes = 7
  model = models.get_model(name, num_classes=num_classes, width=SMALL_WIDTH)
  x = jax.random.normal(jax.random.key(1), _input_shape(name))
  variables = model.init(jax.random.key(0), x)

  logits = model.apply(variables, x, train=False)
  chex.assert_shape(logits, (BATCH, num_classes))
  chex.assert_tree_all_finite(logits)

  if models.uses_batchnorm(name):
    logits, updates = model.apply(
        variables, x, train=True, mutable=["batch_stats"])
    chex.assert_shape(logits, (BATCH, num_classes))
    chex.assert_tree_all_finite(logits)
    chex.assert_trees_all_equal_shapes(
        updates["batch_stats"], variables["batch_stats"])
    # Running means start at 0; a train step on random data must move them.
    old = jax.tree.leaves(variables["batch_stats"])
    new = jax.tree.leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(old, new))
  else:
    assert set(variables) == {"params"}
    chex.assert_trees_all_close(
        model.apply(variables, x, train=True), logits)


def test_batchnorm_eval_uses_running_stats():
  model = models.get_model("resnet20", width=SMALL_WIDTH)
  x = jax.random.normal(jax.random.key(1), _input_shape("resnet20"))
  variables = model.init(jax.random.key(0), x)
  # Eval mode must not need a mutable collection, and must not depend on the
  # other examples in the batch.
  full = model.apply(variables, x, train=False)
  single = model.apply(variables, x[:1], train=False)
  chex.assert_trees_all_close(full[:1], single, atol=1e-5, rtol=1e-5)
  bn = variables["params"]["stem_bn"]
  chex.assert_shape([bn["scale"], bn["bias"]], (max(1, round(16 * SMALL_WIDTH)),))


# ------------------------------------------------------------ parameter counts


def test_lenet300100_param_count():
  variables = _abstract_variables(models.LeNet300100(), _input_shape("lenet", 1))
  expected = _dense(28 * 28, 300) + _dense(300, 100) + _dense(100, 10)
  assert expected == 266_610
  assert _num_params(variables) == expected


def test_lenet5_param_count():
  variables = _abstract_variables(models.LeNet5(), _input_shape("lenet", 1))
  # 28x28 --SAME conv--> 28x28 --pool--> 14x14 --5x5 VALID--> 10x10 --pool--> 5x5.
  expected = (_conv(5, 1, 6, True) + _conv(5, 6, 16, True)
              + _dense(5 * 5 * 16, 120) + _dense(120, 84) + _dense(84, 10))
  assert _num_params(variables) == expected


def test_resnet18_param_count():
  variables = _abstract_variables(models.ResNet18(), (1, 32, 32, 3))
  assert _cifar_resnet((2, 2, 2, 2), (64, 128, 256, 512)) == 11_173_962
  assert _num_params(variables) == 11_173_962


@pytest.mark.parametrize("cls,n", [(models.ResNet20, 3), (models.ResNet56, 9)])
def test_cifar_resnet_param_count(cls, n):
  variables = _abstract_variables(cls(), (1, 32, 32, 3))
  assert _num_params(variables) == _cifar_resnet((n, n, n), (16, 32, 64))


def test_resnet20_is_about_027m():
  assert round(_cifar_resnet((3, 3, 3), (16, 32, 64)) / 1e6, 2) == 0.27


@pytest.mark.parametrize("depth", [11, 13, 16, 19])
def test_vgg_param_count(depth):
  variables = _abstract_variables(models.VGG(depth=depth), (1, 32, 32, 3))
  expected, cin = 0, 3
  for v in models.vgg.CFGS[depth]:
    if v != "M":
      expected += _conv(3, cin, v, True) + _bn(v)
      cin = v
  expected += _dense(512, 10)
  assert _num_params(variables) == expected
  assert "batch_stats" in variables


def test_vgg16_known_param_count():
  variables = _abstract_variables(models.VGG16(), (1, 32, 32, 3))
  assert _num_params(variables) == 14_728_266


# ------------------------------------------------------------ width multiplier


def test_scaled_rounds_and_clamps():
  assert models.scaled(64, 0.5) == 32
  assert models.scaled(300, 0.25) == 75
  assert models.scaled(6, 0.1) == 1  # round(0.6) = 1
  assert models.scaled(6, 0.01) == 1  # never below one channel
  assert models.scaled(16, 1.5) == 24


def test_width_multiplier_lenet300100():
  params = _abstract_variables(
      models.LeNet300100(width=0.5), _input_shape("lenet", 1))["params"]
  chex.assert_shape(params["fc1"]["kernel"], (784, 150))
  chex.assert_shape(params["fc2"]["kernel"], (150, 50))
  chex.assert_shape(params["fc3"]["kernel"], (50, 10))  # head not scaled


def test_width_multiplier_lenet5():
  params = _abstract_variables(
      models.LeNet5(width=0.5), _input_shape("lenet", 1))["params"]
  chex.assert_shape(params["conv1"]["kernel"], (5, 5, 1, 3))
  chex.assert_shape(params["conv2"]["kernel"], (5, 5, 3, 8))
  chex.assert_shape(params["fc1"]["kernel"], (5 * 5 * 8, 60))
  chex.assert_shape(params["fc2"]["kernel"], (60, 42))
  chex.assert_shape(params["fc3"]["kernel"], (42, 10))


def test_width_multiplier_vgg():
  params = _abstract_variables(models.VGG11(width=0.25), (1, 32, 32, 3))["params"]
  expected = [max(1, round(v * 0.25)) for v in models.vgg.CFGS[11] if v != "M"]
  got = [params[f"conv{i + 1}"]["kernel"].shape[-1] for i in range(len(expected))]
  assert got == expected
  chex.assert_shape(params["head"]["kernel"], (128, 10))


@pytest.mark.parametrize("width", [0.5, 0.25])
def test_width_multiplier_resnet18(width):
  params = _abstract_variables(models.ResNet18(width=width), (1, 32, 32, 3))["params"]
  c = [round(p * width) for p in (64, 128, 256, 512)]
  chex.assert_shape(params["stem_conv"]["kernel"], (3, 3, 3, c[0]))
  chex.assert_shape(params["stage2_block1"]["conv1"]["kernel"], (3, 3, c[0], c[1]))
  chex.assert_shape(params["stage2_block1"]["shortcut_conv"]["kernel"],
                    (1, 1, c[0], c[1]))
  chex.assert_shape(params["stage4_block2"]["conv2"]["kernel"], (3, 3, c[3], c[3]))
  chex.assert_shape(params["head"]["kernel"], (c[3], 10))
  assert _num_params({"params": params}) == _cifar_resnet((2, 2, 2, 2), c)


def test_width_multiplier_resnet20():
  params = _abstract_variables(models.ResNet20(width=0.5), (1, 32, 32, 3))["params"]
  chex.assert_shape(params["stem_conv"]["kernel"], (3, 3, 3, 8))
  chex.assert_shape(params["stage3_block3"]["conv2"]["kernel"], (3, 3, 32, 32))
  chex.assert_shape(params["head"]["kernel"], (32, 10))
  # Only the first block of stages 2 and 3 changes shape.
  assert "shortcut_conv" not in params["stage1_block1"]
  assert "shortcut_conv" in params["stage2_block1"]
  assert "shortcut_conv" not in params["stage2_block2"]


def test_tiny_width_keeps_one_channel():
  params = _abstract_variables(models.ResNet20(width=1e-3), (1, 32, 32, 3))["params"]
  chex.assert_shape(params["stem_conv"]["kernel"], (3, 3, 3, 1))
  chex.assert_shape(params["head"]["kernel"], (1, 10))


# ---------------------------------------------------- names seen by the pruner


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_prunable_leaves_are_exactly_the_kernels(name):
  params = _abstract_variables(
      models.get_model(name, width=SMALL_WIDTH), _input_shape(name, 1))["params"]
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  assert leaves
  for path, leaf in leaves:
    last = path[-1].key
    assert last in ("kernel", "bias", "scale"), path
    assert (leaf.ndim >= 2) == (last == "kernel"), path
    assert leaf.dtype == jnp.float32


# -------------------------------------------------------------------- registry


def test_registry_names_and_classes():
  assert set(models.MODEL_NAMES) == {
      "lenet300100", "lenet5", "vgg11", "vgg16", "vgg19", "resnet18",
      "resnet20", "resnet56"}
  m = models.get_model("vgg16", num_classes=100, width=0.5)
  assert isinstance(m, models.VGG) and m.depth == 16
  assert (m.num_classes, m.width) == (100, 0.5)
  assert models.get_model("vgg11").depth == 11
  assert models.get_model("vgg19").depth == 19
  assert isinstance(models.get_model("resnet56"), models.ResNet56)
  assert models.get_model("lenet5", width=np.float32(0.5)).width == 0.5


def test_uses_batchnorm():
  assert not models.uses_batchnorm("lenet300100")
  assert not models.uses_batchnorm("lenet5")
  for name in ("vgg11", "vgg16", "vgg19", "resnet18", "resnet20", "resnet56"):
    assert models.uses_batchnorm(name)
    assert models.MODEL_HAS_BATCHNORM[name]


def test_unknown_name_raises():
  with pytest.raises(ValueError, match="resnet1000") as e:
    models.get_model("resnet1000")
  for valid in models.MODEL_NAMES:
    assert valid in str(e.value)
  with pytest.raises(ValueError, match="alexnet"):
    models.uses_batchnorm("alexnet")


@pytest.mark.parametrize("width", [0, -1.0, float("nan"), float("inf"), True])
def test_bad_width_raises(width):
  with pytest.raises(ValueError, match="width"):
    models.get_model("lenet5", width=width)
  # Modules built directly validate too, at init time.
  with pytest.raises(ValueError, match="width"):
    _abstract_variables(models.LeNet300100(width=width), (1, 28, 28, 1))


def test_bad_vgg_depth_raises():
  with pytest.raises(ValueError, match="depth"):
    _abstract_variables(models.VGG(depth=12), (1, 32, 32, 3))


def test_vgg_takes_28x28_inputs():
  # SAME pools: 28 -> 14 -> 7 -> 4 -> 2 -> 1 (VALID pools reach 0x0: NaN).
  m = models.VGG11(width=1 / 16)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
  y = m.apply(m.init(jax.random.PRNGKey(0), x), x)
  assert y.shape == (2, 10) and bool(jnp.all(jnp.isfinite(y)))
