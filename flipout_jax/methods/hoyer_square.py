"""Hoyer-Square regularisation (Yang, Wen & Li 2020) and threshold pruning.

``R(θ) = λ·Σ_l (Σ_i |θ_li|)² / Σ_i θ_li²`` over the prunable tensors l: a
scale-invariant, almost-everywhere differentiable proxy of the L0 norm. Train
with its gradient added, prune every weight below a small threshold, then
fine-tune under the fixed mask (:func:`flipout_jax.fixed_mask`).

Deviation from the reference code: the penalty and the threshold apply to
the prunable kernels only (``filter_fn``; by default the float leaves with
``ndim >= 2``, i.e. Dense and Conv kernels); biases and normalisation
parameters are neither regularised nor pruned.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from flipout_jax import trees
from flipout_jax import validate


def hoyer_square_penalty(params: Any, prunable: Any) -> jax.Array:
  """``Σ_l (Σ|θ_l|)² / Σθ_l²`` over the leaves where ``prunable`` is True.

  An all-zero tensor contributes 0 (and gets a zero gradient).
  """
  def term(p):
    # sign(θ)·θ = |θ| with gradient sign(θ): 0 at θ = 0, as in the reference
    # (jnp.abs would give a gradient of 1 there and push zeros away).
    l1 = jnp.sum(jax.lax.stop_gradient(jnp.sign(p)) * p)
    l2sq = jnp.sum(p * p)
    safe = jnp.where(l2sq > 0, l2sq, 1.0)
    return jnp.where(l2sq > 0, l1 * l1 / safe, 0.0)

  total = jnp.float32(0.0)
  for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(prunable)):
    if s:
      total = total + term(p.astype(jnp.float32))
  return total


def hoyer_square(strength: float, filter_fn=None) -> optax.GradientTransformation:
  """Adds ``∇(λ·Σ_l (Σ|θ_l|)²/Σθ_l²)`` to the gradient.

  Chain it before the optimizer: ``optax.chain(fj.hoyer_square(1e-4),
  optax.sgd(0.1, momentum=0.9))``.

  Args:
    strength: λ, finite and >= 0 (paper: 6e-5 VGG19, 1e-4 ResNet18, 3e-4
      DenseNet121); may be traced.
    filter_fn: which leaves are regularised (default: the prunable kernels).

  Returns:
    A stateless transformation.
  """
  # Only used inside the update: traceable (optax.inject_hyperparams).
  strength = validate.number(strength, "strength", low=0, traceable=True)
  validate.optional_callable(filter_fn, "filter_fn")

  def init_fn(params):
    trees.prunable_tree(params, filter_fn)  # validates the filter early
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("hoyer_square: update needs params.")
    prunable = trees.prunable_tree(params, filter_fn)
    reg = jax.grad(lambda p: strength * hoyer_square_penalty(p, prunable))(params)
    updates = jax.tree.map(lambda u, r: u + r.astype(u.dtype), updates, reg)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def threshold_prune(params: Any, threshold: float = 1e-4, filter_fn=None):
  """Zeroes every prunable weight with ``|θ| < threshold``.

  Args:
    params: the trained params.
    threshold: finite and > 0; the paper uses 1e-4 (may be traced).
    filter_fn: which leaves are prunable.

  Returns:
    ``(params, masks)``: params with those weights at exactly 0.0, and the
    mask tree (True = kept) to fine-tune with :func:`flipout_jax.fixed_mask`.
  """
  threshold = validate.number(threshold, "threshold", low=0, low_open=True,
                              traceable=True)
  prunable = trees.prunable_tree(params, filter_fn)
  masks = jax.tree.map(lambda p, s: jnp.abs(p) >= threshold if s else None,
                       params, prunable)
  return trees.apply_masks(params, masks), masks
