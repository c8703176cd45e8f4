"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman 2015, CIFAR variant).

This is the variant common in the pruning literature (e.g. kuangliu/pytorch-cifar):
the configured 3x3 convolutions (with bias) each followed by BatchNorm and relu,
2x2 max-pools at the 'M' entries, and a single linear classifier on the 512
remaining features instead of the three large ImageNet fully connected layers.
"""

from __future__ import annotations

import functools
from typing import Mapping, Union

import flax.linen as nn
import jax.numpy as jnp

from flipout_jax.models.lenet import Widths, check_layer_widths, scaled

# Channel counts of the 3x3 convolutions; 'M' is a 2x2 stride-2 max-pool.
CFGS: dict[int, tuple[Union[int, str], ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512,
         "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512,
         512, "M", 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
  """VGG-{11,13,16,19} with BatchNorm for 32x32 inputs.

  Architecture (channels scaled by `width`, the head output is not):

    for each entry of CFGS[depth]:
      int c: Conv c, 3x3, stride 1, SAME, with bias -> BatchNorm -> relu
      'M':   max-pool 2x2/2 (SAME padding: an odd side rounds up, so 28x28
             MNIST reaches the head as 1x1; on even sides, CIFAR's 32x32
             included, it is the usual VALID pool)
    global average pool -> Dense num_classes

  All configurations end with 512 channels and five pools, so a 32x32 input
  reaches the head as a 1x1x512 map: the global pool is then exactly the
  flatten of the reference implementation, and it also lets larger inputs
  through. The head is Linear(512*width -> num_classes).

  Parameters at width 1, 32x32x3 input, 10 classes (BatchNorm scale and bias
  counted, running statistics not): VGG-11 9,231,114; VGG-13 9,416,010;
  VGG-16 14,728,266; VGG-19 20,040,522.

  Conv layers are named conv1, conv2, ... with matching bn1, bn2, ...; the
  classifier is `head`.
  """

  num_classes: int = 10
  width: float = 1.0
  depth: int = 16
  layer_widths: Mapping[str, int] | None = None  # see check_layer_widths

  def __post_init__(self):
    check_layer_widths(self.layer_widths)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    w = Widths(self.layer_widths)
    if self.depth not in CFGS:
      raise ValueError(
          f"VGG depth must be one of {sorted(CFGS)}, got depth={self.depth!r}")
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9,
        epsilon=1e-5)
    i = 0
    for v in CFGS[self.depth]:
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        continue
      i += 1
      x = nn.Conv(w(f"conv{i}", scaled(v, self.width)), (3, 3),
                  padding="SAME", name=f"conv{i}")(x)
      x = nn.relu(norm(name=f"bn{i}")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(w("head", self.num_classes, "the classes"), name="head")(x)
    w.done()
    return x


class VGG11(VGG):
  """VGG-11 with BatchNorm for CIFAR; see `VGG`."""

  depth: int = 11


class VGG13(VGG):
  """VGG-13 with BatchNorm for CIFAR; see `VGG`."""

  depth: int = 13


class VGG16(VGG):
  """VGG-16 with BatchNorm for CIFAR; see `VGG`."""

  depth: int = 16


class VGG19(VGG):
  """VGG-19 with BatchNorm for CIFAR; see `VGG`."""

  depth: int = 19
