"""ST-3 and ST-3σ (Vanderschueren & De Vleeschouwer, WACV 2023) as an optax transform.

ST-3 trains dense *raw* weights ``w`` while the model computes with their
soft-thresholded, rescaled copy, the *effective* weights::

    s_t   = S·(1 − (1 − (t − t0)/(t1 − t0))^power)    (0 before t0, S after t1)
    k_t   = round(s_t·N)   (the library's count convention, README)
    τ_t   = the k_t-th smallest score over all N prunable weights
            (τ_t = 0 and nothing masked when k_t = 0)
    score = |w|              (ST-3)
          = |w| / σ_l        (ST-3σ), σ_l = 1/sqrt(sum of the tensor's dims)
    τ_l   = τ_t·σ_l          (ST-3: σ_l = 1, one global τ)
    m     = keep the N − k_t largest scores (exactly; ties at τ broken
            by position, the earlier kept)
    w_soft = sign(w)·max(|w| − τ_l, 0)·m       (exactly 0 where m = 0,
                                                continuous at |w| = τ_l)
    r_c   = (mean_k(|w_ck|·m_ck) + 1e-6) / (mean_k |w_ck| + 1e-6)
    scale_c = 1.01/(r_c + 0.01)     (1 exactly when channel c has no pruned weight)
    w_eff = scale_c·w_soft          (rescale=True; else w_soft)

``c`` is the output channel, the last axis of Flax Dense/Conv kernels
(``(..., in, out)``); the means run over every other axis (a prunable leaf
with ``ndim < 2`` is one channel). ``τ`` and ``scale`` are computed in the
optimizer state from the raw weights and are never differentiated through.

**Straight-through as a pure optax transformation.** The raw weights live in
the optimizer state; the model's params are always the effective weights, so
a user's train step is the ordinary one::

    grads = jax.grad(loss)(params)              # gradient at w_eff
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

``update`` applies ``grads`` to the *raw* weights through the inner optimizer
(∂L/∂w := ∂L/∂w_eff for every weight, pruned ones included, so pruned weights
can come back: masks are recomputed every step and are not monotone), then
recomputes ``τ``, the masks and the scales from the new raw weights, and
returns ``updates = w_eff' − params``. ``apply_updates`` therefore lands the
params on the new effective weights: pruned entries on exactly 0.0 (``p + (0 −
p)`` is exactly +0.0 in IEEE arithmetic), kept entries on ``w_eff'`` up to
one rounding of ``p + (w_eff' − p)`` (exact whenever ``w_eff'/p`` is in
[1/2, 2]); the raw weights, not the params, are the source of truth, so this
rounding never accumulates. Non-prunable leaves (biases, norm scales) are
trained normally and are not copied into the state.

**Starting from dense params.** ``init(params)`` stores ``raw = params``;
masks start all True. The params become the effective weights with the first
``update``. Up to the update with count ``start_step`` (s = 0) nothing is
masked, τ = 0 and every scale is exactly 1, so ``w_eff == w_raw`` exactly and
ST-3 trains like its inner optimizer.

**Step count.** The schedule is evaluated at ``state.count``, the number of
updates applied before the current one (as for every schedule of this
library: "the event at step t fires inside the update whose count is t"). So
the params returned by the update with count ``t`` have sparsity ``s_t``;
the update with count ``end_step`` is the first to reach ``sparsity``.

**Fine-tuning (``freeze_step``).** Updates with count ``< freeze_step`` are
ST-3 updates. The last of them (count ``freeze_step − 1``) also replaces the
raw weights by its effective weights (pruned entries 0.0) and resets every
τ_l to 0 and every scale to 1, so that ``w_eff = where(m, w, 0)`` from then
on. Every later update keeps the masks of that update fixed, gives the pruned
weights no gradient, steps the raw weights with the inner optimizer, pins
the pruned raw weights to exactly 0.0 (whatever the inner moments say) and
returns ``updates = where(m, w', 0) − params`` as before: the kept weights
train as ordinary weights (no thresholding, no rescaling) and the pruned
ones stay exactly 0.0. The raw weights remain the source of truth in this
phase too, so the params equal them up to the one rounding above (in
practice bitwise for almost every weight) and never drift away from them.

**Structure.** Which weights are pruned and by how much the kept ones are
thresholded is the ``structure=`` (:func:`threshold_rule`): unstructured
(default) is the global ranking above (ST-3, or ST-3σ with
``sigma_normalized``); ``fj.n_m(n, m)`` keeps ``n_t`` per group of M along
the contraction axis with ``τ_g`` the group's largest pruned magnitude;
``fj.units()`` keeps whole units. The soft threshold and the rescale above
are always :func:`soft_threshold_rescale`.

**Placement.** ``st3`` must be the *last* transformation of a chain, because
its updates are ``w_eff' − params``, not a gradient step that could be
rescaled. Put gradient clipping before it (``optax.chain(
optax.clip_by_global_norm(3.0), st3(...))``, the reference's clip-norm 3)
and weight decay *inside* ``inner`` (e.g. ``optax.adamw`` or
``optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(...))``): the inner
optimizer receives the raw weights as its ``params``, so the decay acts on
the raw weights, as in the reference.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flipout_jax import core
from flipout_jax import schedules
from flipout_jax import structure as structure_lib
from flipout_jax import trees
from flipout_jax import validate

PyTree = Any

# NumPy, not jnp: a jnp constant at import would start the XLA backend and
# block a later jax.distributed.initialize().
_EPS = 1e-6  # The reference's epsilon in r_c.
_SCALE_OFFSET = 0.01  # scale_c = (1 + offset)/(r_c + offset).


class ST3State(NamedTuple):
  """The rule state of :func:`st3` (``RawState.rule``; mask layout).

  The raw weights are ``PruneState.method_state.raw``
  (:class:`flipout_jax.core.RawState`, :func:`get_raw_weights`).

  Attributes:
    thresholds: float32 per prunable leaf, the ``thresholds`` of the
      :class:`ThresholdRule` at the last update (0 before start and after
      the freeze). Unstructured (ST-3 / ST-3σ) and units: shape ``[]``,
      ``τ_l`` (``τ·σ_l``; ``τ`` for plain ST-3). ``fj.n_m``: one
      ``τ_g`` per group of M, the kernel's shape with the contraction axis
      divided by M (``(in/M, out)`` for a Dense kernel, ``(kh, kw, in/M,
      out)`` for a Conv kernel), and ``[]`` (always 0) for a layer skipped
      as N:M-incompatible.
    scales: float32 per prunable leaf, shape ``[out]`` (the last axis) for
      ``ndim >= 2`` and ``[]`` otherwise: ``scale_c`` of the last update (all
      1 with ``rescale=False``, before start, and after the freeze).
  """
  thresholds: PyTree
  scales: PyTree


class ST3Weights(NamedTuple):
  """What :func:`st3_effective` computes from raw weights.

  Attributes:
    effective: params-shaped: the effective weights at the prunable leaves,
      the input leaves elsewhere.
    masks: mask layout: the kept weights (see :func:`threshold_rule`)
      or the rule's masks.
    thresholds: mask layout, float32: ``τ_l`` (``[]``, global rule) or the
      rule's thresholds (see :class:`ST3State`).
    scales: mask layout, float32 ``[out]`` or ``[]``: ``scale_c``.
  """
  effective: PyTree
  masks: PyTree
  thresholds: PyTree
  scales: PyTree


# ------------------------------------------------------------------ arguments


def _check_args(sparsity, start_step, end_step, power, freeze_step):
  """The shared checks (:mod:`flipout_jax.validate`); ``power`` only enters
  the traced update, so it may be traced (``optax.inject_hyperparams``).
  ``freeze_step > end_step``: the update with count ``end_step`` is the
  first at the final sparsity; freezing earlier would fix a lower one."""
  sparsity = validate.sparsity(sparsity)
  start_step = validate.step(start_step, "start_step")
  end_step = validate.step(end_step, "end_step")
  validate.ordered(end_step, "end_step", start_step, "start_step")
  power = validate.number(power, "power", low=0, low_open=True,
                          traceable=True)
  if freeze_step is not None:
    freeze_step = validate.step(freeze_step, "freeze_step")
    validate.ordered(freeze_step, "freeze_step", end_step, "end_step")
  return sparsity, start_step, end_step, power, freeze_step


# ------------------------------------------------------------- the threshold


def _sigma(shape) -> float:
  """σ_l = 1/sqrt(sum of dims); 1 for a scalar leaf (no dims to sum)."""
  return 1.0 / math.sqrt(sum(shape)) if len(shape) else 1.0


def _channel_axes(ndim: int) -> tuple[int, ...]:
  return tuple(range(ndim - 1)) if ndim >= 2 else tuple(range(ndim))


class ThresholdSelection(NamedTuple):
  """What a :class:`ThresholdRule` selects from the raw weights at ``s_t``.

  Attributes (lists matching the raw-weight list):
    masks: bool, shaped like the raw weight: the kept entries.
    taus: float32, broadcastable to the raw weight: the threshold ``τ`` each
      entry is soft-thresholded by (``[]`` for one τ per tensor).
    thresholds: float32, what :class:`ST3State` stores (and
      :func:`st3_thresholds` returns): the compact form of ``taus``.
  """
  masks: list
  taus: list
  thresholds: list


class ThresholdRule(NamedTuple):
  """The pluggable selection of :func:`st3`: which weights ST-3 prunes, and by
  how much it soft-thresholds the kept ones.

  Attributes:
    init: ``[(path, leaf), ...] -> [threshold, ...]``: the initial (all 0)
      ``thresholds`` of the prunable leaves (only the leaves' shapes are
      read). Runs once, at ``init``; raises ValueError (naming the layer)
      for a leaf the rule cannot handle.
    select: ``(paths, raw, s, previous=None) -> ThresholdSelection``: the
      masks and thresholds of the raw weights (a list of arrays, with their
      paths) at sparsity ``s`` (a traced float32 scalar); traced inside the
      update, so it must be jittable. The thresholds are float32, of the
      shapes ``init`` returned. ``previous``: None or the thresholds of the
      last update, a hint that may speed the selection up but never
      changes it.

  :func:`threshold_rule` builds it from a structure
  (:attr:`flipout_jax.structure.Structure.threshold`); its selection goes
  to :func:`soft_threshold_rescale`, the one place of the soft-threshold
  and rescale math.
  """
  init: Any
  select: Any


def soft_threshold_rescale(w: jax.Array, mask: jax.Array, tau, *,
                           rescale: bool = True):
  """ST-3's effective weight of one tensor from its mask and thresholds.

  ::

      w_soft  = sign(w)·max(|w| − τ, 0)·m
      r_c     = (mean_k(|w_ck|·m_ck) + 1e-6) / (mean_k |w_ck| + 1e-6)
      scale_c = 1.01/(r_c + 0.01)      (exactly 1 if channel c keeps all)
      w_eff   = scale_c·w_soft         (rescale=True; else w_soft)

  ``c`` is the last axis (the output channel of Flax kernels); the means run
  over the other axes (a leaf with ``ndim < 2`` is one channel).

  Args:
    w: the raw weights.
    mask: bool like ``w``: the kept entries (the rule decides; where it
      disagrees with ``|w| > τ`` by a rounding, the ``max`` keeps
      ``sign(w_soft) = sign(w)``).
    tau: float32 broadcastable to ``w``: a scalar (ST-3) or per-entry
      thresholds (N:M). Not differentiated through.
    rescale: apply ``scale_c``.

  Returns:
    ``(effective, scale)``: the effective weights (``w.dtype``, +0.0
    exactly where ``mask`` is False) and float32 scales (``[out]`` for
    ``ndim >= 2``, else ``[]``; all 1 with ``rescale=False``). Only
    ``effective`` is differentiable w.r.t. ``w``, with derivative
    ``scale_c·m`` (where ``|w| > τ``).
  """
  a = jnp.abs(w).astype(jnp.float32)
  tau = jax.lax.stop_gradient(jnp.asarray(tau, jnp.float32))
  # maximum(): with σ ≠ 1, `score > τ` and `|w| − τσ > 0` can disagree by
  # one rounding; the mask decides, the max keeps sign(w_soft) = sign(w).
  soft = jnp.where(mask, jnp.maximum(a - tau, 0.0), 0.0)
  axes = _channel_axes(w.ndim)
  if rescale:
    kept = jnp.mean(jnp.where(mask, a, 0.0), axis=axes)
    ratio = (kept + _EPS) / (jnp.mean(a, axis=axes) + _EPS)
    scale = (1.0 + _SCALE_OFFSET) / (ratio + _SCALE_OFFSET)
    # Exactly 1 for a channel without pruned weights, whatever the rounding
    # of the two means, so that w_eff == w_raw before the schedule starts.
    scale = jnp.where(jnp.all(mask, axis=axes), jnp.float32(1.0), scale)
    scale = jax.lax.stop_gradient(scale)
  else:
    scale = jnp.ones(w.shape[-1:] if w.ndim >= 2 else (), jnp.float32)
  eff = scale * jnp.sign(w).astype(jnp.float32) * soft
  # The outer where turns −0.0 (sign(w) < 0 times 0) into +0.0.
  return jnp.where(mask, eff, 0.0).astype(w.dtype), scale.astype(jnp.float32)


def threshold_rule(structure=None, *,
                   sigma_normalized: bool = False) -> ThresholdRule:
  """ST-3's selection in a sparsity structure.

  The raw weights are scored by ``|w|`` (ST-3) or ``|w|/σ_l`` (ST-3σ,
  ``σ_l = 1/sqrt(Σ dims)``) and handed to the structure's
  :attr:`flipout_jax.structure.Structure.threshold`: unstructured (the
  default) prunes exactly ``round(s·N)`` of all ``N`` prunable weights, those of
  smallest score, ties by position, with one global ``τ`` (the largest
  pruned score; layer ``l`` is thresholded by ``τ·σ_l``); ``fj.n_m(n, m)``
  keeps ``n_t = clip(round((1 − s)·M), N, M)`` per group of M with the
  group's own ``τ_g``; ``fj.units()`` keeps whole units per layer and
  shrinks a kept unit of score ``r`` by ``(r − τ)/r``.

  Thresholds stored: float32 ``[]`` per leaf (``τ_l``), or ``τ_g`` per
  group of M, shape ``(..., in/M, ...)``, for N:M.
  """
  structure = structure_lib.check(structure)
  sigma_normalized = validate.boolean(sigma_normalized, "sigma_normalized")

  def layout(paths, shapes):
    return structure.layout(tuple(paths), tuple(tuple(x) for x in shapes))

  def select(paths, raw, sparsity, previous=None):
    lay = layout(paths, [w.shape for w in raw])
    sigmas = [_sigma(w.shape) if sigma_normalized else 1.0 for w in raw]
    raw = [jax.lax.stop_gradient(w) for w in raw]
    # The stored thresholds back in score units: the previous selection's
    # cut, where this one is likely to be found again.
    hint = None if previous is None else [
        jax.lax.stop_gradient(jnp.asarray(x, jnp.float32) if s == 1.0
                              else jnp.asarray(x, jnp.float32) / jnp.float32(s))
        for x, s in zip(previous, sigmas)]
    sel = structure.threshold(lay, raw, sparsity, divisors=sigmas, hint=hint)
    scale = lambda xs: [jax.lax.stop_gradient(  # pylint: disable=g-long-lambda
        x if s == 1.0 else x * jnp.float32(s)) for x, s in zip(xs, sigmas)]
    return ThresholdSelection(list(sel.masks), scale(sel.taus),
                              scale(sel.thresholds))

  def init(leaves):
    paths = [p for p, _ in leaves]
    shapes = [tuple(x.shape) for _, x in leaves]
    lay = layout(paths, shapes)
    if structure.kind in ("unstructured", "units"):
      # One τ per leaf (ST3State); tracing the selection for its shapes
      # would cost a transformer's init a second.
      return [jnp.zeros([], jnp.float32) for _ in shapes]
    out = jax.eval_shape(
        lambda xs: structure.threshold(lay, xs, jnp.float32(0.0)).thresholds,
        [jax.ShapeDtypeStruct(x, jnp.float32) for x in shapes])
    return [jnp.zeros(o.shape, jnp.float32) for o in out]

  return ThresholdRule(init, select)


def threshold_leaves(rule: ThresholdRule, raw: list[jax.Array], sparsity, *,
                     rescale: bool = True, paths=None, previous=None):
  """ST-3 on a list of prunable tensors with the selection of ``rule``.

  ``previous``: None or the thresholds of the last update (a hint for the
  selection; the results do not depend on it).

  Returns:
    ``(effective, masks, thresholds, scales)``, lists matching ``raw``
    (see :func:`soft_threshold_leaves`; ``thresholds`` as the rule stores
    them).
  """
  paths = [str(i) for i in range(len(raw))] if paths is None else list(paths)
  sel = rule.select(paths, raw, sparsity, previous)
  effective, scales = [], []
  for w, m, tau in zip(raw, sel.masks, sel.taus):
    eff, scale = soft_threshold_rescale(w, m, tau, rescale=rescale)
    effective.append(eff)
    scales.append(scale)
  thresholds = [jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
                for x in sel.thresholds]
  return effective, list(sel.masks), thresholds, scales


def soft_threshold_leaves(raw: list[jax.Array], sparsity: jax.Array, *,
                          sigma_normalized: bool = False,
                          rescale: bool = True):
  """ST-3 on a list of prunable tensors ranked globally.

  :func:`threshold_rule` (unstructured) then :func:`soft_threshold_rescale`
  per tensor.

  Args:
    raw: the raw weights (float arrays, any shapes).
    sparsity: ``s``, a scalar in [0, 1) (may be traced).
    sigma_normalized: rank ``|w|/σ_l`` (ST-3σ) instead of ``|w|``.
    rescale: multiply by the per-output-channel ``scale_c``.

  Returns:
    ``(effective, masks, thresholds, scales)``, lists matching ``raw``: the
    effective weights (raw dtype; +0.0 exactly where masked), bool masks,
    float32 ``[]`` thresholds ``τ_l`` and float32 scales (``[out]`` or
    ``[]``). Nothing is differentiable but ``effective`` w.r.t. ``raw``,
    whose derivative is ``scale_c·m`` (τ and scale are stop_gradient'ed).
  """
  return threshold_leaves(
      threshold_rule(sigma_normalized=sigma_normalized), raw, sparsity,
      rescale=rescale)


def _prunable_paths(layout: PyTree) -> list[tuple[str, Any]]:
  """``[(path, mask leaf)]`` of the prunable leaves, in prunable order."""
  return [(p, x) for p, x in trees.leaves_with_paths(layout) if x is not None]


def st3_effective(raw_params: PyTree, sparsity, *,
                  sigma_normalized: bool = False, rescale: bool = True,
                  filter_fn: trees.FilterFn | None = None,
                  structure=None) -> ST3Weights:
  """The effective weights of raw weights at sparsity ``s`` (no optimizer).

  The same computation as one :func:`st3` update, as a pure function: e.g.
  to export a model from raw weights, or to build a custom training loop.

  Args:
    raw_params: a params pytree of raw weights.
    sparsity: ``s`` in [0, 1), Python float or jnp scalar.
    sigma_normalized: ST-3σ ranking.
    rescale: apply the per-output-channel rescaling.
    filter_fn: ``(path, leaf) -> bool`` selecting the prunable leaves
      (default :func:`flipout_jax.trees.default_filter`).
    structure: the sparsity pattern (default unstructured; see
      :func:`threshold_rule`).

  Returns:
    An :class:`ST3Weights`.

  Raises:
    ValueError: for a layer the structure cannot hold (named).
  """
  rule = threshold_rule(structure, sigma_normalized=sigma_normalized)
  prunable = trees.prunable_tree(raw_params, filter_fn)
  layout = trees.mask_like(raw_params, prunable)
  paths = _prunable_paths(layout)
  rule.init(paths)  # validates the layers
  eff, masks, thr, scales = threshold_leaves(
      rule, trees.prunable_leaves(layout, raw_params), sparsity,
      rescale=rescale, paths=[p for p, _ in paths])
  eff_tree = trees.unflatten_prunable(layout, eff)
  effective = trees.fill_from(eff_tree, raw_params)
  return ST3Weights(effective, trees.unflatten_prunable(layout, masks),
                    trees.unflatten_prunable(layout, thr),
                    trees.unflatten_prunable(layout, scales))


# ------------------------------------------------------------ transformation


def st3(inner: optax.GradientTransformation,
        *,
        sparsity: float,
        start_step: int,
        end_step: int,
        power: float = 3.0,
        rescale: bool = True,
        sigma_normalized: bool = False,
        freeze_step: int | None = None,
        filter_fn: trees.FilterFn | None = None,
        structure=None,
        packed_masks: bool = False
        ) -> optax.GradientTransformationExtraArgs:
  """ST-3 (or ST-3σ) sparse training: raw weights in the state, effective params.

  See the module docstring for the math. In short, each update ``t``:
  ``w ← w + inner(∂L/∂w_eff)`` on the raw weights (straight-through), then
  ``τ``, masks and scales from the new ``w`` at ``s_t``, and
  ``updates = w_eff(w) − params``.

  Args:
    inner: the optimizer of the raw weights (e.g. ``optax.sgd(0.1,
      momentum=0.9)`` with weight decay inside it); it receives the raw
      weights as ``params`` and the gradient at the effective weights.
    sparsity: ``S``, the final fraction of prunable weights at zero, [0, 1).
    start_step: ``t0 >= 0``: updates with count ``<= t0`` mask nothing.
    end_step: ``t1 > t0``: updates with count ``>= t1`` target ``S``
      (README, "Vocabulary"; ST-3 re-selects its masks from the raw
      weights at every update, also after ``t1``, at sparsity ``S``, until
      ``freeze_step`` fixes them).
    power: exponent of the schedule, > 0 (3: cubic, as the paper).
    rescale: the per-output-channel rescaling ``scale_c`` (paper default on).
    sigma_normalized: ST-3σ: rank ``|w|/σ_l``, per-layer ``τ_l = τ·σ_l``.
    freeze_step: ``None`` (never) or an int ``> end_step``: updates with
      count ``>= freeze_step`` fine-tune the weights of update
      ``freeze_step − 1`` under its fixed mask (see the module docstring).
    filter_fn: ``(path, leaf) -> bool`` selecting the prunable leaves
      (default :func:`flipout_jax.trees.default_filter`: ndim >= 2 floats).
    structure: the sparsity pattern: ``fj.unstructured()`` (default: ST-3's
      global ranking), ``fj.n_m(n, m)`` (``sparsity`` must be ``1 − n/m``;
      every update from ``end_step`` on is exactly N:M) or ``fj.units()``
      (whole units per layer); see :func:`threshold_rule`. Whatever the
      structure, the soft threshold and rescale are
      :func:`soft_threshold_rescale`.
    packed_masks: store the masks as bits (0.125 B per weight, not 1);
      the same results bit for bit (:func:`flipout_jax.core.prune`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its state is a
    :class:`flipout_jax.core.PruneState` with ``count`` (updates so far),
    ``masks`` (the masks of the current params; found by
    :func:`flipout_jax.get_masks`), ``method_state`` a
    :class:`flipout_jax.core.RawState` (the raw weights, see
    :func:`get_raw_weights`, and an :class:`ST3State` of thresholds and
    scales), ``key`` (unused; ST-3 is deterministic) and ``inner_state``.
    It is ``core.prune(weights="raw")`` with :func:`st3_rule` and a
    :func:`flipout_jax.schedules.ramp`. ``update(grads,
    state, params, **extra)`` requires ``params`` (the current effective
    weights) and passes ``extra`` to ``inner``.

  Raises:
    ValueError: for ``sparsity`` outside [0, 1), ``start_step < 0``,
      ``end_step <= start_step``, ``power <= 0``, ``freeze_step <=
      end_step``, or (at init) a filter selecting nothing or a layer the
      structure cannot hold.
  """
  sparsity, start_step, end_step, power, freeze_step = _check_args(
      sparsity, start_step, end_step, power, freeze_step)
  rescale = validate.boolean(rescale, "rescale")
  return core.prune(
      inner, weights="raw",
      raw_rule=st3_rule(structure, sigma_normalized=sigma_normalized,
                        rescale=rescale),
      schedule=schedules.ramp(sparsity, start_step, end_step, power),
      structure=structure, freeze_step=freeze_step, filter_fn=filter_fn,
      packed_masks=packed_masks,
      name="st3")


def st3_rule(structure=None, *, sigma_normalized: bool = False,
             rescale: bool = True) -> core.RawRule:
  """ST-3's :class:`flipout_jax.core.RawRule`: the masks and thresholds of
  :func:`threshold_rule` at the ramp's ``s_t``, then
  :func:`soft_threshold_rescale`; its state is an :class:`ST3State`."""
  rule = threshold_rule(structure, sigma_normalized=sigma_normalized)
  rescale = validate.boolean(rescale, "rescale")

  def select(lay, raw, sparsity, groups, keep, previous=None):
    del groups, keep  # counted from the traced s_t by the structure
    eff, masks, thr, scl = threshold_leaves(
        rule, raw, sparsity, rescale=rescale, paths=lay.paths,
        previous=None if previous is None or previous.state is None
        else previous.state.thresholds)
    return core.RawSelection(eff, masks, ST3State(thr, scl))

  def constants(lay, raw, xp):
    # s_0 = 0: nothing masked yet; thresholds 0, scales 1 (jnp or NumPy).
    thresholds = [xp.zeros(xp.shape(x), xp.float32)
                  for x in rule.init(list(zip(lay.paths, raw)))]
    scales = [xp.ones(w.shape[-1:] if w.ndim >= 2 else (), xp.float32)
              for w in raw]
    return [xp.ones(w.shape, xp.bool_) for w in raw], ST3State(
        thresholds, scales)

  def init(lay, raw, sparsity, groups, keep):
    del sparsity, groups, keep
    return constants(lay, raw, jnp)

  def init_host(lay, raw, groups, keep):
    # The same constants, made on the host (nothing to compile for them).
    del groups, keep
    return constants(lay, raw, np)

  def reset(state):
    return ST3State([jnp.zeros_like(x) for x in state.thresholds],
                    [jnp.ones_like(x) for x in state.scales])

  return core.RawRule(init, select, reset, init_host)


# ------------------------------------------------------------------ accessors


def find_st3_state(state: optax.OptState) -> core.PruneState:
  """The one :func:`st3` ``PruneState`` inside ``state`` (e.g. a chain).

  Raises:
    ValueError: if ``state`` holds no ST-3 state, or more than one.
  """
  return core.find_prune_state(state, ST3State, "flipout_jax.st3")


def get_raw_weights(state: optax.OptState, params: PyTree | None = None) -> PyTree:
  """The raw dense weights of a raw-weight method's state (also in a chain).

  Works for every transformation that keeps raw weights in its state
  (:func:`st3` and :func:`flipout_jax.unipts.sparse_training`: a
  ``method_state`` with a ``raw`` field).

  Args:
    state: the optimizer state.
    params: optional current params; if given, the result is params-shaped
      (raw weights at the prunable leaves, ``params``' leaves elsewhere), a
      complete dense model.

  Returns:
    The raw weights in mask layout (None at non-prunable leaves), or a
    params-shaped tree if ``params`` is given.

  Raises:
    ValueError: if ``state`` holds no raw-weight state, or more than one.
  """
  found = [s for s in core.find_prune_states(state)
           if isinstance(s.method_state, core.RawState)]
  if len(found) != 1:
    raise ValueError(
        f"state: holds {len(found)} raw-weight states; pass the optimizer "
        "state of (a chain holding) exactly one transformation with raw "
        "weights (fj.st3, fj.unipts.sparse_training).")
  raw = trees.user_view(found[0].method_state.raw)
  if params is None:
    return raw
  return trees.fill_from(raw, params)


def st3_thresholds(state: optax.OptState) -> PyTree:
  """The thresholds of the last update (mask layout): ``τ_l`` per layer, or
  per group of M with ``structure=fj.n_m(n, m)`` (see :class:`ST3State`)."""
  return trees.user_view(find_st3_state(state).method_state.rule.thresholds)


def st3_scales(state: optax.OptState) -> PyTree:
  """The per-output-channel scales of the last update (mask layout)."""
  return trees.user_view(find_st3_state(state).method_state.rule.scales)


def st3_sparsity(step, *, sparsity: float, start_step: int, end_step: int,
                 power: float = 3.0) -> chex.Array:
  """``s_t`` the update with count ``step`` targets (the cubic schedule)."""
  return schedules.polynomial_sparsity(step, sparsity, start_step, end_step, power)
