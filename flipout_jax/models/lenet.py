"""LeNet-300-100 and LeNet-5, the small MNIST baselines of the pruning literature.

Neither model has BatchNorm; both accept and ignore `train` so every model in
`flipout_jax.models` can be called the same way by the training loop.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp

from flipout_jax import validate


def check_width(width: float) -> float:
  """Returns `width` as a float; raises ValueError unless it is finite and > 0."""
  if (isinstance(width, bool) or not isinstance(width, numbers.Real)
      or not math.isfinite(width) or width <= 0):
    raise ValueError(f"width must be a finite number > 0, got width={width!r}")
  return float(width)


def scaled(base: int, width: float) -> int:
  """Number of channels/units for `base` under the width multiplier `width`.

  Returns `max(1, round(base * width))`, so narrow variants never lose a layer.

  Raises:
    ValueError: if `width` is not a finite positive number.
  """
  return max(1, int(round(base * check_width(width))))


def check_layer_widths(layer_widths) -> Mapping[str, int] | None:
  """Validates per-layer widths: None, or a mapping ``{layer name: int >= 1}``.

  Every model of :mod:`flipout_jax.models` takes ``layer_widths``: the output
  units of the named layers (Dense/Conv names as in the params, e.g.
  ``"conv1"`` or ``"stage1_block1/conv2"``), overriding ``width``; it is what
  :func:`flipout_jax.compact` returns as ``widths``, so a compacted model is
  rebuilt as ``Model(layer_widths=result.widths)``.

  Raises:
    ValueError: naming the argument (and the entry) that is not valid.
  """
  if layer_widths is None:
    return None
  if not isinstance(layer_widths, Mapping):
    raise ValueError(
        "layer_widths: must be None or a mapping {layer name: int >= 1}, "
        f"got {type(layer_widths).__name__}")
  for name, value in layer_widths.items():
    if not isinstance(name, str):
      raise ValueError(f"layer_widths: keys must be layer names (str), got "
                       f"{name!r}")
    validate.integer(value, f"layer_widths[{name!r}]", low=1)
  return layer_widths


class Widths:
  """The widths of one model call: ``layer_widths`` where given, else the
  default; :meth:`done` rejects names that are no layer of the model."""

  def __init__(self, layer_widths: Mapping[str, int] | None):
    self.given = dict(layer_widths or {})
    self.used: list[str] = []

  def __call__(self, name: str, default: int, fixed: str = "") -> int:
    """The width of layer ``name``; with ``fixed`` (why), only ``default``
    is accepted."""
    self.used.append(name)
    value = int(self.given.get(name, default))
    if fixed and value != default:
      raise ValueError(f"layer_widths[{name!r}]: must be {default} "
                       f"({fixed}), got {value}")
    return value

  def done(self) -> None:
    unknown = sorted(set(self.given) - set(self.used))
    if unknown:
      raise ValueError(
          f"layer_widths: {unknown[0]!r} is not a layer of this model; its "
          f"layers are {', '.join(self.used)}")


class LeNet300100(nn.Module):
  """LeNet-300-100 (LeCun et al. 1998), as used by Han et al. 2015 and later work.

  Architecture (units scaled by `width`, the head is not):

    flatten -> Dense 300 -> relu -> Dense 100 -> relu -> Dense num_classes

  Parameters at width 1, 28x28x1 input, 10 classes:
  784*300+300 + 300*100+100 + 100*10+10 = 235,500 + 30,100 + 1,010 = 266,610.
  """

  num_classes: int = 10
  width: float = 1.0
  layer_widths: Mapping[str, int] | None = None  # see check_layer_widths

  def __post_init__(self):
    check_layer_widths(self.layer_widths)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # No BatchNorm or dropout.
    w = Widths(self.layer_widths)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(w("fc1", scaled(300, self.width)), name="fc1")(x))
    x = nn.relu(nn.Dense(w("fc2", scaled(100, self.width)), name="fc2")(x))
    x = nn.Dense(w("fc3", self.num_classes, "the classes"), name="fc3")(x)
    w.done()
    return x


class LeNet5(nn.Module):
  """LeNet-5, the Caffe-style variant used in pruning papers.

  Architecture (channels/units scaled by `width`, the head is not):

    conv1: Conv 6, 5x5, stride 1, SAME  -> relu -> max-pool 2x2/2   28x28x1 -> 14x14x6
    conv2: Conv 16, 5x5, stride 1, VALID -> relu -> max-pool 2x2/2  14x14x6 -> 5x5x16
    flatten                                                          -> 400
    fc1: Dense 120 -> relu
    fc2: Dense 84 -> relu
    fc3: Dense num_classes

  The SAME padding on conv1 keeps the classic 5x5x16 = 400 feature map on
  28x28 MNIST, which the original network got by padding MNIST to 32x32.

  Parameters at width 1, 28x28x1 input, 10 classes:

    conv1  5*5*1*6   + 6   =    156
    conv2  5*5*6*16  + 16  =  2,416
    fc1    400*120   + 120 = 48,120
    fc2    120*84    + 84  = 10,164
    fc3    84*10     + 10  =    850
    total                  = 61,706
  """

  num_classes: int = 10
  width: float = 1.0
  layer_widths: Mapping[str, int] | None = None  # see check_layer_widths

  def __post_init__(self):
    check_layer_widths(self.layer_widths)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # No BatchNorm or dropout.
    w = Widths(self.layer_widths)
    x = nn.Conv(w("conv1", scaled(6, self.width)), (5, 5), padding="SAME",
                name="conv1")(x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.Conv(w("conv2", scaled(16, self.width)), (5, 5), padding="VALID",
                name="conv2")(x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(w("fc1", scaled(120, self.width)), name="fc1")(x))
    x = nn.relu(nn.Dense(w("fc2", scaled(84, self.width)), name="fc2")(x))
    x = nn.Dense(w("fc3", self.num_classes, "the classes"), name="fc3")(x)
    w.done()
    return x
