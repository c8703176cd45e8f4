"""FlipOut's gradient noise, scaled per tensor by the gradient's own norm.

For every selected tensor with gradient ``g`` (already masked), add
``ε ~ N(0, σ²I)`` with ``σ = λ·‖g‖₂ / sqrt(numel(g))``: noise of the gradient's
root-mean-square size times ``λ``. ``numel`` counts the whole tensor, pruned
entries included, as in the reference implementation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def noise_std(grad: jax.Array, scale: float) -> jax.Array:
  """``σ = scale · ‖grad‖₂ / sqrt(grad.size)`` as a float32 scalar."""
  g = grad.astype(jnp.float32)
  return scale * jnp.sqrt(jnp.sum(g * g) / g.size)


def add_gradient_noise(grads: PyTree, key: jax.Array, scale: float,
                       selected: PyTree) -> PyTree:
  """Adds per-tensor Gaussian noise of std ``noise_std(g, scale)``.

  Args:
    grads: gradient pytree.
    key: PRNG key; each leaf gets its own sub-key.
    scale: λ >= 0.
    selected: params-shaped tree of Python bools: which leaves get noise.

  Returns:
    ``grads`` with noise added to the selected floating-point leaves.
  """
  keys = optax.tree.split_key_like(key, grads)

  def noisy(g, k, sel):
    if not sel or not jnp.issubdtype(g.dtype, jnp.floating):
      return g
    eps = jax.random.normal(k, g.shape, jnp.float32)
    return (g + noise_std(g, scale) * eps).astype(g.dtype)

  return jax.tree.map(noisy, grads, keys, selected)
