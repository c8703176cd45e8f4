"""Argument checks shared by every public constructor of the library.

Each check takes a value and the argument's name, returns the value in
canonical form (a Python ``int``, ``float``, ``bool`` or ``str``) and raises
``ValueError`` whose message starts with the argument's name and states its
valid range. Booleans are never numbers here (``every=True`` is an
error), strings never numbers (``sparsity='0.5'`` is an error), and every
number must be finite.

**Static and traceable arguments.** ``optax.inject_hyperparams(fj.flipout)``
re-calls the constructor inside every update with its numeric arguments as
jnp scalars: concrete at ``init``, traced under ``jax.jit``.

* *Traceable* arguments (``traceable=True``: FlipOut's ``noise_scale`` and
  ``p``, DST's ``drop_fraction``, ...) only enter the traced update. A jax
  array is returned as is: range-checked when it is concrete, unchecked
  when it is a tracer (its value is unknown until run time).
* *Static* arguments (sparsity, steps, rates, seeds, ...) shape the
  schedule, the keep-count table or the PRNG key, which must be known when
  the update is traced. A jax array, concrete or traced, is an error that
  names the argument and says to list it in ``static_args``.

This module depends on nothing else in the library.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import numpy as np

# The step counter is an int32 that saturates at INT32_MAX
# (optax.safe_increment), so an event there would fire on every later update.
INT32_MAX = 2**31 - 1
MAX_STEP = INT32_MAX - 1
SEED_MAX = 2**63 - 1


def is_traced(value: Any) -> bool:
  """True for a JAX tracer (a value inside ``jit``/``grad``/``vmap``)."""
  return isinstance(value, jax.core.Tracer)


def is_dynamic(value: Any) -> bool:
  """True for a jax array (traced or concrete): a traceable argument that
  ``inject_hyperparams`` may change at run time."""
  return isinstance(value, jax.Array)


def interval(low=None, high=None, low_open=False, high_open=False) -> str:
  """The range ``[low, high)`` etc. as text (``>= low`` if unbounded)."""
  if high is None:
    return "any" if low is None else f"{'>' if low_open else '>='} {low}"
  if low is None:
    return f"{'<' if high_open else '<='} {high}"
  return (f"{'(' if low_open else '['}{low}, {high}"
          f"{')' if high_open else ']'}")


def static_error(name: str, value: Any) -> ValueError:
  """The error for a jax array given to a static argument."""
  kind = "a traced value" if is_traced(value) else "a jax array"
  return ValueError(
      f"{name}: got {kind}, but {name} is static: it fixes the schedule, the "
      "keep-counts or the PRNG key when the update is traced, so it must be "
      "a Python number. Under optax.inject_hyperparams, list it in "
      f"static_args, e.g. optax.inject_hyperparams(fj.flipout, static_args="
      f"('{name}', ...)).")


def _what(kind: str, low=None, high=None, low_open=False,
          high_open=False) -> str:
  """E.g. ``"a number in [0, 1)"``, ``"an int >= 1"``."""
  if high in (MAX_STEP, INT32_MAX) and low is not None:
    return f"{kind} >= {low} (and <= {high}: the int32 step counter)"
  rng = interval(low, high, low_open, high_open)
  if rng == "any":
    return kind
  return f"{kind} in {rng}" if low is not None and high is not None else (
      f"{kind} {rng}")


def _describe(value: Any) -> str:
  return f"{value!r} ({type(value).__name__})"


def _scalar(value: Any, name: str, what: str, *, static: bool):
  """``value`` as a Python scalar, or a jax array if traceable (else raises)."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name}: must be {what}, got the bool {value!r}.")
  if isinstance(value, jax.Array):
    if static:
      raise static_error(name, value)
    if value.ndim:
      raise ValueError(f"{name}: must be {what} (a scalar), got an array of "
                       f"shape {value.shape}.")
    return value
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, numbers.Real):
    return value
  raise ValueError(f"{name}: must be {what}, got {_describe(value)}.")


def number(value: Any, name: str, *, low=None, high=None,
           low_open: bool = False, high_open: bool = False,
           traceable: bool = False):
  """A finite real number in the given range.

  Args:
    value: the argument.
    name: its name, first in every error message.
    low, high: bounds (None: unbounded).
    low_open, high_open: exclude the bound.
    traceable: pass a jax array through (range-checked if concrete).

  Returns:
    ``float(value)``, or ``value`` itself if it is a jax array (traceable).
  """
  x = _scalar(value, name, _what("a number", low, high, low_open, high_open),
              static=not traceable)
  if is_traced(x):
    return x
  f = float(x)
  ok = math.isfinite(f)
  ok = ok and (low is None or (f > low if low_open else f >= low))
  ok = ok and (high is None or (f < high if high_open else f <= high))
  if not ok:
    raise ValueError(f"{name}: must be "
                     f"{_what('a finite number', low, high, low_open, high_open)}"
                     f", got {f!r}.")
  return x if isinstance(x, jax.Array) else f


def integer(value: Any, name: str, *, low=None, high=None) -> int:
  """An int (Python or NumPy; not a bool, float or jax array) in
  ``[low, high]``."""
  what = _what("an int", low, high)
  x = _scalar(value, name, what, static=True)
  if not isinstance(x, numbers.Integral):
    raise ValueError(f"{name}: must be {what}, got {_describe(value)}.")
  x = int(x)
  if (low is not None and x < low) or (high is not None and x > high):
    raise ValueError(f"{name}: must be {what}, got {x}.")
  return x


