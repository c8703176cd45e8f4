"""Importance scores: which weights matter. Higher score = kept longer.

A score function takes a :class:`ScoreContext` and returns a tree in mask
layout (a float array per prunable leaf, ``None`` elsewhere). Scores are
computed only on pruning steps, inside ``lax.cond``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flipout_jax import hessian
from flipout_jax import trees

PyTree = Any


class ScoreContext(NamedTuple):
  """What a score function (or mask rule) may look at on a pruning step."""
  step: jax.Array  # int32 []: the step count of this update (0-based)
  masks: PyTree  # mask tree before this event: bool[shape] / None
  params: PyTree  # weights after this step's update (pruned entries are 0)
  old_params: PyTree  # weights before this step's update
  grads: PyTree  # this step's masked loss gradient at old_params, before noise
  dense_grads: PyTree  # the same gradient before masking (RigL-style growth)
  method_state: PyTree  # per-method state (e.g. int32 flip counts)
  key: jax.Array  # PRNG key reserved for this event
  extra_args: dict[str, Any]  # extra keyword arguments given to update


ScoreFn = Callable[[ScoreContext], PyTree]


def magnitude(ctx: ScoreContext) -> PyTree:
  """``|θ|`` of the weights after the step (global magnitude pruning)."""
  return trees.map_prunable(lambda m, p: jnp.abs(p), ctx.masks, ctx.params)


def flipout_saliency(p: float = 2.0) -> ScoreFn:
  """FlipOut: ``τ = |θ|^p / (flips + 1)`` with flips from ``method_state``."""

  def score(ctx: ScoreContext) -> PyTree:
    return trees.map_prunable(
        lambda m, w, f: jnp.abs(w.astype(jnp.float32)) ** p / (f + 1.0),
        ctx.masks, ctx.params, ctx.method_state)

  return score


def random(ctx: ScoreContext) -> PyTree:
  """Uniform random scores: prune uniformly among the surviving weights."""
  keys = optax.tree.split_key_like(ctx.key, ctx.params)
  return trees.map_prunable(
      lambda m, p, k: jax.random.uniform(k, p.shape), ctx.masks, ctx.params, keys)


def snip(ctx: ScoreContext) -> PyTree:
  """SNIP connection sensitivity ``|θ·g|`` at the weights the gradient was
  taken at (the step's starting point)."""
  return trees.map_prunable(
      lambda m, p, g: jnp.abs(p * g), ctx.masks, ctx.old_params, ctx.grads)


# ---------------------------------------------------------------------------
# Gradient-flow importance measures (Lubana & Dick, ICLR 2021).
#
# Under gradient flow θ̇ = −g:  d‖θ‖²/dt = −2θᵀg  and
# d²‖θ‖²/dt² = 2‖g‖² + 2θᵀHg. Each measure scores how much a weight
# contributes to one of these terms; higher = kept longer.
# ---------------------------------------------------------------------------

GRADIENT_FLOW_MEASURES = (
    "magnitude",                    # |θ|
    "loss_preservation",            # |θ·g|
    "loss_preservation_magnitude",  # |θ²·g|
    "gradient_norm",                # θ·Hg   (GraSP-like; signed)
    "gradient_norm_preservation",   # |θ·Hg|
)
HESSIAN_MEASURES = ("gradient_norm", "gradient_norm_preservation")
GRADIENT_MEASURES = ("loss_preservation", "loss_preservation_magnitude")


def check_gradient_flow_measure(measure: str) -> str:
  """Returns ``measure`` or raises ValueError naming the valid measures."""
  if measure not in GRADIENT_FLOW_MEASURES:
    raise ValueError(f"measure: unknown value {measure!r}; valid values are "
                     f"{GRADIENT_FLOW_MEASURES}.")
  return measure


def _weight_importance(measure, theta, g, hg):
  if measure == "magnitude":
    return jnp.abs(theta)
  if measure == "loss_preservation":
    return jnp.abs(theta * g)
  if measure == "loss_preservation_magnitude":
    return jnp.abs(theta * theta * g)
  if measure == "gradient_norm":
    return theta * hg
  return jnp.abs(theta * hg)  # gradient_norm_preservation


def _filter_importance(measure, theta, g, hg):
  # A filter / neuron is one index of the last (output) axis of a Flax
  # kernel (..., in, out); reduce over every other axis. The aggregation
  # follows the authors' code: ‖θ_f‖₂ for magnitude, Σ_f|θg| and Σ_f|θ²g|
  # (sum of absolute values), Σ_f θHg (signed) and |Σ_f θHg| (absolute value
  # of the sum) for the two Hessian measures.
  axes = tuple(range(jnp.ndim(theta) - 1))
  if measure == "magnitude":
    return jnp.sqrt(jnp.sum(theta * theta, axis=axes))
  if measure == "gradient_norm_preservation":
    return jnp.abs(jnp.sum(theta * hg, axis=axes))
  return jnp.sum(_weight_importance(measure, theta, g, hg), axis=axes)


def gradient_flow_importance(measure: str, params: PyTree,
                             grads: PyTree | None = None,
                             hvp: PyTree | None = None, *,
                             structured: bool = False,
                             broadcast: bool = False) -> PyTree:
  """The gradient-flow importance measures, per weight or per filter.

  Per weight (``structured=False``), with ``θ`` the weights, ``g`` the loss
  gradient and ``Hg`` the Hessian-gradient product at ``θ``:

  ====================================  ==============  ==================
  measure                               per weight      per filter f
  ====================================  ==============  ==================
  ``"magnitude"``                       ``|θ|``         ``‖θ_f‖₂``
  ``"loss_preservation"``               ``|θ·g|``       ``Σ_f |θ·g|``
  ``"loss_preservation_magnitude"``     ``|θ²·g|``      ``Σ_f |θ²·g|``
  ``"gradient_norm"``                   ``θ·Hg``        ``Σ_f θ·Hg``
  ``"gradient_norm_preservation"``      ``|θ·Hg|``      ``|Σ_f θ·Hg|``
  ====================================  ==============  ==================

  Higher = more important (kept longer). ``"gradient_norm"`` is signed, so
  the *most negative* ``θ·Hg`` is pruned first, as GraSP does (removing such
  a weight, ``δ = −θ``, raises the gradient norm: ``Δ‖g‖² ≈ −2θ·Hg``); the
  proposed measures take absolute values. A filter (structured) is one index
  of the last axis of a kernel — a Dense output neuron or a Conv output
  channel of Flax's ``(..., in, out)`` layout — aggregated over all other
  axes as the authors' code does.

  Args:
    measure: one of :data:`GRADIENT_FLOW_MEASURES`.
    params: ``θ``, an array or a pytree of arrays.
    grads: ``g`` shaped like ``params``; needed by the two loss-preservation
      measures.
    hvp: ``Hg`` shaped like ``params`` (see
      :func:`flipout_jax.hessian.gradient_and_hessian_gradient`); needed by
      the two gradient-norm measures.
    structured: score output filters instead of single weights.
    broadcast: with ``structured``, broadcast each filter's score back to
      the kernel's shape (as a :data:`ScoreFn` must return).

  Returns:
    A pytree like ``params`` of per-weight scores, or (``structured``) of
    per-filter vectors ``[out]`` (kernel-shaped with ``broadcast``).

  Raises:
    ValueError: unknown ``measure``, or ``grads``/``hvp`` missing when the
      measure needs it.
  """
  check_gradient_flow_measure(measure)
  if measure in GRADIENT_MEASURES and grads is None:
    raise ValueError(f"grads: measure {measure!r} needs the gradient g.")
  if measure in HESSIAN_MEASURES and hvp is None:
    raise ValueError(f"hvp: measure {measure!r} needs the Hessian-gradient "
                     "product Hg.")
  theta_leaves, treedef = jax.tree.flatten(params)

  def leaves_of(tree):
    if tree is None:
      return [None] * len(theta_leaves)
    return treedef.flatten_up_to(tree)

  out = [_leaf_importance(measure, t, g, h, structured, broadcast)
         for t, g, h in zip(theta_leaves, leaves_of(grads), leaves_of(hvp))]
  return jax.tree.unflatten(treedef, out)


def _leaf_importance(measure, theta, g, hg, structured, broadcast):
  if not structured:
    return _weight_importance(measure, theta, g, hg)
  per_filter = _filter_importance(measure, theta, g, hg)
  if broadcast:
    return jnp.broadcast_to(per_filter, jnp.shape(theta))
  return per_filter


_MISSING_LOSS = (
    "loss_fn: measure {measure!r} needs the loss to compute the "
    "Hessian-gradient product Hg, and update got no loss_fn. Pass it to "
    "every update call, e.g. tx.update(grads, state, params, "
    "loss_fn=lambda p: loss(p, batch)), or loss_fn=lambda p, b: loss(p, b) "
    "with hvp_batches=[batch1, batch2, ...] (or stacked batches) to average "
    "over several batches. It is only evaluated on pruning steps (inside "
    "lax.cond), so passing it on every step costs nothing on the others.")


def gradient_flow_score(measure: str, *, structured: bool = False) -> ScoreFn:
  """A :data:`ScoreFn` for one of the gradient-flow measures.

  Where the measures are evaluated: at ``θ = ctx.old_params``, the weights
  the step's gradient was taken at, so that ``θ``, ``g`` and ``Hg`` all refer
  to the same point (the weights after the step differ by one inner update).
  ``θ`` is masked, so dead weights contribute nothing to filter sums.

  Which gradient:

  * ``loss_fn`` given to ``update`` (``extra_args``): ``g = ∇L(θ)`` of that
    loss — the mean over ``hvp_batches`` if given — for every measure that
    uses ``g``; and ``Hg = H(θ)·(m⊙g)`` by forward-over-reverse, ``m`` the
    masks before the event (the masked flow's velocity: pruned weights do
    not move; non-prunable leaves such as biases keep their full gradient).
  * no ``loss_fn``: the two loss-preservation measures use the step's own
    (masked, noise-free) gradient ``ctx.grads``; the two gradient-norm
    measures raise ValueError at trace time (see ``_MISSING_LOSS``).

  ``loss_fn(params) -> scalar``, or ``loss_fn(params, batch)`` with
  ``hvp_batches`` a list of batches or a pytree of stacked batches. It must
  return the scalar only: with BatchNorm, close over the batch statistics
  and use them in inference mode (the authors compute g and Hg with the
  network in eval mode). For GraSP's temperature (logits / 200) build the
  loss with it, e.g. :func:`flipout_jax.hessian.softmax_cross_entropy_loss`.

  Args:
    measure: one of :data:`GRADIENT_FLOW_MEASURES`.
    structured: score whole output filters (last kernel axis); the filter
      score is broadcast to the kernel shape.

  Returns:
    A score function for :func:`flipout_jax.core.prune`.
  """
  check_gradient_flow_measure(measure)

  def score(ctx: ScoreContext) -> PyTree:
    loss_fn = ctx.extra_args.get("loss_fn")
    batches = ctx.extra_args.get("hvp_batches")
    if loss_fn is not None and not callable(loss_fn):
      raise ValueError(f"loss_fn: expected a callable loss_fn(params) -> "
                       f"scalar, got {type(loss_fn).__name__}.")
    if batches is not None and loss_fn is None:
      raise ValueError("loss_fn: hvp_batches was given without loss_fn; pass "
                       "loss_fn=lambda params, batch: ... as well.")
    if measure in HESSIAN_MEASURES and loss_fn is None:
      raise ValueError(_MISSING_LOSS.format(measure=measure))
    if loss_fn is not None and any(
        isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(
            ctx.old_params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))):
      raise ValueError(
          "loss_fn: this transformation sits inside optax.masked / partition /"
          " multi_transform and sees only its group's params (MaskedNode "
          "elsewhere), so it cannot evaluate the loss of the whole model. "
          "Use it outside such a wrapper (choose the prunable leaves with "
          "filter_fn instead), or a measure that needs no loss_fn.")
    masks = ctx.masks
    theta = trees.apply_masks(ctx.old_params, masks)
    g = hg = None
    if measure in HESSIAN_MEASURES:
      g, hg = hessian.gradient_and_hessian_gradient(
          loss_fn, ctx.old_params, batches, masks)
    elif measure in GRADIENT_MEASURES:
      g = (ctx.grads if loss_fn is None
           else hessian.mean_gradient(loss_fn, ctx.old_params, batches))
    leaves = lambda t: (trees.prunable_leaves(masks, t) if t is not None
                        else [None] * len(trees.prunable_leaves(masks, masks)))
    out = [_leaf_importance(measure, t, gg, hh, structured, True)
           for t, gg, hh in zip(leaves(theta), leaves(g), leaves(hg))]
    return trees.unflatten_prunable(masks, out)

  return score


def grasp(ctx: ScoreContext) -> PyTree:
  """GraSP (Wang et al. 2020): ``θ·Hg``; the most negative is pruned first.

  Needs ``loss_fn`` in ``update``'s extra arguments; see
  :func:`gradient_flow_score`.
  """
  return gradient_flow_score("gradient_norm")(ctx)
