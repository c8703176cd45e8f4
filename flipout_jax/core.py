"""The one pruning loop every method plugs pieces into.

:func:`prune` wraps any optax optimizer ("inner") into a transformation whose
state carries the masks and the method's per-weight state. One ``update``:

1. masks the gradient (pruned weights get none);
2. optionally adds a noise piece (FlipOut's per-tensor gradient noise,
   :func:`flipout_jax.noise.gradient_noise`), then masks again;
3. runs the inner optimizer on the masked gradient;
4. lets the method's *tracker* observe the step (e.g. count sign flips);
5. on scheduled steps only (``lax.cond``; no retracing, no host round trip),
   scores the weights and shrinks the masks to the schedule's exact count;
6. returns ``updates = where(mask, inner_update, −params)``, so that
   ``optax.apply_updates`` puts every pruned weight on exactly 0.0 and every
   kept weight on exactly ``param + inner_update``. The inner optimizer's
   moments can therefore never move a pruned weight.

A method is a score function (:mod:`flipout_jax.scores`), a schedule
(:mod:`flipout_jax.schedules`), a distribution
(:mod:`flipout_jax.distributions`), a structure (:mod:`flipout_jax.structure`),
at most a :class:`Tracker` and a noise piece (:mod:`flipout_jax.noise`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flipout_jax import distributions as distributions_lib
from flipout_jax import noise as noise_lib
from flipout_jax import prng
from flipout_jax import schedules as schedules_lib
from flipout_jax import scores as scores_lib
from flipout_jax import selection
from flipout_jax import structure as structure_lib
from flipout_jax import trees
from flipout_jax import validate

PyTree = Any
# Optimizer states that hold a copy of the weights (raw-weights methods
# cannot keep it sparse; masked-weights methods zero it at pruned weights).
_WEIGHT_COPY_STATES = (optax.contrib.ScheduleFreeState,)
RESET_MOMENTS = ("none", "pruned", "grown", "changed", "all")
WEIGHTS = ("masked", "raw")


class PruneState(NamedTuple):
  """State of every transformation in this library (found by ``get_masks``)."""
  count: chex.Array  # int32 []: updates applied so far (saturating).
  # bool[param.shape] per prunable leaf (packed_masks: trees.PackedMask),
  # None elsewhere; read them with get_masks.
  masks: PyTree
  method_state: PyTree  # per-method state in mask layout, e.g. int32 flips.
  key: chex.Array  # uint32 [2]: PRNG key; step t uses fold_in(key, t).
  inner_state: optax.OptState  # the wrapped optimizer's state.


class Step(NamedTuple):
  """What a :class:`Tracker` sees on every update: one step record.

  Attributes:
    step: int32 ``[]``, the step count of this update (0-based), as
      :attr:`flipout_jax.scores.ScoreContext.step`.
    params: the weights before the update.
    new_params: the weights the update proposes, ``param + inner_update``
      at alive weights and 0.0 at pruned ones (before this step's event).
    grads: the masked loss gradient at ``params``, before gradient noise.
    dense_grads: the gradient ``update`` received, before masking (so before
      weight decay when the decay sits inside the inner optimizer).
    masks: the masks in force during this update (before its event).
    extra_args: the extra keyword arguments given to ``update``.
  """
  step: chex.Array
  params: PyTree
  new_params: PyTree
  grads: PyTree
  dense_grads: PyTree
  masks: PyTree
  extra_args: dict[str, Any]


class Tracker(NamedTuple):
  """Per-weight state a method updates every step (e.g. FlipOut's flips).

  Attributes:
    init: ``(params, masks) -> state`` in mask layout.
    update: ``(state, step: Step) -> state``, called on every update with
      its :class:`Step` record, before the step's event (if any).
    prune: ``(state, new_masks) -> state``, the state after an event's
      new masks. It is evaluated on every update and its result kept only
      on events (``where(is_event, prune(state, masks), state)``, which
      fuses into the update's own elementwise pass), so it should be
      elementwise and cheap, as every tracker of the library is.
  """
  init: Callable[[PyTree, PyTree], PyTree]
  update: Callable[[PyTree, Step], PyTree]
  prune: Callable[[PyTree, PyTree], PyTree]


def no_tracker() -> Tracker:
  """A tracker with no state."""
  return Tracker(lambda params, masks: None,
                 lambda state, step: state,
                 lambda state, masks: state)


def layout(structure: structure_lib.Structure,
           masks: PyTree) -> structure_lib.Layout:
  """The structure's static view of the prunable leaves of ``masks``."""
  flat = trees.leaves_with_paths(masks)
  return structure.layout(tuple(p for p, _ in flat),
                          tuple(tuple(m.shape) for _, m in flat))


def budget_table(distribution, masks: PyTree,
                 schedule: schedules_lib.AnySchedule,
                 structure: structure_lib.Structure | None = None):
  """Exact counts for this model's shapes, in the structure's units.

  Returns:
    ``(groups, table)``: the groups of leaves ranked together and the int32
    table ``[len(schedule.targets), num_groups]``, one row per distinct
    target of the schedule (a :class:`flipout_jax.schedules.PeriodicSchedule`
    at a constant sparsity has one row whatever its number of events); event
    ``k`` reads row ``schedule.target_index(k)``.
  """
  structure = structure_lib.check(structure)
  return structure.budget(distribution, layout(structure, masks),
                          tuple(schedule.targets), schedule.final_sparsity)


class MaskUpdate(NamedTuple):
  """What every mask rule returns.

  Attributes:
    masks: the new masks.
    restart: None when nothing restarts (every pruning rule), or, in mask
      layout, bool: weights alive in ``masks`` that restart as if newly
      grown although they were alive before the event (dropped and regrown
      within it; the net mask change does not show them): they land on
      exactly 0.0 and count as grown for ``reset_moments``. Whether it is
      None must not depend on traced values (it shapes the traced update).
  """
  masks: PyTree
  restart: PyTree | None = None


MaskRule = Callable[[scores_lib.ScoreContext, PyTree, Any, jax.Array],
                    MaskUpdate]


class RawSelection(NamedTuple):
  """What a :class:`RawRule` makes of the raw weights (lists over the
  prunable leaves).

  Attributes:
    effective: the effective weights, the raw weights' dtype, exactly +0.0
      where ``masks`` is False: what the params become.
    masks: bool, the kept entries.
    state: None, or the rule's own per-leaf state: a NamedTuple whose fields
      are lists over the prunable leaves (e.g. ST-3's thresholds and
      scales); stored in mask layout in :attr:`RawState.rule`.
  """
  effective: list
  masks: list
  state: Any = None


class RawRule(NamedTuple):
  """How a ``weights="raw"`` method turns raw weights into params.

  Attributes:
    init: ``(layout, raw, sparsity, groups, keep) -> (masks, state)``: the
      masks and rule state of the starting raw weights (a list) at the
      schedule's step-0 target; runs once, eagerly, at ``init``.
    select: ``(layout, raw, sparsity, groups, keep, previous) ->
      RawSelection``, traced inside every update with the stepped raw
      weights. ``sparsity`` is the schedule's target in force (float32
      ``[]``, traced: a :func:`flipout_jax.schedules.ramp` moves every
      step); ``groups`` and ``keep`` the budget of the structure's units
      for it (int32 ``[num_groups]``; all kept before the first event).
      ``previous`` is the last update's :class:`RawSelection` (the params,
      masks and rule state the update started from): a hint only (e.g. to
      warm-start a selection), the result must not depend on it.
    reset: None, or ``state -> state``: the rule's state once the masks are
      frozen (``freeze_step``), e.g. ST-3's thresholds 0 and scales 1.
    init_host: None, or ``(layout, raw, groups, keep) -> (masks, state)``:
      :attr:`init` computed on the host (NumPy arrays in and out, the same
      values), used at ``init`` when every prunable param is a concrete
      array on one device: it saves compiling the rule's selection into
      the init program.
  """
  init: Callable
  select: Callable
  reset: Callable | None = None
  init_host: Callable | None = None


class RawState(NamedTuple):
  """``PruneState.method_state`` of a ``weights="raw"`` transformation.

  Attributes:
    raw: the dense raw weights, param dtype, at the prunable leaves (None
      elsewhere: non-prunable params are trained in place, not copied).
    rule: None or the :class:`RawRule`'s state, each field in mask layout.
  """
  raw: PyTree
  rule: Any = None


def hard_raw_rule(structure: structure_lib.Structure | None = None
                  ) -> RawRule:
  """The raw-weights rule of hard masks: keep the ``keep[g]`` largest
  ``|w|`` of all units of each group (UniPTS's sparse training); effective
  ``where(m, w, 0)``; no rule state.

  Unstructured, the masks are :func:`flipout_jax.selection.magnitude_top_k`
  of the raw weights (the same masks as the structure's ``shrink`` with
  every weight alive), warm-started by the smallest kept ``|w|`` of each
  group in the params the update starts from (the last update's cut, which
  moves little from step to step).
  """
  structure = structure_lib.check(structure)
  fast = structure.kind == "unstructured"

  def masks_of(lay, raw, groups, keep, hint=None):
    if fast:
      sizes = [sum(math.prod(raw[i].shape) for i in g) for g in groups]
      keep = jnp.minimum(jnp.asarray(keep, jnp.int32),
                         jnp.asarray(sizes, jnp.int32))
      return selection.magnitude_top_k(raw, groups, keep, hint=hint)[0]
    alive = [jnp.ones(w.shape, jnp.bool_) for w in raw]
    return structure.shrink(lay, alive, [jnp.abs(w.astype(jnp.float32))
                                         for w in raw], groups, keep)

  def select(lay, raw, sparsity, groups, keep, previous=None):
    del sparsity
    hint = None if previous is None or not fast else _kept_min_keys(
        previous, groups)
    masks = masks_of(lay, raw, groups, keep, hint)
    return RawSelection([jnp.where(m, w, jnp.zeros_like(w))
                         for m, w in zip(masks, raw)], masks)

  # Jitted (cached per layout and shapes): an eager init would run the
  # selection passes op by op, which takes seconds on a CPU.
  init_masks = jax.jit(masks_of, static_argnums=(0, 2))

  def init(lay, raw, sparsity, groups, keep):
    del sparsity
    return init_masks(lay, raw, groups, jnp.asarray(keep, jnp.int32)), None

  def init_host(lay, raw, groups, keep):
    del lay
    return selection.magnitude_top_k_host(raw, groups, keep)[0], None

  return RawRule(init, select, None, init_host if fast else None)


def _kept_min_keys(previous: RawSelection, groups) -> jax.Array:
  """uint32 ``[num_groups]``: the sortable key of the smallest kept ``|p|``
  of each group in ``previous`` (its params and masks; all-ones where
  nothing is kept), a hint for the next magnitude selection.

  Integer minima of the keys: one fused pass over each tensor (a float
  minimum would store its operand first, as YNNPACK's reductions do).
  """
  none = jnp.uint32(0xFFFFFFFF)
  mins = [jnp.min(jnp.where(m, selection.sortable_key(jnp.abs(p)), none))
          for p, m in zip(previous.effective, previous.masks)]
  least = [functools.reduce(jnp.minimum, [mins[i] for i in g], none)
           for g in groups]
  return jnp.stack(least) if least else jnp.zeros((0,), jnp.uint32)


def shrink_masks(masks: PyTree, scores: PyTree, groups, keep,
                 structure: structure_lib.Structure | None = None) -> PyTree:
  """Keeps the ``keep[g]`` highest-scoring *alive* units of each group.

  Masks only shrink: dead weights are ineligible, and a target above the
  number alive keeps just the alive ones. Units and counts are the
  structure's (default :func:`flipout_jax.structure.unstructured`: weights).
  """
  structure = structure_lib.check(structure)
  new_leaves = structure.shrink(
      layout(structure, masks), trees.prunable_leaves(masks, masks),
      trees.prunable_leaves(masks, scores), groups, keep)
  return trees.unflatten_prunable(masks, new_leaves)


def shrink_rule(structure: structure_lib.Structure | None = None) -> MaskRule:
  """The mask rule of pruning methods: :func:`shrink_masks` in ``structure``,
  no restarts."""
  structure = structure_lib.check(structure)

  def rule(ctx: scores_lib.ScoreContext, scores: PyTree, groups,
           keep: jax.Array) -> MaskUpdate:
    return MaskUpdate(shrink_masks(ctx.masks, scores, groups, keep, structure))

  return rule


def drop_and_grow_rule(fraction: Callable[[jax.Array], jax.Array],
                       structure: structure_lib.Structure | None = None,
                       restart_regrown: bool = True) -> MaskRule:
  """The sparse-training mask rule: drop a fraction by ``|θ|``, regrow as many.

  For each group g with ``a_g`` alive units (weights, or the structure's),
  ``n_g = ⌊d_t·a_g⌋``, ``d_t = fraction(step)``:

  1. keep the ``a_g − n_g`` alive units of largest ``|θ|`` (θ after this
     step's update, ``ctx.params``);
  2. grow the ``n_g`` units of highest grow score (the method's score)
     among those not kept (never-alive, dropped before and just-dropped
     alike).

  Both are exact selections (ties: earlier position first), so every group
  holds as many alive units after the event as before; the keep-count of
  the budget is the count of the random start (N:M regrows each group of M
  back to it, see :func:`flipout_jax.structure.n_m`).

  Args:
    fraction: ``step -> d_t`` (float32 in [0, 1]), e.g. DST's cosine decay.
    structure: the sparsity pattern (default unstructured).
    restart_regrown: a weight dropped and grown back in the same event
      restarts at 0.0 with zeroed moments (True: :class:`MaskUpdate` names
      it in ``restart``) or keeps its value and moments (False, RigL's
      reference ``reinit_when_same=False``: ``restart`` is None).

  Returns:
    A :data:`MaskRule`.
  """
  structure = structure_lib.check(structure)
  restart_regrown = validate.boolean(restart_regrown, "restart_regrown")

  def rule(ctx: scores_lib.ScoreContext, grow_scores, groups, keep):
    masks = ctx.masks
    alive = trees.prunable_leaves(masks, masks)
    magnitude = [jnp.abs(p.astype(jnp.float32))
                 for p in trees.prunable_leaves(masks, ctx.params)]
    new, grown = structure.drop_and_grow(
        layout(structure, masks), alive, magnitude,
        trees.prunable_leaves(masks, grow_scores), groups, keep,
        fraction(ctx.step))
    new_masks = trees.unflatten_prunable(masks, new)
    if not restart_regrown:
      return MaskUpdate(new_masks)
    # Grown back right after being dropped: restart at 0.0 with zeroed
    # moments like every grown weight (the net mask change hides them).
    return MaskUpdate(new_masks, trees.unflatten_prunable(
        masks, [g & a for g, a in zip(grown, alive)]))

  return rule


def random_masks(sparsity: float, distribution="erk",
                 structure: structure_lib.Structure | None = None) -> Callable:
  """An ``initial_masks`` function: uniformly random masks at ``sparsity``.

  Group g keeps exactly ``keep_g`` units chosen uniformly at random, with
  the counts of ``structure``'s budget (unstructured: those of
  :func:`flipout_jax.distributions.budget`; for ERK the global count is
  exactly ``N − round(sparsity·N)``).

  Returns:
    ``(params, dense_masks, key) -> masks``, as :func:`prune` expects; it
    reads only the shapes of ``dense_masks`` (``shapes_only``: any tree of
    arrays or ``jax.ShapeDtypeStruct``s in mask layout).
  """
  structure = structure_lib.check(structure)

  def init(params, dense_masks, key):
    del params
    lay = layout(structure, dense_masks)
    groups, table = structure.budget(distribution, lay, (sparsity,), sparsity)
    return trees.unflatten_prunable(
        dense_masks, structure.random(lay, key, groups, table[0]))

  # It reads only the shapes of `dense_masks`: prune's init passes their
  # jax.ShapeDtypeStructs (no dense mask is built; see prune's initial_masks).
  init.shapes_only = True
  return init


def _init_keys(seed) -> tuple[jax.Array, jax.Array]:
  """``jax.random.split(key)`` of the seed's key (``PRNGKey(seed)`` for an
  int): the initial masks' key and the state's.

  An int seed below 2**32 under JAX's default threefry is split on the
  host (:func:`flipout_jax.prng.split_seed`, the same bits): the first init
  then compiles no key program.
  """
  if not isinstance(seed, jax.Array):
    keys = prng.split_seed(seed, 2)
    if keys is not None:
      # (device_put: jnp.asarray would compile a staging program.)
      return jax.device_put(keys[0]), jax.device_put(keys[1])
  base = seed if isinstance(seed, jax.Array) else jax.random.PRNGKey(seed)
  init_key, key = jax.random.split(base)
  return init_key, key


def masked_updates(updates: PyTree, old_masks: PyTree, new_masks: PyTree,
                   params: PyTree, restart: PyTree | None = None) -> PyTree:
  """``where(old & new & ~restart, update, −param)``.

  Weights pruned now or before land on exactly 0.0; weights grown on this
  step (dead before, so exactly 0.0) stay at 0.0, and so do restarted ones
  (:class:`MaskUpdate`); every other weight alive before and after moves by
  exactly the inner update.
  """
  def one(m0, m1, r, u, p):
    if m0 is None:
      return u
    keep = m0 & m1 if r is None else m0 & m1 & ~r
    return jnp.where(keep, u, -p)

  return jax.tree.map(one, old_masks, new_masks, _or_nones(restart, old_masks),
                      updates, params, is_leaf=lambda x: x is None)


def _or_nones(tree: PyTree | None, masks: PyTree) -> PyTree:
  """``tree``, or ``masks``' structure with None at every leaf."""
  if tree is not None:
    return tree
  return jax.tree.map(lambda m: None, masks, is_leaf=lambda x: x is None)


def prune(inner: optax.GradientTransformation,
          *,
          score_fn: scores_lib.ScoreFn | None = None,
          schedule: schedules_lib.AnySchedule,
          mask_rule: MaskRule | None = None,
          distribution: distributions_lib.Distribution = "global",
          structure: structure_lib.Structure | None = None,
          noise: noise_lib.GradientNoise | None = None,
          tracker: Tracker | None = None,
          reset_moments: str = "none",
          filter_fn: trees.FilterFn | None = None,
          initial_masks: PyTree | None = None,
          seed: int = 0,
          weights: str = "masked",
          raw_rule: RawRule | None = None,
          freeze_step: int | None = None,
          pruned_decay: float = 0.0,
          packed_masks: bool = False,
          name: str = "prune") -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that it prunes on the schedule's events.

  Two weight modes share this loop, its state (:class:`PruneState`), its
  budgets (one count convention: a target ``s`` over ``n`` units prunes
  ``round(s·n)``, half to even; README, "Vocabulary") and its checks:

  * ``weights="masked"`` (every mask method): the params are the weights;
    pruned ones sit at exactly 0.0 and get no gradient (steps above).
  * ``weights="raw"`` (ST-3, UniPTS's sparse training): dense *raw*
    weights live in the state (:class:`RawState`) and the params are their
    effective copy. Every update steps the raw weights with ``inner``
    (which gets them as its ``params``) by the gradient at the params
    (straight-through: pruned weights learn too), then ``raw_rule.select``
    re-selects the masks from the stepped raw weights at the schedule's
    target in force and returns ``updates = effective − params``:
    ``optax.apply_updates`` lands pruned entries on exactly +0.0 and kept
    ones on the effective weights up to one rounding (the raw weights are
    the source of truth, so it never accumulates). Must be the last
    transformation of a chain. ``freeze_step``: updates with count
    ``>= freeze_step`` fine-tune the weights of update ``freeze_step − 1``
    (which also replaces the raw weights by its effective ones and resets
    the rule's state) under its fixed masks: pruned weights get no gradient
    and stay at exactly 0.0.

  Args:
    inner: any optax optimizer; it sees the masked (and noised) gradients
      (``weights="raw"``: the straight-through gradients, and the raw
      weights as ``params``).
    score_fn: importance score (required with ``weights="masked"``, None
      with ``"raw"``, whose rule ranks); on an event, the ``keep``
      highest-scoring alive weights of each group stay alive.
    schedule: the pruning events (step, target sparsity).
    mask_rule: ``(ctx, scores, groups, keep) -> MaskUpdate`` on events; the
      default :func:`shrink_rule` of ``structure`` keeps the ``keep[g]`` best
      alive units of each group. Sparse-training methods (DST) pass a
      drop-and-grow rule whose :class:`MaskUpdate` also names the weights
      that restart. A rule gets counts in the units of ``structure``.
    distribution: ``"global"``, ``"uniform"``, ``"erk"`` or ``{path: s}``.
    structure: the sparsity pattern (:mod:`flipout_jax.structure`):
      :func:`flipout_jax.structure.unstructured` (default),
      ``n_m(n, m)`` or ``units(...)``; it counts the budgets and checks at
      ``init`` that the layers can hold it.
    noise: None (default) or a noise piece, ``(grads, masks, key) ->
      grads`` applied to the masked gradient before the inner optimizer
      (the result is masked again), e.g. FlipOut's
      :func:`flipout_jax.noise.gradient_noise`; its key is drawn from the
      state's key per step.
    tracker: per-weight state observed every step (default: none).
    reset_moments: after an event, zero the inner optimizer's per-parameter
      buffers of the weights ``"pruned"`` by it, ``"grown"`` by it,
      ``"changed"`` (either), of ``"all"`` weights (the gradient-flow
      protocol's fresh momentum), or ``"none"``. An inner optimizer that
      keeps a copy of the weights (schedule-free's ``z``) starts from the
      masked params and has every params-shaped buffer, moments and copy
      alike, zeroed at the weights each event prunes, whatever the mode, so
      its evaluation weights are as sparse as the params.
    filter_fn: ``(path, leaf) -> bool`` selecting the prunable leaves
      (default :func:`flipout_jax.trees.default_filter`).
    initial_masks: starting masks (mask layout; e.g. to fine-tune with a
      fixed mask), or a function ``(params, dense_masks, key) -> masks``
      (e.g. DST's random sparse start; one with a true ``shapes_only``
      attribute, as :func:`random_masks`'s, gets the masks'
      ``jax.ShapeDtypeStruct``s); default all alive. Weights whose
      initial mask is False are zeroed by the first update.
    seed: seed of the PRNG key kept in the state (initial masks, noise,
      events): an int, or a PRNG key, which may be traced (e.g. one key
      per seed inside ``jax.vmap``; see also :func:`reseed`).
    weights: ``"masked"`` (default) or ``"raw"`` (see above).
    raw_rule: ``weights="raw"`` only: the :class:`RawRule` that makes the
      effective weights (e.g. ST-3's soft threshold, :func:`hard_raw_rule`).
    freeze_step: ``weights="raw"`` only: None (never) or a step ``>= 1``
      from which the masks are frozen (see above).
    pruned_decay: ``weights="raw"`` only: ``λ >= 0`` added to the raw
      weights' gradient as ``λ·(1 − m)⊙w`` (pruned raw weights decay
      towards 0, UniPTS's SR-STE-like term); traceable.
    packed_masks: store each mask leaf as bits
      (:class:`flipout_jax.trees.PackedMask`, ``jnp.packbits`` along one
      axis, :func:`flipout_jax.trees.packing_axis`: one the param's sharding
      leaves unsharded, or one each shard packs locally): 0.125 byte per
      weight instead of 1. The update unpacks them where they are applied
      and packs only the masks an event changes; params, masks and every
      other state are bit for bit those of ``False``, and ``get_masks``
      returns bool masks either way.
    name: used in error messages.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra keyword arguments of
    ``update`` are passed to the inner optimizer and to ``score_fn``.
  """
  validate.transformation(inner, "inner")
  structure = structure_lib.check(structure)
  validate.choice(weights, "weights", WEIGHTS)
  packed_masks = validate.boolean(packed_masks, "packed_masks")
  if weights == "raw":
    return _raw_prune(inner, raw_rule=raw_rule, schedule=schedule,
                      score_fn=score_fn, mask_rule=mask_rule,
                      distribution=distribution, structure=structure,
                      noise=noise, tracker=tracker,
                      reset_moments=reset_moments, filter_fn=filter_fn,
                      initial_masks=initial_masks, freeze_step=freeze_step,
                      pruned_decay=pruned_decay, packed_masks=packed_masks,
                      name=name)
  for arg, value in (("raw_rule", raw_rule), ("freeze_step", freeze_step)):
    if value is not None:
      raise ValueError(f"{arg}: only with weights='raw', got {value!r}.")
  if isinstance(pruned_decay, (int, float)) and pruned_decay == 0.0:
    pass
  else:
    raise ValueError(f"pruned_decay: only with weights='raw', got "
                     f"{pruned_decay!r}.")
  mask_rule = shrink_rule(structure) if mask_rule is None else mask_rule
  for fn, fn_name in ((score_fn, "score_fn"), (mask_rule, "mask_rule")):
    if not callable(fn):
      raise ValueError(f"{fn_name}: must be callable, got {fn!r}.")
  validate.optional_callable(noise, "noise")
  validate.choice(reset_moments, "reset_moments", RESET_MOMENTS)
  validate.optional_callable(filter_fn, "filter_fn")
  seed = validate.seed(seed)
  distributions_lib.validate_distribution(distribution)
  schedule = schedules_lib.as_schedule(schedule)
  if isinstance(schedule, schedules_lib.Ramp):
    raise ValueError("schedule: a schedules.ramp has no events; it drives "
                     "weights='raw' only (use schedules.polynomial for "
                     "events on the same curve).")
  tracker = no_tracker() if tracker is None else tracker
  inner = optax.with_extra_args_support(inner)

  def build_state(params, given, key, prunable, axes):
    # One compiled program (cached per layout) instead of an eager op chain
    # per leaf: the first init of a deep model would compile each op anew.
    prunable = jax.tree.unflatten(*prunable)
    if given is None:
      masks = trees.mask_like(params, prunable)
    else:  # (no all-alive masks to build and drop)
      masks = trees.map_prunable(
          lambda p, g: jnp.asarray(g, jnp.bool_).reshape(p.shape),
          jax.tree.map(lambda p, s: p if s else None, params, prunable), given)
    # Per-weight state (masks, tracker counts, inner moments) is sharded like
    # the params under jax.sharding, also when built by jnp.zeros, by a
    # jitted initial-mask function or under jit(tx.init); no-op on one device.
    masks = trees.shard_like_params(masks, params)
    return PruneState(
        count=jnp.zeros([], jnp.int32),
        masks=_store_masks(masks, axes),
        method_state=trees.shard_like_params(tracker.init(params, masks),
                                             params),
        key=key,
        # The inner optimizer starts from the masked params, so that a copy
        # of the weights it keeps (schedule-free's z) starts sparse too.
        inner_state=trees.shard_like_params(
            inner.init(trees.apply_masks(params, masks)), params))

  build_state = jax.jit(build_state, static_argnums=(3, 4))

  def init_fn(params):
    prunable = trees.prunable_tree(params, filter_fn)
    paths = [p for (p, _), s in zip(trees.leaves_with_paths(params),
                                    jax.tree.leaves(prunable)) if s]
    distributions_lib.validate_distribution(distribution, paths)
    masks = jax.eval_shape(lambda p: trees.mask_like(p, prunable), params)
    init_key, key = _init_keys(seed)
    given = initial_masks
    # A function, not a mask tree that happens to be callable (an Equinox
    # module of masks has a __call__): mask trees hold arrays.
    if callable(given) and not any(
        hasattr(x, "shape") for x in jax.tree.leaves(given)):
      dense = (masks if getattr(given, "shapes_only", False)
               else trees.mask_like(params, prunable))
      given = given(params, dense, init_key)
    if given is not None:
      trees.check_same_structure(params, given, what=f"{name} initial_masks")
    _warn_empty_budget(name, masks, *budget_table(distribution, masks,
                                                  schedule, structure))
    flat, treedef = jax.tree.flatten(prunable)
    return _placed(build_state(params, given, key, (treedef, tuple(flat)),
                               _packing_axes(packed_masks, params, prunable)),
                   params)

  def update_fn(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{name}: update needs params (call "
                       "tx.update(grads, state, params)).")
    masks = _unpacked(state.masks, state.count)
    trees.check_same_structure(params, masks, what=name)
    validate.same_tree(grads, params, "grads")
    groups, table = budget_table(distribution, masks, schedule, structure)
    step_key = jax.random.fold_in(state.key, state.count)
    noise_key, event_key = jax.random.split(step_key)
    dense_grads = grads

    def step(masks):
      """This update's work on the masks in force: masked (and noised)
      gradient, inner update, the tracker's new state, and the weights the
      step proposes (pruned entries at 0)."""
      clean_grads = trees.apply_masks(dense_grads, masks)
      grads = clean_grads
      if noise is not None:
        grads = trees.apply_masks(noise(grads, masks, noise_key), masks)
      updates, inner_state = inner.update(grads, state.inner_state, params,
                                          **extra_args)
      proposed = trees.map_prunable(lambda m, p, u: jnp.where(m, p + u, 0),
                                    masks, params, updates)
      method_state = tracker.update(state.method_state, Step(
          step=state.count, params=params, new_params=proposed,
          grads=clean_grads, dense_grads=dense_grads, masks=masks,
          extra_args=extra_args))
      return clean_grads, updates, inner_state, proposed, method_state

    # The steady path: every update runs only this (fused with the inner
    # optimizer's own elementwise work) ...
    _, updates, inner_state, _, method_state = step(masks)
    is_event, idx = schedule.event_index(state.count)

    def on_event(masks):
      # ... and an event recomputes the step from the update's inputs (the
      # same operations on the same values, so the same bits) rather than
      # reading the steady path's values: a value computed outside lax.cond
      # and read inside becomes an operand, materialised on every step.
      clean_grads, _, _, proposed, method_state = step(masks)
      ctx = scores_lib.ScoreContext(
          step=state.count, masks=masks, params=proposed, old_params=params,
          grads=clean_grads, dense_grads=dense_grads,
          method_state=method_state, key=event_key, extra_args=extra_args)
      update = mask_rule(ctx, score_fn(ctx), groups,
                         jnp.asarray(table)[schedule.target_index(idx)])
      if not isinstance(update, MaskUpdate):
        raise ValueError(
            f"mask_rule: must return a flipout_jax.core.MaskUpdate(masks, "
            f"restart), got {type(update).__name__}.")
      return update

    # Nothing restarts off events; a rule that never restarts (restart None)
    # gets no restart tree at all. Which one it is shows in its output
    # structure: eval_shape traces the event once more and runs nothing.
    restarts = bool(schedule.num_events) and jax.eval_shape(
        on_event, masks).restart is not None
    new_masks, restart = masks, None
    if schedule.num_events:
      # The cond returns only what an event decides: the masks (packed, if
      # stored packed: only an event packs) and the restarts.
      def event_branch(stored):
        # Unpacked here, not read from outside (see on_event).
        update = on_event(_unpacked(stored, state.count))
        return trees.repack_like(stored, update.masks), update.restart

      def steady_branch(stored):
        return stored, (trees.map_prunable(
            lambda m: jnp.zeros_like(m, dtype=jnp.bool_), masks)
                        if restarts else None)

      stored, restart = jax.lax.cond(is_event, event_branch, steady_branch,
                                     state.masks)
      new_masks = _unpacked(stored, state.count)
      # What follows from the new masks is elementwise and selected by
      # is_event, so off events it fuses into the step's own passes.
      pruned_state = tracker.prune(method_state, new_masks)
      method_state = jax.tree.map(lambda a, b: jnp.where(is_event, a, b),
                                  pruned_state, method_state)
      # An inner optimizer that keeps a copy of the weights (schedule-free's
      # z) has every params-shaped buffer zeroed where weights are pruned,
      # so no copy of a pruned weight survives. Otherwise only what
      # reset_moments asks.
      copies = holds_weight_copy(inner_state)
      if reset_moments != "none" or copies:
        reset = _reset_selection(reset_moments, params, masks, new_masks,
                                 restart, pruned_too=copies)
        reset = jax.tree.map(lambda r: None if r is None else r & is_event,
                             reset, is_leaf=lambda x: x is None)
        inner_state = trees.reset_params_like(inner_state, params, reset)
    else:
      stored = state.masks

    updates = masked_updates(updates, masks, new_masks, params, restart)
    return updates, PruneState(
        count=optax.safe_increment(state.count),
        masks=stored,
        method_state=method_state,
        key=state.key,
        inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _raw_prune(inner, *, raw_rule, schedule, score_fn, mask_rule,
               distribution, structure, noise, tracker, reset_moments,
               filter_fn, initial_masks, freeze_step, pruned_decay,
               packed_masks, name):
  """:func:`prune` with ``weights="raw"`` (its docstring has the contract)."""
  for arg, value in (("score_fn", score_fn), ("mask_rule", mask_rule),
                     ("noise", noise), ("tracker", tracker),
                     ("initial_masks", initial_masks)):
    if value is not None:
      raise ValueError(f"{arg}: not used with weights='raw' (the raw_rule "
                       f"selects every step), got {value!r}.")
  validate.choice(reset_moments, "reset_moments", ("none",))
  if not isinstance(raw_rule, RawRule):
    raise ValueError(f"raw_rule: must be a flipout_jax.core.RawRule with "
                     f"weights='raw', got {raw_rule!r}.")
  if freeze_step is not None:
    freeze_step = validate.step(freeze_step, "freeze_step", low=1)
  # Only enters the traced update: traceable (optax.inject_hyperparams).
  pruned_decay = validate.number(pruned_decay, "pruned_decay", low=0,
                                 traceable=True)
  decays = validate.is_dynamic(pruned_decay) or pruned_decay > 0.0
  validate.optional_callable(filter_fn, "filter_fn")
  distributions_lib.validate_distribution(distribution)
  schedule = schedules_lib.as_schedule(schedule)
  inner = optax.with_extra_args_support(inner)
  is_none = lambda x: x is None  # pylint: disable=unnecessary-lambda-assignment

  def budget(masks):
    """The layout and ``(groups, table)``: row 0 keeps everything (before
    the first event), row ``1 + target_index(k)`` is event ``k``'s."""
    lay = layout(structure, masks)
    groups, table = structure.budget(
        distribution, lay, (0.0,) + tuple(schedule.targets),
        schedule.final_sparsity)
    return lay, groups, table

  def keep_at(table, count):
    if not schedule.num_events:
      return jnp.asarray(table)[0]
    _, idx = schedule.event_index(count)
    row = jnp.where(idx >= 0, 1 + schedule.target_index(idx), 0)
    return jnp.asarray(table)[row]

  def init_fn(params):
    prunable = trees.prunable_tree(params, filter_fn)
    # Shapes only (the state is built by build_state, compiled).
    masks = jax.eval_shape(lambda p: trees.mask_like(p, prunable), params)
    paths = [p for p, _ in trees.leaves_with_paths(masks)]
    distributions_lib.validate_distribution(distribution, paths)
    n = sum(m.size for m in trees.prunable_leaves(masks, masks))
    if n >= 2**31 - 1:
      raise ValueError("params: 2**31 - 1 or more prunable weights; counts "
                       "are int32.")
    lay, groups, table = budget(masks)
    _warn_empty_budget(name, masks, groups, table[1:])
    flat, treedef = jax.tree.flatten(prunable)
    leaves = trees.prunable_leaves(masks, params)
    host = None
    if raw_rule.init_host is not None and all(map(_on_one_device, leaves)):
      # The step-0 selection on the host: the init program then compiles
      # no selection (seconds of CPU for a transformer's many layers).
      host = raw_rule.init_host(lay, [np.asarray(x) for x in leaves], groups,
                                np.asarray(_keep_at_start(table)))
    return _placed(build_state(params, (treedef, tuple(flat)),
                               _packing_axes(packed_masks, params, prunable),
                               host), params)

  def _keep_at_start(table):
    """``keep_at(table, 0)``, concrete also under an outer trace."""
    with jax.ensure_compile_time_eval():
      return np.asarray(keep_at(table, 0))

  def build_state(params, prunable, axes, host):
    # One compiled program per layout (see the masked init).
    masks = trees.mask_like(params, jax.tree.unflatten(*prunable))
    lay, groups, table = budget(masks)
    raw = copy_raw_weights(masks, params)
    if host is None:
      mask_l, rule_state = raw_rule.init(
          lay, trees.prunable_leaves(masks, raw), schedule.sparsity(0),
          groups, keep_at(table, 0))
    else:
      mask_l, rule_state = host
    inner_state = trees.shard_like_params(inner.init(params), params)
    check_no_weight_copy(inner_state, name)
    # Per-weight buffers take their param's sharding (see the masked init).
    return PruneState(
        count=jnp.zeros([], jnp.int32),
        masks=_store_masks(trees.shard_like_params(
            trees.unflatten_prunable(masks, list(mask_l)), params), axes),
        method_state=RawState(raw, trees.shard_like_params(
            _rule_tree(masks, rule_state), params)),
        key=jax.random.PRNGKey(0),  # unused: raw rules are deterministic
        inner_state=inner_state)

  build_state = jax.jit(build_state, static_argnums=(1, 2))

  def update_fn(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{name}: update needs params (call "
                       "tx.update(grads, state, params)).")
    masks = _unpacked(state.masks, state.count)
    trees.check_same_structure(params, masks, what=name)
    validate.same_tree(grads, params, "grads")
    lay, groups, table = budget(masks)
    count = state.count
    raw = state.method_state.raw
    if decays:
      # g + λ·(1 − m)⊙w: pruned raw weights are pulled towards 0.
      grads = jax.tree.map(
          lambda m, g, w: g if m is None else
          (g + pruned_decay * jnp.where(m, jnp.zeros_like(w), w)).astype(
              g.dtype), masks, grads, raw, is_leaf=is_none)
    frozen = None if freeze_step is None else count >= freeze_step
    if frozen is not None:
      # Fine-tuning: pruned weights get no gradient (they are pinned to 0
      # below anyway; this keeps the inner moments from chasing them).
      grads = jax.tree.map(
          lambda m, g: g if m is None else jnp.where(m | ~frozen, g, 0),
          masks, grads, is_leaf=is_none)
    updates, inner_state, new_raw = step_raw_weights(
        inner, grads, state.inner_state, params, masks, raw, **extra_args)
    mask_l = trees.prunable_leaves(masks, masks)
    old_rule = _rule_leaves(masks, state.method_state.rule)

    def select_step(_):
      previous = RawSelection(trees.prunable_leaves(masks, params), mask_l,
                              old_rule)
      sel = raw_rule.select(lay, new_raw, schedule.sparsity(count), groups,
                            keep_at(table, count), previous)
      raw_out, rule_state = new_raw, sel.state
      if freeze_step is not None:
        # The last selecting update: from now on the raw weights are its
        # effective ones and train as plain weights under its masks.
        last = count == freeze_step - 1
        raw_out = [jnp.where(last, e, r) for e, r in zip(sel.effective, raw_out)]
        if rule_state is not None and raw_rule.reset is not None:
          rule_state = jax.tree.map(lambda a, b: jnp.where(last, a, b),
                                    raw_rule.reset(rule_state), rule_state)
      return list(sel.effective), list(sel.masks), raw_out, rule_state

    def fine_tune_step(_):
      # Pruned raw weights are pinned to +0.0 (the inner moments of the
      # selecting phase would move them otherwise).
      raw_out = [jnp.where(m, r, jnp.zeros_like(r))
                 for m, r in zip(mask_l, new_raw)]
      return raw_out, mask_l, raw_out, old_rule

    if frozen is None:
      eff, new_mask_l, raw_out, rule_state = select_step(None)
    else:
      # cond, not where: the fine-tuning phase skips the selection passes.
      eff, new_mask_l, raw_out, rule_state = jax.lax.cond(
          frozen, fine_tune_step, select_step, None)
    return updates_to(eff, updates, params, masks), PruneState(
        count=optax.safe_increment(count),
        masks=trees.repack_like(state.masks,
                                trees.unflatten_prunable(masks, new_mask_l)),
        method_state=RawState(trees.unflatten_prunable(masks, raw_out),
                              _rule_tree(masks, rule_state)),
        key=state.key,
        inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _on_one_device(x) -> bool:
  """Whether ``x`` is a concrete array on one device (or a NumPy array): its
  values can be read on the host without gathering shards."""
  if isinstance(x, np.ndarray):
    return True
  if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
    return False
  return x.is_fully_addressable and len(x.sharding.device_set) == 1


def _rule_tree(masks: PyTree, state):
  """A rule state of leaf lists → the same NamedTuple of mask-layout trees."""
  if state is None:
    return None
  return type(state)(*[trees.unflatten_prunable(masks, list(f))
                       for f in state])


def _rule_leaves(masks: PyTree, state):
  """The inverse of :func:`_rule_tree`."""
  if state is None:
    return None
  return type(state)(*[trees.prunable_leaves(masks, f) for f in state])


def _packing_axes(packed: bool, params: PyTree, prunable: PyTree):
  """Static init argument: None (bool masks), or the packed axis of every
  prunable leaf (a tuple in leaf order; :func:`trees.packing_axis` of the
  param's shape and, where it is known, sharding)."""
  if not packed:
    return None
  return tuple(trees.packing_axis(np.shape(p), trees.param_sharding(p))
               for p, s in zip(jax.tree.leaves(params),
                               jax.tree.leaves(prunable)) if s)


def _unpacked(stored: PyTree, count: jax.Array) -> PyTree:
  """The bool masks of the state's stored masks, for the update.

  Packed masks are unpacked into buffers of their own, as the output of a
  ``lax.cond`` on a traced predicate (``count >= 0``, always true; both
  branches unpack), which XLA cannot fuse into the consumers: fused, the
  unpacking changes how XLA:CPU emits a reduction that reads the masks
  (e.g. FlipOut's ‖g‖ over the masked gradient), and so its last bits; as
  a buffer, every consumer compiles as with bool masks (an
  ``optimization_barrier`` does not stop that fusion). Bool masks are
  returned as they are.
  """
  if not any(isinstance(x, trees.PackedMask) for x in jax.tree.leaves(
      stored, is_leaf=lambda x: isinstance(x, trees.PackedMask))):
    return stored
  return jax.lax.cond(count >= 0, trees.unpack_masks, trees.unpack_masks,
                      stored)


def _store_masks(masks: PyTree, axes) -> PyTree:
  """The masks as the state stores them: bool, or packed along ``axes``."""
  if axes is None:
    return masks
  return trees.pack_masks(masks, trees.unflatten_prunable(masks, list(axes)))


def _placed(state: PruneState, params: PyTree) -> PruneState:
  """``state`` with packed masks placed like their params (see
  :func:`trees.shard_packed_like_params`); unchanged otherwise."""
  return state._replace(masks=trees.shard_packed_like_params(state.masks,
                                                             params))


def _warn_empty_budget(name: str, masks: PyTree, groups, table) -> None:
  """Warns (at init) if the schedule's targets leave a group no weight."""
  if not len(table):
    return
  sizes = [int(np.prod(m.shape)) for m in trees.prunable_leaves(masks, masks)]
  paths = [p for p, _ in trees.leaves_with_paths(masks)]
  empty = [paths[i] for g, members in enumerate(groups)
           if int(np.min(table[:, g])) == 0
           and sum(sizes[i] for i in members) > 0 for i in members]
  if empty:
    warnings.warn(
        f"{name}: the target sparsity leaves no weight in "
        f"{', '.join(empty)} (its keep-count rounds to 0): those layers "
        "collapse, their outputs constant.", stacklevel=3)


def _reset_selection(mode: str, params, old: PyTree, new: PyTree,
                     restart: PyTree | None = None,
                     pruned_too: bool = False) -> PyTree:
  """Which entries ``reset_moments=mode`` zeroes (mask layout); restarted
  weights count as grown; ``pruned_too`` adds the weights the event prunes."""
  if mode == "all":
    return trees.mask_like(params, jax.tree.map(lambda p: True, params))
  rule = {"none": lambda a, b: jnp.zeros_like(a),
          "pruned": lambda a, b: a & ~b,
          "grown": lambda a, b: b & ~a,
          "changed": lambda a, b: a != b}[mode]

  def one(m, a, b, r):
    out = rule(a, b)
    if r is not None and mode not in ("none", "pruned"):
      out = out | r
    return out | (a & ~b) if pruned_too else out

  return trees.map_prunable(one, old, old, new, _or_nones(restart, old))


# ---------------------------------------------------------------------------
# Raw weights in the state (ST-3, UniPTS's sparse training): the optimizer
# steps dense raw weights kept in ``method_state`` and the params are always
# a function of them (the "effective" weights).


def copy_raw_weights(masks: PyTree, params: PyTree) -> PyTree:
  """The raw weights a raw-weights method starts from (mask layout): copies of
  the prunable params, sharded like them.

  Copies, not the params' own buffers, so that a train step donating params
  and state (``jax.jit(..., donate_argnums=...)``) never donates one buffer
  twice.
  """
  raw = trees.map_prunable(lambda m, p: jnp.array(p, copy=True), masks,
                           params)
  return trees.shard_like_params(raw, params)


def holds_weight_copy(inner_state: optax.OptState) -> bool:
  """Whether an optimizer state keeps a copy of the weights (schedule-free);
  read from the state's structure, so it costs nothing under jit."""
  return any(isinstance(x, _WEIGHT_COPY_STATES) for x in jax.tree.leaves(
      inner_state, is_leaf=lambda x: isinstance(x, _WEIGHT_COPY_STATES)))


def check_no_weight_copy(inner_state: optax.OptState, what: str) -> None:
  """Raises if ``inner`` keeps its own copy of the weights (schedule-free).

  A raw-weights method hands the inner optimizer its raw weights, so such a
  copy would follow the raw, not the effective (sparse) weights, and the
  optimizer's evaluation weights would be neither.
  """
  if holds_weight_copy(inner_state):
    raise ValueError(
        f"inner: {_WEIGHT_COPY_STATES[0].__name__} keeps a copy of the "
        f"weights; {what} steps raw weights, so that copy could not be kept "
        "sparse. "
        "Use an optimizer without a weight copy, or a masked-weights method "
        "(e.g. flipout, global_magnitude), which keeps it sparse.")


def step_raw_weights(inner: optax.GradientTransformationExtraArgs,
                     grads: PyTree, inner_state: optax.OptState,
                     params: PyTree, masks: PyTree, raw: PyTree,
                     **extra_args):
  """One step of ``inner`` on the raw weights at the prunable leaves.

  ``inner`` sees the raw weights as its ``params`` where ``masks`` has a
  leaf (so weight decay inside it decays the raw weights) and ``params``
  elsewhere; ``grads`` is the gradient at the params (straight-through).

  Returns:
    ``(updates, inner_state, new_raw)``: ``inner``'s params-shaped updates
    (final at the non-prunable leaves), its new state, and the stepped raw
    weights ``raw + u`` (``optax.apply_updates``' arithmetic) as a list over
    the prunable leaves.
  """
  inner_params = jax.tree.map(lambda m, p, r: p if m is None else r,
                              masks, params, raw,
                              is_leaf=lambda x: x is None)
  updates, inner_state = inner.update(grads, inner_state, inner_params,
                                      **extra_args)
  new_raw = [(r + u).astype(r.dtype) for r, u in zip(
      trees.prunable_leaves(masks, raw), trees.prunable_leaves(masks, updates))]
  return updates, inner_state, new_raw


def updates_to(targets: Sequence[jax.Array], updates: PyTree, params: PyTree,
               masks: PyTree) -> PyTree:
  """Updates that land the prunable params on ``targets`` (a list over the
  prunable leaves): ``target − p`` there, ``updates`` elsewhere.

  ``optax.apply_updates`` then gives ``p + (t − p)``: exactly +0.0 where
  ``t`` is +0.0 (pruned weights), ``t`` up to one rounding elsewhere.
  """
  out = [(t - p).astype(p.dtype)
         for t, p in zip(targets, trees.prunable_leaves(masks, params))]
  return jax.tree.map(lambda o, u: u if o is None else o,
                      trees.unflatten_prunable(masks, out), updates,
                      is_leaf=lambda x: x is None)


def find_prune_states(state: optax.OptState) -> list[PruneState]:
  """All :class:`PruneState` nodes inside an optimizer state (e.g. a chain)."""
  found = [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, PruneState))
           if isinstance(x, PruneState)]
  return found


def find_prune_state(state: optax.OptState, method_state_type: type,
                     what: str) -> PruneState:
  """The one :class:`PruneState` in ``state`` whose ``method_state`` (for
  ``weights="raw"``: its rule state) is a ``method_state_type`` (e.g.
  ST-3's inside a chain).

  Raises:
    ValueError: if ``state`` holds none or several, naming ``what``.
  """
  def kind(s):  # a raw-weights state is known by its rule's state
    return s.method_state.rule if isinstance(s.method_state, RawState) else (
        s.method_state)
  found = [s for s in find_prune_states(state)
           if isinstance(kind(s), method_state_type)]
  if len(found) != 1:
    raise ValueError(
        f"state: holds {len(found)} {what} states; pass the optimizer state "
        f"of (a chain holding) exactly one {what} transformation.")
  return found[0]


def get_masks(state: optax.OptState) -> PyTree:
  """The masks (params-shaped; bool arrays at prunable leaves, None elsewhere).

  Works on the state of any transformation in this library, also when it sits
  inside ``optax.chain``, ``optax.partition`` / ``multi_transform`` /
  ``masked`` (leaves outside every group are None; a subtree no group prunes
  may be one None) or an ``nnx.Optimizer``. If the
  state holds several pruning transformations (e.g. one per partition group),
  a weight is alive only if every one that prunes it keeps it.

  Raises:
    ValueError: if the state holds no pruning transformation.
  """
  found = find_prune_states(state)
  if not found:
    raise ValueError(
        "state: holds no flipout_jax pruning state; pass the optimizer state "
        "returned by a flipout_jax transformation's init/update.")
  masks = trees.user_view(found[0].masks)
  for other in found[1:]:
    masks = trees.combine_masks(masks, trees.user_view(other.masks))
  return masks


def reseed(state: optax.OptState, key: jax.Array) -> optax.OptState:
  """``state`` with the PRNG key of every pruning state replaced.

  The key drives every later random draw of the method (FlipOut's noise,
  random scores and drop-and-grow at events); the masks already drawn at
  ``init`` (e.g. DST's random start) are not redrawn: to vary those, pass a
  key as the constructor's ``seed``. ``key`` may be traced, so inside
  ``jax.vmap`` every seed gets its own randomness::

      states = jax.vmap(lambda k: fj.reseed(tx.init(params), k))(keys)

  Args:
    state: an optimizer state holding flipout_jax transformations (anywhere
      inside a chain, partition or ``nnx.Optimizer``).
    key: a PRNG key (``jax.random.key`` or ``PRNGKey``); the i-th pruning
      state gets ``fold_in(key, i)``.

  Returns:
    The state with new keys, same structure.
  """
  raw = validate.prng_key(key, "key")
  if raw is None:
    raise ValueError(f"key: must be a PRNG key (jax.random.key or PRNGKey), "
                     f"got {key!r}.")
  key = raw
  if not find_prune_states(state):
    raise ValueError("state: holds no flipout_jax pruning state.")
  counter = iter(range(2**31))

  def one(x):
    if not isinstance(x, PruneState):
      return x
    return x._replace(key=jax.random.fold_in(key, next(counter)).astype(
        x.key.dtype))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, PruneState))


def sparse_params(params: PyTree, state: optax.OptState) -> PyTree:
  """``params`` with every weight the state prunes at exactly 0.0.

  ``init`` cannot change the params, so a sparse start (DST's random masks,
  ``fixed_mask``, UniPTS's sparse training) is applied by the first update.
  Start from ``sparse_params(params, tx.init(params))`` when something reads
  the params before that update: an evaluation, the first gradient, or
  ``optax.MultiSteps`` around the pruning transformation (whose first
  update comes after ``k`` mini-steps).

  Args:
    params: the params tree ``state`` was built for.
    state: an optimizer state holding flipout_jax transformations.

  Returns:
    The params, pruned entries replaced by 0.0 (other leaves unchanged).
  """
  return trees.apply_masks(params, get_masks(state))
