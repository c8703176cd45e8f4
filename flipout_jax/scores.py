"""Importance scores: which weights matter. Higher score = kept longer.

A score function takes a :class:`ScoreContext` and returns a tree in mask
layout (a float array per prunable leaf, ``None`` elsewhere). Scores are
computed only on pruning steps, inside ``lax.cond``.

This module holds the generic scores; a method's own score lives in its
method module (e.g. the gradient-flow measures and GraSP's ``θ·Hg`` in
:mod:`flipout_jax.methods.gradient_flow`, DST's grow scores in
:mod:`flipout_jax.methods.dst`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

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
