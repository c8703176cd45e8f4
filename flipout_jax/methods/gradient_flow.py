"""Gradient-flow pruning (Lubana & Dick, ICLR 2021) and GraSP at initialisation.

Under gradient flow ``θ̇ = −g`` the weight norm evolves as

    d‖θ‖²/dt = −2θᵀg,        d²‖θ‖²/dt² = 2‖g‖² + 2θᵀHg,

and each importance measure keeps the weights that matter most to one of
these terms (:func:`flipout_jax.scores.gradient_flow_importance`):

* ``"magnitude"`` ``|θ|``;
* ``"loss_preservation"`` ``|θ·g|`` (SNIP-like);
* ``"loss_preservation_magnitude"`` ``|θ²·g|`` (the paper's proposal);
* ``"gradient_norm"`` ``θ·Hg`` (GraSP-like: the most negative is pruned
  first);
* ``"gradient_norm_preservation"`` ``|θ·Hg|`` (the paper's proposal).

Protocol (prune while training from scratch): ``rounds`` = n events, one
after every ``steps_per_round`` steps (an epoch in the paper); event k
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
:func:`flipout_jax.scores.gradient_flow_importance`), so the structure
ranks the filters by that value (``reduce="max"`` of its broadcast,
whatever ``reduce`` the structure was given). A pruned filter's kernel is
exactly zero; its bias and normalisation parameters are not masked, so the
channel outputs a constant rather than disappearing. The classifier's units
are left whole and not counted (``fj.units(exclude="auto")``, as the
authors' code never scores the classifier).
"""

from __future__ import annotations


import optax

from flipout_jax import core
from flipout_jax import schedules
from flipout_jax import scores
from flipout_jax import structure as structure_lib

MEASURES = scores.GRADIENT_FLOW_MEASURES


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
  structure = structure_lib.check(
      structure_lib.unstructured() if structure is None else structure)
  if structure.kind != "units":
    return scores.gradient_flow_score(measure), structure
  options = dict(structure.options, reduce="max")
  return (scores.gradient_flow_score(measure, structured=True),
          structure_lib.units(**options))


def gradient_flow(inner: optax.GradientTransformation, *, measure: str,
                  sparsity: float, rounds: int, steps_per_round: int,
                  reset_moments: bool | str = True, start_step: int = 0,
                  distribution="global", structure=None, filter_fn=None,
                  seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Prune-while-training with a gradient-flow importance measure.

  Event ``k = 1..rounds`` happens in the update whose step count is
  ``start_step + k·steps_per_round`` (i.e. after ``steps_per_round`` more
  training steps) and removes ``r_k = p/(k·p + n(1 − p))`` of the surviving
  weights (filters, if ``structured``), ``n = rounds``: after round k the
  sparsity is ``1 − n(1−p)/(k·p + n(1−p))``, exactly ``p`` after round n
  (counts are exact integers: ``N − round(s_k·N)`` kept).

  Measures are evaluated at the weights the event step's gradient was taken
  at (see :func:`flipout_jax.scores.gradient_flow_score`). The two
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
    steps_per_round: training steps between events (paper: one epoch).
    reset_moments: True (the protocol) zeroes all of the inner optimizer's
      per-parameter buffers (e.g. momentum) after each event; False keeps
      them; a string is passed to ``core.prune`` as is.
    start_step: step from which the rounds are counted.
    distribution: ``"global"`` (the paper), ``"uniform"``, ``"erk"``
      (unstructured only) or ``{path: sparsity}``.
    structure: ``fj.unstructured()`` (default), ``fj.n_m(n, m)`` or
      ``fj.units(min_per_layer=..., exclude=...)`` (whole filters; the
      classifier left whole by default).
    filter_fn: which leaves are prunable (default: float leaves, ndim >= 2).
    seed: seed of the PRNG key in the state.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state holds the masks.

  Raises:
    ValueError: naming the argument: unknown ``measure``, ``sparsity``
      outside [0, 1), ``rounds`` or ``steps_per_round`` <= 0, bad
      ``distribution`` or ``reset_moments``; ``structure`` for a bad
      structure or one the layers cannot hold (at ``init``).
  """
  measure = scores.check_gradient_flow_measure(measure)
  score_fn, structure = _score_and_structure(measure, structure)
  schedule = schedules.rounds(sparsity, rounds, steps_per_round, start_step)
  return core.prune(
      inner, score_fn=score_fn, schedule=schedule,
      distribution=distribution, structure=structure,
      reset_moments=_reset_mode(reset_moments),
      filter_fn=filter_fn, seed=seed, name="gradient_flow")


def grasp(inner: optax.GradientTransformation, *, sparsity: float,
          step: int = 0, distribution="global", structure=None,
          filter_fn=None, seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """GraSP (Wang, Zhang & Grosse 2020): one-shot pruning by ``θ·Hg``.

  At update ``step`` (default the first, i.e. at initialisation), scores
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
    step: the update at which to prune.
    distribution: ``"global"`` (GraSP), ``"uniform"``, ``"erk"``
      (unstructured only) or a mapping.
    structure: the sparsity pattern (as in :func:`gradient_flow`).
    filter_fn: which leaves are prunable.
    seed: seed of the PRNG key in the state.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  score_fn, structure = _score_and_structure("gradient_norm", structure)
  return core.prune(
      inner, score_fn=score_fn, schedule=schedules.one_shot(sparsity, step),
      distribution=distribution, structure=structure, filter_fn=filter_fn,
      seed=seed, name="grasp")
