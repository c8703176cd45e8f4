"""Sparse-aware rescaling of a dense initialisation at a sparse start.

Methods that start sparse (DST's random ERK masks, a static random mask,
N:M DST) keep the dense initialisation's values on the kept weights. A
dense init of variance ``v/fan_in`` (LeCun, He, Glorot-like) then gives
output unit ``c``, which sums only ``kept_c`` of its ``fan_in`` inputs, a
pre-activation variance ``kept_c/fan_in`` times the dense one: at 98 %
sparsity the signal shrinks by ~7x per layer and a deep net may not train
at all. Evci et al. (2022, "Gradient flow in sparse neural networks and how
lottery tickets win") scale the init per unit to the sparse fan-in instead;
:func:`sparse_init` does that inside the first update, so it composes with
any pruning transformation of this library and needs no change to the
user's init code::

    tx = fj.sparse_init(fj.rigl(optax.sgd(0.1, momentum=0.9), sparsity=0.98,
                                every=100, end_step=7500))

Math: the update with count 0 additionally moves every kept weight of unit
``c`` (the last axis; Flax kernels are ``(..., in, out)``) from ``θ`` to
``θ·sqrt(fan_in/kept_c)`` (plus its ordinary update), ``fan_in`` the
product of the other axes and ``kept_c`` the unit's kept weights under the
masks of that update; pruned weights land on 0.0 as before.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from flipout_jax import core
from flipout_jax import validate


def sparse_init(tx: optax.GradientTransformation
                ) -> optax.GradientTransformationExtraArgs:
  """``tx`` with its first update rescaling the kept weights to their fan-in.

  Args:
    tx: a transformation holding one flipout_jax ``PruneState`` (e.g.
      ``fj.dst(...)``, ``fj.rigl(...)``, ``fj.prune(..., initial_masks=...)``,
      or a chain containing one); its masks after the first update decide
      ``kept_c``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``tx``'s state (so
    checkpoints and :func:`flipout_jax.get_masks` are unchanged): the update
    with ``PruneState.count == 0`` adds ``(sqrt(fan_in/kept_c) − 1)·θ`` to
    the update of every kept prunable weight; later updates are ``tx``'s.
    A unit with no kept weight is left at 0.0.

  Raises:
    ValueError: at ``init`` if ``tx``'s state holds no ``PruneState`` (the
      masks and the step count come from it).
  """
  tx = optax.with_extra_args_support(validate.transformation(tx, "tx"))

  def init_fn(params):
    state = tx.init(params)
    if not core.find_prune_states(state):
      raise ValueError(
          "tx: sparse_init needs a flipout_jax pruning transformation (its "
          "state holds no PruneState to read the masks and step count from).")
    return state

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("sparse_init: update needs params (call "
                       "tx.update(grads, state, params)).")
    first = core.find_prune_states(state)[0].count == 0
    updates, new_state = tx.update(updates, state, params, **extra_args)

    def rescale(mask, u, p):
      if mask is None:
        return u
      axes = tuple(range(p.ndim - 1))
      fan_in = math.prod(p.shape[:-1])
      kept = jnp.sum(mask, axis=axes, dtype=jnp.int32)
      scale = jnp.sqrt(jnp.float32(fan_in)
                       / jnp.maximum(kept, 1).astype(jnp.float32))
      extra = jnp.where(mask & first, (scale - 1.0) * p, 0.0)
      return (u + extra).astype(u.dtype)

    updates = jax.tree.map(rescale, core.get_masks(new_state), updates, params,
                           is_leaf=lambda x: x is None)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
