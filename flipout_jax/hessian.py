"""Hessian-vector products for the gradient-flow importance measures.

The second-order measures of Lubana & Dick (θ·Hg, |θ·Hg|, GraSP) need the
Hessian of the loss applied to its gradient. ``Hv`` is computed
*forward-over-reverse*: the JVP of ``jax.grad(loss_fn)`` in direction ``v``,

    Hv = d/dε ∇L(θ + ε·v) |_{ε=0}  = jax.jvp(jax.grad(L), (θ,), (v,))[1],

which costs about one extra backward pass and never forms ``H``.

A *loss function* here is the user's ``loss_fn(params) -> scalar`` or, with
``batches``, ``loss_fn(params, batch) -> scalar``: the loss is then the mean
over the batches given, and ``g`` and ``Hg`` are those of that mean (as in
the authors' code, which averages ``g`` over its batches first and then
averages ``H_b·g`` over them).

Temperature (GraSP). GraSP, and the authors' code for the θ·Hg measure,
compute ``g`` and ``Hg`` from the loss with the logits divided by a
temperature ``T = 200`` (:data:`GRASP_TEMPERATURE`); the authors' code uses
``T = 1`` for |θ·Hg|. The temperature lives in the loss the user passes, e.g.
``loss_fn = softmax_cross_entropy_loss(apply_fn, temperature=200.0)``, or by
hand ``lambda p: ce(apply_fn(p, x) / 200.0, y)``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

PyTree = Any

GRASP_TEMPERATURE = 200.0
"""Logit temperature used by GraSP (Wang et al. 2020) for ``g`` and ``Hg``."""


def hvp(loss_fn: Callable[..., jax.Array], params: PyTree, vector: PyTree,
        *args: Any) -> PyTree:
  """Hessian-vector product ``∇²L(θ)·v`` by forward-over-reverse.

  Args:
    loss_fn: ``loss_fn(params, *args) -> scalar``, twice differentiable.
    params: the point ``θ`` at which the Hessian is taken.
    vector: ``v``, a pytree shaped like ``params`` (same dtypes).
    *args: passed to ``loss_fn`` after ``params`` (e.g. a batch).

  Returns:
    ``Hv`` shaped like ``params``.
  """
  return grad_and_hvp(loss_fn, params, vector, *args)[1]


def grad_and_hvp(loss_fn: Callable[..., jax.Array], params: PyTree,
                 vector: PyTree, *args: Any) -> tuple[PyTree, PyTree]:
  """``(∇L(θ), ∇²L(θ)·v)`` from one JVP of the gradient.

  The primal output of ``jax.jvp(jax.grad(L))`` is the gradient itself, so
  both come from one forward-over-reverse pass.
  """
  floats, merge = _split_inexact(params)
  grad_fn = lambda f: _grad(loss_fn, merge)(f, *args)
  return jax.jvp(grad_fn, (floats,), (_split_inexact(vector)[0],))


def _split_inexact(params: PyTree):
  """``(floats, merge)``: ``params`` with None at its non-float leaves (e.g.
  int counters, which have no gradient), and ``merge(floats)`` putting those
  leaves back. Without such leaves ``floats`` is ``params`` itself."""
  inexact = lambda x: jnp.issubdtype(jnp.result_type(x), jnp.inexact)  # pylint: disable=unnecessary-lambda-assignment
  if all(inexact(x) for x in jax.tree.leaves(params)):
    return params, lambda f: f
  others = jax.tree.map(lambda x: None if inexact(x) else x, params)
  floats = jax.tree.map(lambda x: x if inexact(x) else None, params)
  merge = lambda f: jax.tree.map(  # pylint: disable=unnecessary-lambda-assignment
      lambda a, b: b if a is None else a, f, others,
      is_leaf=lambda x: x is None)
  return floats, merge


def _grad(loss_fn, merge):
  """``∇ loss_fn(merge(floats), *args)`` w.r.t. the float leaves."""
  return jax.grad(lambda f, *args: loss_fn(merge(f), *args))


def _batch_mean(fn: Callable[[Any], PyTree], batches: Any) -> PyTree:
  """Mean of ``fn(batch)`` over the batches: a list is unrolled, any other
  pytree is a stack of batches (leading axis) and is scanned, which keeps
  memory at one batch and the trace at one body."""
  if isinstance(batches, list):
    if not batches:
      raise ValueError("hvp_batches: the list of batches is empty.")
    total = fn(batches[0])
    for b in batches[1:]:
      total = jax.tree.map(jnp.add, total, fn(b))
    n = len(batches)
  else:
    leaves = jax.tree.leaves(batches)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
      raise ValueError(
          "hvp_batches: expected a list of batches or a pytree of stacked "
          "batches (every leaf with a leading batch-index axis).")
    n = leaves[0].shape[0]
    if n == 0 or any(x.shape[0] != n for x in leaves):
      raise ValueError(
          "hvp_batches: the leaves of stacked batches must share a non-zero "
          f"leading axis; got {[tuple(x.shape) for x in leaves]}.")
    first = jax.tree.map(lambda x: x[0], batches)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        jax.eval_shape(fn, first))

    def body(acc, batch):
      return jax.tree.map(jnp.add, acc, fn(batch)), None

    total, _ = jax.lax.scan(body, init, batches)
  return jax.tree.map(lambda x: x / jnp.asarray(n, x.dtype), total)


def mean_gradient(loss_fn: Callable[..., jax.Array], params: PyTree,
                  batches: Sequence[Any] | Any | None = None) -> PyTree:
  """``g = ∇ mean_b L_b(θ)``: the gradient of ``loss_fn`` averaged over
  ``batches`` (or of ``loss_fn(params)`` when ``batches`` is None)."""
  floats, merge = _split_inexact(params)
  if batches is None:
    return _grad(loss_fn, merge)(floats)
  return _batch_mean(lambda b: _grad(loss_fn, merge)(floats, b), batches)


def gradient_and_hessian_gradient(
    loss_fn: Callable[..., jax.Array], params: PyTree,
    batches: Sequence[Any] | Any | None = None,
    masks: PyTree | None = None) -> tuple[PyTree, PyTree]:
  """The gradient ``g`` and the Hessian-gradient product ``H·g``.

  With ``batches``, ``L = mean_b loss_fn(θ, batch_b)``: first
  ``g = mean_b ∇L_b`` (one pass), then ``Hg = mean_b H_b·v`` (a second pass
  of forward-over-reverse products with the same ``v`` for every batch).

  Args:
    loss_fn: ``loss_fn(params) -> scalar``, or ``loss_fn(params, batch)``
      when ``batches`` is given.
    params: where ``g`` and ``H`` are evaluated.
    batches: None, a list of batches, or a pytree of stacked batches (every
      leaf has a leading batch-index axis; scanned).
    masks: optional mask tree (``bool`` arrays at prunable leaves, ``None``
      elsewhere). The direction is then ``v = m ⊙ g`` — the velocity of the
      masked gradient flow ``θ̇ = −m⊙g``, in which pruned weights do not
      move — instead of ``g``. Non-prunable leaves keep their gradient.

  Returns:
    ``(g, Hv)``, both shaped like ``params`` (None at non-float leaves such
    as int counters); ``g`` is not masked.
  """
  g = mean_gradient(loss_fn, params, batches)
  v = g
  if masks is not None:
    v = jax.tree.map(
        lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)),
        masks, g, is_leaf=lambda x: x is None)
  if batches is None:
    return g, hvp(loss_fn, params, v)
  return g, _batch_mean(lambda b: hvp(loss_fn, params, v, b), batches)


def softmax_cross_entropy_loss(
    apply_fn: Callable[[PyTree, Any], jax.Array], *,
    temperature: float = 1.0) -> Callable[[PyTree, tuple[Any, Any]], jax.Array]:
  """A ``loss_fn(params, (x, y))`` with tempered logits, for ``hvp_batches``.

  ``L = mean softmax_cross_entropy(apply_fn(params, x) / T, y)`` with integer
  labels ``y``. Use ``temperature=GRASP_TEMPERATURE`` (200) for GraSP / the
  θ·Hg measure as its authors did.

  Args:
    apply_fn: ``(params, x) -> logits``, e.g.
      ``lambda p, x: model.apply({"params": p}, x)``.
    temperature: ``T > 0``; logits are divided by it.

  Returns:
    ``loss_fn(params, batch)`` with ``batch = (x, y)``.
  """
  temperature = float(temperature)
  if not temperature > 0.0:
    raise ValueError(f"temperature: {temperature} must be > 0.")

  def loss_fn(params, batch):
    x, y = batch
    logits = apply_fn(params, x) / temperature
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn
