"""Gradient-flow pruning (Lubana & Dick, ICLR 2021) and GraSP at initialisation.

Under gradient flow ``θ̇ = −g`` the weight norm evolves as

    d‖θ‖²/dt = −2θᵀg,        d²‖θ‖²/dt² = 2‖g‖² + 2θᵀHg,

and each importance measure keeps the weights that matter most to one of
these terms (:func:`gradient_flow_importance`):

* ``"magnitude"`` ``|θ|``;
* ``"loss_preservation"`` ``|θ·g|`` (SNIP-like);
* ``"loss_preservation_magnitude"`` ``|θ²·g|`` (the paper's proposal);
* ``"gradient_norm"`` ``θ·Hg`` (GraSP-like: the most negative is pruned
  first);
* ``"gradient_norm_preservation"`` ``|θ·Hg|`` (the paper's proposal).

Protocol (prune while training from scratch): ``rounds`` = n events, one
after every ``every`` steps (an epoch in the paper); event k
removes ``r_k = p / (k·p + n·(1 − p))`` of what is left, which telescopes to
exactly ``p`` after n events; the inner optimizer's moments are reset after
every event. Then train on with the mask fixed (the transformation does
that: after the last event masks never change).

Structured pruning is ``structure=fj.units(...)`` (whole output filters:
the last axis of a Flax kernel, Dense output neurons, Conv output channels).
Its sparsity counts *filters*, as the authors' code does: event k keeps
exactly ``F − round(s_k·F)`` of the ``F`` prunable filters (per layer with
``distribution="uniform"`` or a mapping), and never empties a layer: each
layer keeps its ``min_per_layer`` best filters (the authors keep
``int(0.05·F_l) + 1``). The measures are then taken in their filter form
(the sum over the filter before the absolute value, see
:func:`gradient_flow_importance`), so the structure
ranks the filters by that value (``reduce="max"`` of its broadcast,
whatever ``reduce`` the structure was given). A pruned filter's kernel is
exactly zero; its bias and normalisation parameters are not masked, so the
channel outputs a constant rather than disappearing. The classifier's units
are left whole and not counted (``fj.units(exclude="auto")``, as the
authors' code never scores the classifier).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from flipout_jax import core
from flipout_jax import hessian
from flipout_jax import schedules
from flipout_jax import scores
from flipout_jax import structure as structure_lib
from flipout_jax import trees

PyTree = Any


# ---------------------------------------------------------------------------
# Gradient-flow importance measures (Lubana & Dick, ICLR 2021).
#
# Under gradient flow θ̇ = −g:  d‖θ‖²/dt = −2θᵀg  and
# d²‖θ‖²/dt² = 2‖g‖² + 2θᵀHg. Each measure scores how much a weight
# contributes to one of these terms; higher = kept longer.
# ---------------------------------------------------------------------------

MEASURES = (
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
  if measure not in MEASURES:
    raise ValueError(f"measure: unknown value {measure!r}; valid values are "
                     f"{MEASURES}.")
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
    measure: one of :data:`MEASURES`.
    params: ``θ``, an array or a pytree of arrays.
    grads: ``g`` shaped like ``params``; needed by the two loss-preservation
      measures.
    hvp: ``Hg`` shaped like ``params`` (see
      :func:`flipout_jax.hessian.gradient_and_hessian_gradient`); needed by
      the two gradient-norm measures.
    structured: score output filters instead of single weights.
    broadcast: with ``structured``, broadcast each filter's score back to
      the kernel's shape (as a :data:`flipout_jax.scores.ScoreFn` must
      return).

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


def gradient_flow_score(measure: str, *,
                        structured: bool = False) -> scores.ScoreFn:
  """A :data:`flipout_jax.scores.ScoreFn` of a gradient-flow measure.

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
    measure: one of :data:`MEASURES`.
    structured: score whole output filters (last kernel axis); the filter
      score is broadcast to the kernel shape.

  Returns:
    A score function for :func:`flipout_jax.core.prune`.
  """
  check_gradient_flow_measure(measure)

  def score(ctx: scores.ScoreContext) -> PyTree:
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


def grasp_score(ctx: scores.ScoreContext) -> PyTree:
  """GraSP's score (Wang et al. 2020): ``θ·Hg``; the most negative is pruned
  first. The score of :func:`grasp`.

  Needs ``loss_fn`` in ``update``'s extra arguments; see
  :func:`gradient_flow_score`.
  """
  return gradient_flow_score("gradient_norm")(ctx)


# ---------------------------------------------------------------------------
# The constructors.


def _reset_mode(reset_moments) -> str:
  if reset_moments is True:
    return "all"
  if reset_moments is False:
    return "none"
  if reset_moments in core.RESET_MOMENTS:
    return reset_moments
  raise ValueError(
      f"reset_moments: expected True (reset all moments after each pruning "
      f"event, the protocol), False, or one of {core.RESET_MOMENTS}; got "
      f"{reset_moments!r}.")


def _score_and_structure(measure: str, structure):
  """The measure's score in the form ``structure`` ranks, and the structure
  (units rank filter-form importances, broadcast: by their max)."""
  structure = structure_lib.check(structure)
  if structure.kind != "units":
    return gradient_flow_score(measure), structure
  options = dict(structure.options, reduce="max")
  return (gradient_flow_score(measure, structured=True),
          structure_lib.units(**options))


def gradient_flow(inner: optax.GradientTransformation, *, measure: str,
                  sparsity: float, rounds: int, every: int,
                  reset_moments: bool | str = True, start_step: int = 0,
                  distribution="global", structure=None, filter_fn=None,
                  seed: int = 0, packed_masks: bool = False
        ) -> optax.GradientTransformationExtraArgs:
  """Prune-while-training with a gradient-flow importance measure.

  Event ``k = 1..rounds`` happens in the update whose step count is
  ``start_step + k·every`` (i.e. after ``every`` more training steps) and removes ``r_k = p/(k·p + n(1 − p))`` of the surviving
  weights (filters, if ``structured``), ``n = rounds``: after round k the
  sparsity is ``1 − n(1−p)/(k·p + n(1−p))``, exactly ``p`` after round n
  (counts are exact integers: ``N − round(s_k·N)`` kept).

  Measures are evaluated at the weights the event step's gradient was taken
  at (see :func:`gradient_flow_score`). The two
  gradient-norm measures need the loss: pass ``loss_fn`` to every update,

      tx.update(grads, state, params, loss_fn=lambda p: loss(p, batch))

  or ``loss_fn=lambda p, b: ...`` with ``hvp_batches=[b1, b2, ...]`` (or a
  pytree of stacked batches) to average ``g`` and ``Hg`` over several
  batches; it is evaluated only on pruning steps. Given ``loss_fn``, the
  loss-preservation measures use its gradient too (otherwise the step's).
  For ``"gradient_norm"`` the authors (and GraSP) divide the logits by a
  temperature of 200 inside that loss (:data:`flipout_jax.hessian.
  GRASP_TEMPERATURE`); they use 1 for ``"gradient_norm_preservation"``.

  Args:
    inner: the optimizer to wrap (paper: SGD, momentum 0.9).
    measure: one of ``"magnitude"``, ``"loss_preservation"``,
      ``"loss_preservation_magnitude"``, ``"gradient_norm"``,
      ``"gradient_norm_preservation"``.
    sparsity: final sparsity ``p`` in [0, 1): of prunable weights, or of
      filters with ``structure=fj.units(...)``.
    rounds: number of pruning rounds ``n`` >= 1 (paper example: 25).
    every: training steps between events (paper: one epoch).
    reset_moments: True (the protocol) zeroes all of the inner optimizer's
      per-parameter buffers (e.g. momentum) after each event; False keeps
      them; a string is passed to ``core.prune`` as is.
    start_step: step from which the rounds are counted (the first event
      is at ``start_step + every``; README, "Vocabulary").
    distribution: ``"global"`` (the paper), ``"uniform"``, ``"erk"``
      (unstructured only) or ``{path: sparsity}``.
    structure: ``fj.unstructured()`` (default), ``fj.n_m(n, m)`` or
      ``fj.units(min_per_layer=..., exclude=...)`` (whole filters; the
      classifier left whole by default).
    filter_fn: which leaves are prunable (default: float leaves, ndim >= 2).
    seed: seed of the PRNG key in the state.
    packed_masks: store the masks as bits (0.125 B per weight, not 1);
      the same results bit for bit (:func:`flipout_jax.core.prune`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state holds the masks.

  Raises:
    ValueError: naming the argument: unknown ``measure``, ``sparsity``
      outside [0, 1), ``rounds`` or ``every`` <= 0, bad
      ``distribution`` or ``reset_moments``; ``structure`` for a bad
      structure or one the layers cannot hold (at ``init``).
  """
  measure = check_gradient_flow_measure(measure)
  score_fn, structure = _score_and_structure(measure, structure)
  schedule = schedules.rounds(sparsity, rounds, every, start_step)
  return core.prune(
      inner, score_fn=score_fn, schedule=schedule,
      distribution=distribution, structure=structure,
      reset_moments=_reset_mode(reset_moments),
      filter_fn=filter_fn, seed=seed,
      packed_masks=packed_masks, name="gradient_flow")


def grasp(inner: optax.GradientTransformation, *, sparsity: float,
          start_step: int = 0, distribution="global", structure=None,
          filter_fn=None, seed: int = 0, packed_masks: bool = False
        ) -> optax.GradientTransformationExtraArgs:
  """GraSP (Wang, Zhang & Grosse 2020): one-shot pruning by ``θ·Hg``.

  At the update with count ``start_step`` (default 0, the first, i.e. at
  initialisation; README, "Vocabulary"), scores
  every prunable weight by ``θ·Hg`` and removes the most negative ones —
  those whose removal (``δ = −θ``) most increases, or least reduces, the
  gradient norm ``‖g‖²`` (``Δ‖g‖² ≈ −2θ·Hg``) — keeping the top
  ``N − round(sparsity·N)``; the mask is then fixed. Needs ``loss_fn`` in
  ``update`` on that step (and, since the step is traced, in every call):
  GraSP divides the logits by ``T = 200`` inside it, e.g.
  ``hessian.softmax_cross_entropy_loss(apply_fn, temperature=200.0)`` with
  ``hvp_batches``. ``g`` and ``Hg`` are taken over all parameters (GraSP's
  code differentiates the kernels only).

  Args:
    inner: the optimizer to wrap.
    sparsity: fraction of prunable weights (filters with
      ``structure=fj.units(...)``, ranked by ``Σ_f θ·Hg``) removed, in
      [0, 1).
    start_step: the update count at which to prune.
    distribution: ``"global"`` (GraSP), ``"uniform"``, ``"erk"``
      (unstructured only) or a mapping.
    structure: the sparsity pattern (as in :func:`gradient_flow`).
    filter_fn: which leaves are prunable.
    seed: seed of the PRNG key in the state.
    packed_masks: store the masks as bits (0.125 B per weight, not 1);
      the same results bit for bit (:func:`flipout_jax.core.prune`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  score_fn, structure = _score_and_structure("gradient_norm", structure)
  return core.prune(
      inner, score_fn=score_fn,
      schedule=schedules.one_shot(sparsity, start_step),
      distribution=distribution, structure=structure, filter_fn=filter_fn,
      seed=seed,
      packed_masks=packed_masks, name="grasp")
