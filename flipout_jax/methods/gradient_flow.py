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

Structured mode prunes whole output filters (the last axis of a Flax kernel:
Dense output neurons, Conv output channels). Its sparsity counts *filters*,
as the authors' code does: event k keeps exactly ``F − round(s_k·F)`` of the
``F`` prunable filters (per layer with ``distribution="uniform"`` or a
mapping), and never empties a layer: each layer keeps its ``min_filters``
best filters (the authors keep ``int(0.05·F_l) + 1``). A pruned filter's
kernel is exactly zero; its bias and normalisation parameters are not
masked, so the channel outputs a constant rather than disappearing.

The classifier's output units are not filters: structured mode leaves the
output layer whole by default (``output_layer="auto"``: the last 2-D
prunable kernel, e.g. ``fc3/kernel`` of the LeNets, ``head/kernel`` of VGG
and ResNet), and its units do not count among the filters, as in the
authors' code, which never scores the classifier. Pruning a class's column
would make that logit a constant (its bias). ``output_layer=None`` prunes it
like any other layer.
"""

from __future__ import annotations

import functools
import re

import jax.numpy as jnp
import numpy as np
import optax

from flipout_jax import core
from flipout_jax import distributions
from flipout_jax import schedules
from flipout_jax import scores
from flipout_jax import selection
from flipout_jax import trees
from flipout_jax import validate

MEASURES = scores.GRADIENT_FLOW_MEASURES


def _num_filters(mask) -> int:
  return int(mask.shape[-1]) if mask.ndim else 1


def _as_filters(x):
  """``(..., out) -> (rows, out)``: one column per filter."""
  f = x.shape[-1] if x.ndim else 1
  return jnp.reshape(x, (-1, f))


@functools.lru_cache(maxsize=64)
def _filter_table(distribution_key, paths, num_filters, sparsities, final):
  distribution = (dict(distribution_key) if isinstance(distribution_key, tuple)
                  else distribution_key)
  # A layer of F filters is budgeted as a 1-D "tensor" of F entries, so that
  # global / uniform / custom budgets count filters exactly.
  shapes = [(f,) for f in num_filters]
  budgets = [distributions.budget(distribution, paths, shapes, s, final)
             for s in sparsities]
  return budgets[0].groups, np.stack([b.keep for b in budgets]).astype(np.int32)


def _check_structured_distribution(distribution) -> None:
  distributions.validate_distribution(distribution)
  if distribution == "erk":
    raise ValueError(
        "distribution: 'erk' is not defined for filter counts (structured="
        "True); use 'global', 'uniform' or a mapping path -> sparsity.")


def _natural_key(path: str):
  """Sort key in which ``Dense_10`` comes after ``Dense_9``."""
  return [(0, int(t), "") if t.isdigit() else (1, 0, t)
          for t in re.split(r"(\d+)", path)]


def _check_output_layer(output_layer):
  if output_layer is None or output_layer == "auto":
    return output_layer
  if not isinstance(output_layer, str) or not output_layer:
    raise ValueError(
        "output_layer: expected 'auto', None or the path of a prunable leaf "
        f"(or of its layer, e.g. 'fc3'), got {output_layer!r}.")
  return output_layer


def output_layer_paths(paths, ndims, output_layer="auto") -> tuple[str, ...]:
  """The prunable paths whose units structured pruning leaves whole.

  Args:
    paths: the prunable leaves' paths (``trees.leaves_with_paths`` order).
    ndims: their numbers of dimensions.
    output_layer: ``"auto"``: the 2-D kernel whose path sorts last (numbers
      compared as numbers), unless it is the only prunable leaf; ``None``:
      none; a path: the leaves equal to it or below it (``"fc3"`` matches
      ``"fc3/kernel"``).

  Raises:
    ValueError: naming ``output_layer`` if a path matches no prunable leaf,
      or matches all of them.
  """
  output_layer = _check_output_layer(output_layer)
  if output_layer is None:
    return ()
  if output_layer == "auto":
    dense = [p for p, n in zip(paths, ndims) if n == 2]
    if not dense or len(paths) < 2:
      return ()
    return (max(dense, key=_natural_key),)
  out = tuple(p for p in paths
              if p == output_layer or p.startswith(output_layer + "/"))
  if not out or len(out) == len(paths):
    raise ValueError(
        f"output_layer: {output_layer!r} must match some but not all of the "
        f"prunable leaves {list(paths)}.")
  return out


def filter_mask_rule(schedule: schedules.Schedule, distribution="global",
                     min_filters: int = 1,
                     output_layer="auto") -> core.MaskRule:
  """A mask rule for :func:`flipout_jax.core.prune` that removes whole filters.

  On the event ``k`` of ``schedule`` (sparsity ``s_k``), each group keeps
  exactly ``max(F_g − round(s_k·F_g), guarded_g)`` alive filters, ``F_g`` its
  number of filters (last kernel axis) and ``guarded_g`` the filters the
  per-layer guard protects: in every layer the ``min_filters`` best alive
  filters are kept whatever the budget, so no layer is ever emptied. Filters
  are ranked by their score (scores broadcast over the kernel, as from
  :func:`flipout_jax.scores.gradient_flow_score` with ``structured=True``;
  other scores are reduced by their maximum over the filter), ties broken by
  position. Masks only shrink: dead filters stay dead.

  The core's weight-count ``keep`` is ignored: counts are in filters, looked
  up here from the event index of ``ctx.step``.

  The output layer (:func:`output_layer_paths`) is left whole and is not
  counted: ``F`` and the budgets are over the other layers' filters.

  Args:
    schedule: the same schedule given to ``core.prune``.
    distribution: ``"global"`` (one filter ranking over all layers),
      ``"uniform"`` (each layer keeps ``F_l − round(s·F_l)``) or a mapping
      ``{path: sparsity}``.
    min_filters: filters every layer keeps at least (>= 1).
    output_layer: the classifier whose units are never pruned: ``"auto"``
      (the last 2-D kernel), ``None`` (prune every layer's units) or a
      prunable path / layer name such as ``"fc3"``; checked against the
      masks when the rule is traced (the first update).

  Returns:
    ``(ctx, scores, groups, keep) -> MaskUpdate`` (nothing restarts).
  """
  schedule = schedules.as_schedule(schedule)
  _check_structured_distribution(distribution)
  min_filters = validate.integer(min_filters, "min_filters", low=1)
  output_layer = _check_output_layer(output_layer)
  dist_key = (tuple(sorted(distribution.items()))
              if isinstance(distribution, dict) else distribution)

  def rule(ctx, scores_tree, groups, keep):
    del groups, keep  # weight counts; this rule counts filters.
    masks = ctx.masks
    flat = trees.leaves_with_paths(masks)
    whole = output_layer_paths([p for p, _ in flat], [m.ndim for _, m in flat],
                               output_layer)
    ranked_idx = [i for i, (p, _) in enumerate(flat) if p not in whole]
    paths = tuple(flat[i][0] for i in ranked_idx)
    num_filters = tuple(_num_filters(flat[i][1]) for i in ranked_idx)
    fgroups, table = _filter_table(dist_key, paths, num_filters,
                                   tuple(schedule.targets),
                                   schedule.final_sparsity)
    _, idx = schedule.event_index(ctx.step)
    target = jnp.asarray(table)[schedule.target_index(idx)]

    all_masks = trees.prunable_leaves(masks, masks)
    all_scores = trees.prunable_leaves(masks, scores_tree)
    mask_leaves = [all_masks[i] for i in ranked_idx]
    alive = [jnp.any(_as_filters(m), axis=0) for m in mask_leaves]
    big = jnp.finfo(jnp.float32).max
    fscores = []
    for s in [all_scores[i] for i in ranked_idx]:
      s = jnp.max(_as_filters(jnp.asarray(s, jnp.float32)), axis=0)
      # Finite scores only, so that +inf below marks the guarded filters
      # strictly above every other one (NaN ranks lowest, as in selection).
      fscores.append(jnp.nan_to_num(s, nan=-big, posinf=big, neginf=-big))
    guarded = [selection.top_k_mask(s, min(min_filters, s.shape[0]), a) & a
               for s, a in zip(fscores, alive)]
    ranked = [jnp.where(gd, jnp.inf, s) for s, gd in zip(fscores, guarded)]
    count = lambda xs, g: sum(jnp.sum(xs[i], dtype=jnp.int32) for i in g)
    n_guarded = jnp.stack([count(guarded, g) for g in fgroups])
    n_alive = jnp.stack([count(alive, g) for g in fgroups])
    k = jnp.minimum(jnp.maximum(target, n_guarded), n_alive)
    kept = selection.top_k_masks(ranked, fgroups, k, alive)
    new_leaves = list(all_masks)  # the output layer's masks stay as they are
    for i, m, kf, a in zip(ranked_idx, mask_leaves, kept, alive):
      new_leaves[i] = m & jnp.reshape(
          jnp.broadcast_to(kf & a, _as_filters(m).shape), m.shape)
    return core.MaskUpdate(trees.unflatten_prunable(masks, new_leaves))

  return rule


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


def _mask_rule(structured: bool, schedule, distribution, min_filters,
               output_layer):
  _check_output_layer(output_layer)
  if structured:
    return filter_mask_rule(schedule, distribution, min_filters, output_layer)
  return core.shrink_rule()


def gradient_flow(inner: optax.GradientTransformation, *, measure: str,
                  sparsity: float, rounds: int, steps_per_round: int,
                  structured: bool = False, reset_moments: bool | str = True,
                  start_step: int = 0, distribution="global", filter_fn=None,
                  min_filters: int = 1, output_layer="auto",
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
      filters with ``structured``.
    rounds: number of pruning rounds ``n`` >= 1 (paper example: 25).
    steps_per_round: training steps between events (paper: one epoch).
    structured: prune whole output filters / neurons (see
      :func:`filter_mask_rule`) instead of single weights.
    reset_moments: True (the protocol) zeroes all of the inner optimizer's
      per-parameter buffers (e.g. momentum) after each event; False keeps
      them; a string is passed to ``core.prune`` as is.
    start_step: step from which the rounds are counted.
    distribution: ``"global"`` (the paper), ``"uniform"``, ``"erk"``
      (unstructured only) or ``{path: sparsity}``.
    filter_fn: which leaves are prunable (default: float leaves, ndim >= 2).
    min_filters: structured only: filters every layer keeps at least.
    output_layer: structured only: the classifier, whose units (class
      logits) are never pruned nor counted among the filters: ``"auto"``
      (default: the last 2-D prunable kernel, e.g. ``fc3/kernel``), a path
      or layer name, or ``None`` to prune its units too (see
      :func:`output_layer_paths`).
    seed: seed of the PRNG key in the state.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state holds the masks.

  Raises:
    ValueError: naming the argument: unknown ``measure``, ``sparsity``
      outside [0, 1), ``rounds`` or ``steps_per_round`` <= 0, bad
      ``distribution``, ``reset_moments``, ``structured``, ``min_filters``
      or ``output_layer``.
  """
  measure = scores.check_gradient_flow_measure(measure)
  structured = validate.boolean(structured, "structured")
  schedule = schedules.rounds(sparsity, rounds, steps_per_round, start_step)
  return core.prune(
      inner,
      score_fn=scores.gradient_flow_score(measure, structured=structured),
      schedule=schedule,
      mask_rule=_mask_rule(structured, schedule, distribution, min_filters,
                           output_layer),
      distribution=distribution, reset_moments=_reset_mode(reset_moments),
      filter_fn=filter_fn, seed=seed, name="gradient_flow")


def grasp(inner: optax.GradientTransformation, *, sparsity: float,
          step: int = 0, structured: bool = False, distribution="global",
          filter_fn=None, min_filters: int = 1, output_layer="auto",
          seed: int = 0) -> optax.GradientTransformationExtraArgs:
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
    sparsity: fraction of prunable weights (filters if ``structured``)
      removed, in [0, 1).
    step: the update at which to prune.
    structured: remove whole output filters ranked by ``Σ_f θ·Hg``.
    distribution: ``"global"`` (GraSP), ``"uniform"``, ``"erk"``
      (unstructured only) or a mapping.
    filter_fn: which leaves are prunable.
    min_filters: structured only: filters every layer keeps at least.
    output_layer: structured only: the classifier left whole (as in
      :func:`gradient_flow`).
    seed: seed of the PRNG key in the state.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  structured = validate.boolean(structured, "structured")
  schedule = schedules.one_shot(sparsity, step)
  return core.prune(
      inner,
      score_fn=scores.gradient_flow_score("gradient_norm",
                                          structured=structured),
      schedule=schedule,
      mask_rule=_mask_rule(structured, schedule, distribution, min_filters,
                           output_layer),
      distribution=distribution, filter_fn=filter_fn, seed=seed, name="grasp")
