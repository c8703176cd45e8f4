"""Every pruning method of the library by name.

    import flipout_jax as fj
    fj.registry.names()                      # ('flipout', 'global_magnitude', ...)
    fj.registry.keywords("movement")         # {'sparsity': REQUIRED, 'every': 1, ...}
    tx = fj.registry.build("movement", optax.adam(1e-3), sparsity=0.9,
                           start_step=0, end_step=1000)

A method is a constructor ``(inner, **keywords) -> optax transformation``;
its keyword arguments are read from its signature, its documentation is its
docstring. ``every``, ``start_step`` and ``end_step`` mean the same in every
method (README, "Vocabulary"). A new method is one module under ``flipout_jax/methods`` plus one
line in :data:`METHODS`. Wrappers of a transformation (``sparse_init``) and
regularisers without masks (``hoyer_square``) are not methods.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import optax

from flipout_jax import core
from flipout_jax.methods import dst
from flipout_jax.methods import flipout
from flipout_jax.methods import gradient_flow
from flipout_jax.methods import movement
from flipout_jax.methods import one_shot
from flipout_jax.methods import st3
from flipout_jax.unipts import dst as unipts_dst

Constructor = Callable[..., optax.GradientTransformation]

# name -> constructor; names are the public ones (fj.<name>, fj.unipts.<name>).
METHODS: dict[str, Constructor] = {
    "prune": core.prune,
    "flipout": flipout.flipout,
    "global_magnitude": flipout.global_magnitude,
    "random_pruning": flipout.random_pruning,
    "snip": one_shot.snip,
    "fixed_mask": one_shot.fixed_mask,
    "st3": st3.st3,
    "dst": dst.dst,
    "dst_ee": dst.dst_ee,
    "rigl": dst.rigl,
    "set_": dst.set_,
    "gradient_flow": gradient_flow.gradient_flow,
    "grasp": gradient_flow.grasp,
    "unipts.sparse_training": unipts_dst.sparse_training,
    "movement": movement.movement,
}


class _Required:
  """The default of a keyword argument without one."""

  def __repr__(self) -> str:
    return "REQUIRED"


REQUIRED = _Required()


class MethodInfo(NamedTuple):
  """One registered method.

  Attributes:
    name: its registry name.
    constructor: ``(inner, **keywords) -> transformation``.
    summary: the first line of its docstring.
    keywords: every argument after ``inner`` -> its default
      (:data:`REQUIRED` if none), in signature order.
  """
  name: str
  constructor: Constructor
  summary: str
  keywords: dict[str, Any]


def names() -> tuple[str, ...]:
  """The registered names, in registration order."""
  return tuple(METHODS)


def get(name: str) -> Constructor:
  """The constructor registered as ``name``.

  Raises:
    ValueError: naming ``name`` and the valid names, if it is not registered.
  """
  if not isinstance(name, str) or name not in METHODS:
    raise ValueError(f"name: unknown method {name!r}; valid methods are "
                     f"{names()}.")
  return METHODS[name]


def keywords(name: str) -> dict[str, Any]:
  """``name``'s arguments after ``inner``: argument -> default or
  :data:`REQUIRED`, from its signature."""
  params = list(inspect.signature(get(name)).parameters.values())[1:]
  return {p.name: REQUIRED if p.default is inspect.Parameter.empty
          else p.default for p in params}


def info(name: str) -> MethodInfo:
  """The :class:`MethodInfo` of ``name``."""
  doc = inspect.getdoc(get(name)) or ""
  return MethodInfo(name, get(name), doc.split("\n", 1)[0], keywords(name))


def list_methods() -> list[MethodInfo]:
  """Every registered method's :class:`MethodInfo`, in registration order."""
  return [info(n) for n in METHODS]


def build(name: str, inner: optax.GradientTransformation,
          **kwargs) -> optax.GradientTransformation:
  """``get(name)(inner, **kwargs)``, naming unknown or missing keywords.

  Raises:
    ValueError: for an unknown ``name``, a keyword ``name`` does not take or
      a required one not given (then also whatever the constructor raises).
  """
  valid = keywords(name)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(f"{unknown[0]}: not an argument of {name}; valid "
                     f"arguments are {tuple(valid)}.")
  missing = [k for k, v in valid.items() if v is REQUIRED and k not in kwargs]
  if missing:
    raise ValueError(f"{missing[0]}: required by {name}, not given.")
  return get(name)(inner, **kwargs)
