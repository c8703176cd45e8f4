"""Movement pruning (Sanh, Wolf & Rush 2020, arXiv 2005.07683).

First-order importance for pruning during (fine-)training: every update adds
``−θ·g`` to a per-weight score,

    S_i = −Σ_t θ_i^(t) · g_i^(t),

``θ^(t)`` the weight before update t and ``g^(t)`` the loss gradient that
update receives (before weight decay, which sits inside the inner optimizer).
Weights moving away from zero (θ and −g of the same sign) gain score. On the
events of a cubic schedule, ``s_t = s·(1 − (1 − (t − t_0)/(t_1 − t_0))³)``,
the alive weights of highest ``S`` stay (hard top-k; masks only shrink), and
``S`` is zeroed for the pruned ones. The "soft" variant (thresholding ``S``)
is not provided.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from flipout_jax import core
from flipout_jax import schedules
from flipout_jax import trees


def movement_scores() -> core.Tracker:
  """``S ← S − θ·g`` on every update (float32, mask layout; 0 where pruned).

  ``θ`` are the weights before the update (:attr:`core.Step.params`), ``g``
  the gradient it received (:attr:`core.Step.dense_grads`).
  """

  def init(params, masks):
    return trees.map_prunable(lambda m, p: jnp.zeros(p.shape, jnp.float32),
                              masks, params)

  def update(scores, step: core.Step):
    def one(m, s, p, g):
      return jnp.where(m, s - p.astype(jnp.float32) * g.astype(jnp.float32),
                       0.0)
    return trees.map_prunable(one, step.masks, scores, step.params,
                              step.dense_grads)

  def prune(scores, masks):
    return trees.map_prunable(lambda m, s: jnp.where(m, s, 0.0), masks,
                              scores)

  return core.Tracker(init, update, prune)


def movement(inner: optax.GradientTransformation, *, sparsity: float,
             start_step: int, end_step: int, every: int = 1,
             distribution="global", structure=None, filter_fn=None,
             seed: int = 0, packed_masks: bool = False
        ) -> optax.GradientTransformationExtraArgs:
  """Movement pruning: keep the weights of highest ``S = −Σ_t θ·g``.

  Args:
    inner: the optimizer to wrap (e.g. ``optax.adamw(...)``); put weight
      decay inside it so that ``S`` sees the loss gradient only.
    sparsity: final fraction of prunable weights at 0, in [0, 1); the final
      number pruned is ``round(sparsity·N)`` exactly.
    start_step: first event (target 0), an int in [0, 2**31 − 2].
    end_step: last event, at target ``sparsity``; an int > ``start_step``.
    every: steps between events, an int >= 1 (events at ``start_step +
      k·every`` and at ``end_step``), on the cubic curve above.
    distribution: ``"global"`` (one ranking over all layers), ``"uniform"``,
      ``"erk"`` or ``{path: sparsity}``.
    structure: the sparsity pattern: ``fj.unstructured()`` (default),
      ``fj.n_m(n, m)`` or ``fj.units(...)`` (:mod:`flipout_jax.structure`).
    filter_fn: which leaves are prunable (default: float leaves, ndim >= 2).
    seed: seed of the state's PRNG key (unused by the method), an int.
    packed_masks: store the masks as bits (0.125 B per weight, not 1);
      the same results bit for bit (:func:`flipout_jax.core.prune`).

  Returns:
    An optax transformation; its ``method_state`` holds ``S`` (float32,
    mask layout).

  Raises:
    ValueError: naming the argument, for a value outside the ranges above.
  """
  return core.prune(
      inner, score_fn=lambda ctx: ctx.method_state,
      schedule=schedules.polynomial(sparsity, start_step, end_step, every),
      distribution=distribution, structure=structure, tracker=movement_scores(),
      filter_fn=filter_fn, seed=seed,
      packed_masks=packed_masks, name="movement")
