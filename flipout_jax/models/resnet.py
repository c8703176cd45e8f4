"""CIFAR ResNets built from BasicBlocks (He et al. 2016).

Two families share one implementation, `CifarResNet`:

* ResNet-18 in the CIFAR form of kuangliu/pytorch-cifar: four stages of
  [2, 2, 2, 2] blocks with 64/128/256/512 planes behind a 3x3 stride-1 stem and
  no max-pool, so 32x32 inputs are not downsampled before the first stage.
* ResNet-20/56 from the CIFAR section of the ResNet paper: three stages of
  n = 3 / 9 blocks (depth 6n + 2) with 16/32/64 planes.

Shortcuts are the identity when the shape is unchanged and otherwise a
1x1 strided conv + BatchNorm projection (option B in the paper). The paper's
CIFAR models used option A (parameter-free zero padding); option B is used here
for both families so every downsampling path is an ordinary prunable conv,
which costs ResNet-20 2,752 extra parameters (272,474 instead of 269,722).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from flipout_jax.models.lenet import Widths, check_layer_widths, scaled


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection; see the module docstring."""

  planes: int
  strides: int
  norm: Callable[..., Any]
  # Compacted blocks: conv1's own width (None: planes) and whether the
  # shortcut is a projection (None: when the stride or the width changes).
  inner: int | None = None
  project: bool | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME")
    inner = self.planes if self.inner is None else self.inner
    y = conv(inner, (3, 3), strides=self.strides, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = conv(self.planes, (3, 3), name="conv2")(y)
    y = self.norm(name="bn2")(y)
    shortcut = x
    project = self.project
    if project is None:
      project = self.strides != 1 or x.shape[-1] != self.planes
    if project:
      shortcut = conv(self.planes, (1, 1), strides=self.strides,
                      name="shortcut_conv")(x)
      shortcut = self.norm(name="shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
  """BasicBlock ResNet for CIFAR-sized inputs; defaults give ResNet-18.

  Architecture (planes scaled by `width`, the head output is not):

    stem:  Conv stage_planes[0], 3x3, stride 1, no bias -> BatchNorm -> relu
    stage s (s = 1..len(stage_sizes)): stage_sizes[s-1] BasicBlocks with
           stage_planes[s-1] planes; the first block of every stage after the
           first has stride 2
    global average pool -> Dense num_classes (with bias)

  Every BatchNorm uses momentum 0.9 and epsilon 1e-5 and runs on batch
  statistics iff `train`. Parameter names: stem_conv, stem_bn,
  stage{s}_block{b}/{conv1,bn1,conv2,bn2,shortcut_conv,shortcut_bn}, head
  (s and b count from 1).
  """

  num_classes: int = 10
  width: float = 1.0
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  stage_planes: Sequence[int] = (64, 128, 256, 512)
  # Per-layer widths (see check_layer_widths): "stem_conv",
  # "stage{s}_block{b}/conv1", ".../conv2" and ".../shortcut_conv"; a
  # residual add ties conv2 (and shortcut_conv) to the width entering the
  # block, so those must agree.
  layer_widths: Mapping[str, int] | None = None

  def __post_init__(self):
    check_layer_widths(self.layer_widths)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    w = Widths(self.layer_widths)
    if len(self.stage_sizes) != len(self.stage_planes):
      raise ValueError(
          "stage_sizes and stage_planes must have the same length, got "
          f"{self.stage_sizes!r} and {self.stage_planes!r}")
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9,
        epsilon=1e-5)
    in_planes = scaled(self.stage_planes[0], self.width)
    x = nn.Conv(w("stem_conv", in_planes), (3, 3),
                use_bias=False, padding="SAME", name="stem_conv")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    for s, (blocks, planes) in enumerate(
        zip(self.stage_sizes, self.stage_planes)):
      planes = scaled(planes, self.width)
      for b in range(blocks):
        name = f"stage{s + 1}_block{b + 1}"
        strides = 2 if s > 0 and b == 0 else 1
        project = strides != 1 or in_planes != planes
        out = w(f"{name}/conv2", planes)
        if project:
          w(f"{name}/shortcut_conv", out, "the width of conv2, which the "
            "residual add joins")
        elif out != x.shape[-1]:
          raise ValueError(
              f"layer_widths[{name + '/conv2'!r}]: must be {x.shape[-1]}, "
              "the width entering the block, which the identity shortcut "
              f"adds to it; got {out}")
        x = BasicBlock(
            planes=out, strides=strides, norm=norm,
            inner=w(f"{name}/conv1", planes), project=project, name=name)(x)
        in_planes = planes
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(w("head", self.num_classes, "the classes"), name="head")(x)
    w.done()
    return x


class ResNet18(CifarResNet):
  """ResNet-18, CIFAR form (kuangliu/pytorch-cifar); see `CifarResNet`.

  Stages [2, 2, 2, 2] with 64/128/256/512 planes, 3x3 stride-1 stem, no
  max-pool. 11,173,962 parameters at width 1 with 10 classes.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  stage_planes: Sequence[int] = (64, 128, 256, 512)


class ResNet20(CifarResNet):
  """ResNet-20 for CIFAR (He et al. 2016, n = 3); see `CifarResNet`.

  Stages [3, 3, 3] with 16/32/64 planes and option-B (1x1 conv + BN)
  projection shortcuts. 272,474 parameters at width 1 with 10 classes
  (269,722 with the paper's parameter-free option A).
  """

  stage_sizes: Sequence[int] = (3, 3, 3)
  stage_planes: Sequence[int] = (16, 32, 64)


class ResNet56(CifarResNet):
  """ResNet-56 for CIFAR (He et al. 2016, n = 9); see `CifarResNet`.

  Stages [9, 9, 9] with 16/32/64 planes and option-B (1x1 conv + BN)
  projection shortcuts. 855,770 parameters at width 1 with 10 classes.
  """

  stage_sizes: Sequence[int] = (9, 9, 9)
  stage_planes: Sequence[int] = (16, 32, 64)
