"""Flax Linen models for pruning experiments.

Every model takes `num_classes` and a `width` multiplier (channel/unit counts
become `max(1, round(base * width))`; the class count is never scaled), an
optional `layer_widths` mapping that sets the output units of named layers
(what `flipout_jax.compact` returns as `widths`, to rebuild a compacted
model; see `check_layer_widths`), and is called as
`model.apply(variables, x, train=...)` on NHWC float32 inputs. Models
with BatchNorm keep running statistics in the `batch_stats` collection, so
training steps pass `mutable=["batch_stats"]`; `uses_batchnorm(name)` says
which models need that.

Conv and Dense layers keep Flax's `kernel`/`bias` parameter names, so the
weight matrices and conv kernels (ndim >= 2) are what the pruning library
prunes by default, while biases and BatchNorm scales/offsets (ndim 1) are not.

The GPT-style decoder (`GPT`, in `flipout_jax.models.gpt`) takes int32 tokens
`(batch, seq)` and returns logits `(batch, seq, vocab_size)`; it has a
vocabulary instead of `num_classes` and no `width` multiplier, so it is not
one of `MODEL_NAMES` / `get_model`. Build it directly or from a named config:
`get_gpt("gpt_tiny", num_layers=12)` (`GPT_NAMES`, `GPT_CONFIGS`). The
default filter also prunes its embedding tables (ndim 2); see its docstring.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

from flipout_jax.models.gpt import (GPT, GPT_CONFIGS, GPT_NAMES,
                                    CausalSelfAttention, check_gpt_config,
                                    get_gpt)
from flipout_jax.models.lenet import (LeNet5, LeNet300100, check_layer_widths,
                                     check_width, scaled)
from flipout_jax.models.resnet import (BasicBlock, CifarResNet, ResNet18,
                                       ResNet20, ResNet56)
from flipout_jax.models.vgg import VGG, VGG11, VGG13, VGG16, VGG19

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "lenet300100": LeNet300100,
    "lenet5": LeNet5,
    "vgg11": VGG11,
    "vgg16": VGG16,
    "vgg19": VGG19,
    "resnet18": ResNet18,
    "resnet20": ResNet20,
    "resnet56": ResNet56,
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

MODEL_HAS_BATCHNORM: dict[str, bool] = {
    name: not name.startswith("lenet") for name in _REGISTRY
}


def _check_name(name: str) -> str:
  if name in GPT_NAMES:
    raise ValueError(
        f"{name!r} is a GPT config, not an image model: build it with "
        f"get_gpt({name!r}) (it takes tokens and has no num_classes/width)")
  if name not in _REGISTRY:
    raise ValueError(
        f"Unknown model name {name!r}; valid names are: "
        f"{', '.join(MODEL_NAMES)}")
  return name


def uses_batchnorm(name: str) -> bool:
  """Whether model `name` keeps BatchNorm statistics in `batch_stats`."""
  return MODEL_HAS_BATCHNORM[_check_name(name)]


def get_model(name: str, *, num_classes: int = 10,
              width: float = 1.0) -> nn.Module:
  """Builds the registered model `name` (one of `MODEL_NAMES`).

  Raises:
    ValueError: for an unknown `name`, a `width` that is not a finite
      positive number, or a `num_classes` below 1.
  """
  _check_name(name)
  width = check_width(width)
  if isinstance(num_classes, bool) or not (
      isinstance(num_classes, int) and num_classes >= 1):
    raise ValueError(
        f"num_classes must be an int >= 1, got num_classes={num_classes!r}")
  return _REGISTRY[name](num_classes=num_classes, width=width)


__all__ = [
    "BasicBlock",
    "CausalSelfAttention",
    "CifarResNet",
    "GPT",
    "GPT_CONFIGS",
    "GPT_NAMES",
    "LeNet300100",
    "LeNet5",
    "MODEL_HAS_BATCHNORM",
    "MODEL_NAMES",
    "ResNet18",
    "ResNet20",
    "ResNet56",
    "VGG",
    "VGG11",
    "VGG13",
    "VGG16",
    "VGG19",
    "check_gpt_config",
    "check_layer_widths",
    "check_width",
    "get_gpt",
    "get_model",
    "scaled",
    "uses_batchnorm",
]