def sparsity(value: Any, name: str = "sparsity") -> float:
  """A sparsity target: a number in [0, 1) (static)."""
  return number(value, name, low=0, high=1, high_open=True)


def step(value: Any, name: str, low: int = 0, high: int = MAX_STEP) -> int:
  """A step count in ``[low, high]`` (default: what the int32 counter
  reaches and leaves, ``[0, 2**31 − 2]``)."""
  return integer(value, name, low=low, high=high)


def ordered(value, name: str, bound, bound_name: str, *,
            strict: bool = True) -> None:
  """Raises unless ``value > bound`` (``>=`` if not ``strict``), naming
  both arguments, e.g. ``end_step: must be > start_step (10), got 5``."""
  if value < bound or (strict and value == bound):
    raise ValueError(f"{name}: must be {'>' if strict else '>='} "
                     f"{bound_name} ({bound}), got {value!r}.")


def prng_key(value: Any, name: str = "key"):
  """One PRNG key (``jax.random.key(i)`` or ``jax.random.PRNGKey(i)``), maybe
  traced, as a raw ``uint32[2]`` key; None if ``value`` is not a key array
  at all (the caller decides what else it accepts).

  Raises:
    ValueError: for an array of several typed keys.
  """
  if not isinstance(value, jax.Array):
    return None
  if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    if value.shape:
      raise ValueError(f"{name}: must be one PRNG key, got keys of shape "
                       f"{value.shape}.")
    return jax.random.key_data(value)
  if value.shape == (2,) and value.dtype == np.uint32:
    return value
  return None


def seed(value: Any, name: str = "seed"):
  """A PRNG seed: an int in ``[0, 2**63 − 1]``, or a PRNG key.

  A key (``jax.random.key(i)`` or ``jax.random.PRNGKey(i)``) may be traced,
  e.g. a per-seed key inside ``jax.vmap``; it is returned as a raw
  ``uint32[2]`` key. An int is static.
  """
  key = prng_key(value, name)
  if key is not None:
    return key
  return integer(value, name, low=0, high=SEED_MAX)


def boolean(value: Any, name: str) -> bool:
  """``True`` or ``False`` (NumPy bools too)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name}: must be True or False, got {_describe(value)}.")
  return bool(value)


def choice(value: Any, name: str, valid: Sequence[str]) -> str:
  """One of the strings ``valid``."""
  if not isinstance(value, str) or value not in valid:
    raise ValueError(f"{name}: unknown value {value!r}; valid values are "
                     f"{tuple(valid)}.")
  return value


def optional_callable(value: Any, name: str):
  """None or a callable."""
  if value is not None and not callable(value):
    raise ValueError(f"{name}: must be None or a callable, got "
                     f"{_describe(value)}.")
  return value


def transformation(value: Any, name: str = "inner"):
  """An optax transformation: an object with callable ``init`` and
  ``update``."""
  if not (callable(getattr(value, "init", None))
          and callable(getattr(value, "update", None))):
    raise ValueError(
        f"{name}: must be an optax GradientTransformation (with init and "
        f"update), got {_describe(value)}.")
  return value


def last_event_step(last: int, name: str, detail: str) -> None:
  """Raises if an event at step ``last`` would be beyond the int32 counter.

  Args:
    last: the step of the last event.
    name: the argument that puts it there (e.g. ``every``).
    detail: how ``last`` follows from the arguments, for the message.
  """
  if last > MAX_STEP:
    raise ValueError(
        f"{name}: the last event would be at step {last} ({detail}), beyond "
        f"the int32 step counter: event steps must be in [0, {MAX_STEP}] "
        "(the count saturates at 2**31 - 1).")


def same_tree(tree: Any, reference: Any, name: str,
              reference_name: str = "params") -> None:
  """Raises unless ``tree`` has ``reference``'s structure and leaf shapes.

  None counts as a leaf on both sides (an empty subtree, as optax treats
  it). The message names ``name`` and the first leaf path that differs.
  """
  is_none = lambda x: x is None  # pylint: disable=unnecessary-lambda-assignment
  flat, tdef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
  ref, rdef = jax.tree_util.tree_flatten_with_path(reference, is_leaf=is_none)
  if tdef != rdef:
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    ref_paths = [jax.tree_util.keystr(p) for p, _ in ref]
    extra = [p for p in paths if p not in set(ref_paths)]
    missing = [p for p in ref_paths if p not in set(paths)]
    where = (f"{reference_name} has no leaf {extra[0]}" if extra else
             f"it has no leaf {missing[0]} of {reference_name}" if missing
             else f"its structure is {tdef}, {reference_name}'s is {rdef}")
    raise ValueError(f"{name}: the tree does not match {reference_name}: "
                     f"{where}.")
  for (path, leaf), (_, r) in zip(flat, ref):
    shape, ref_shape = np.shape(leaf), np.shape(r)
    if (leaf is None) != (r is None) or shape != ref_shape:
      raise ValueError(
          f"{name}: leaf {jax.tree_util.keystr(path)} has shape "
          f"{None if leaf is None else shape}, but {reference_name} has "
          f"{None if r is None else ref_shape} there.")
