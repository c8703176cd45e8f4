"""LeNet-300-100 and LeNet-5, the small MNIST baselines of the pruning literature.

Neither model has BatchNorm; both accept and ignore `train` so every model in
`flipout_jax.models` can be called the same way by the training loop.
"""

from __future__ import annotations

import math
import numbers

import flax.linen as nn
import jax.numpy as jnp


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


class LeNet300100(nn.Module):
  """LeNet-300-100 (LeCun et al. 1998), as used by Han et al. 2015 and later work.

  Architecture (units scaled by `width`, the head is not):

    flatten -> Dense 300 -> relu -> Dense 100 -> relu -> Dense num_classes

  Parameters at width 1, 28x28x1 input, 10 classes:
  784*300+300 + 300*100+100 + 100*10+10 = 235,500 + 30,100 + 1,010 = 266,610.
  """

  num_classes: int = 10
  width: float = 1.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # No BatchNorm or dropout.
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(scaled(300, self.width), name="fc1")(x))
    x = nn.relu(nn.Dense(scaled(100, self.width), name="fc2")(x))
    return nn.Dense(self.num_classes, name="fc3")(x)


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

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # No BatchNorm or dropout.
    x = nn.Conv(scaled(6, self.width), (5, 5), padding="SAME", name="conv1")(x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.Conv(scaled(16, self.width), (5, 5), padding="VALID", name="conv2")(x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(scaled(120, self.width), name="fc1")(x))
    x = nn.relu(nn.Dense(scaled(84, self.width), name="fc2")(x))
    return nn.Dense(self.num_classes, name="fc3")(x)
