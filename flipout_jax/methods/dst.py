"""Dynamic sparse training: DST-EE, RigL and SET as one optax transformation.

Sparse-to-sparse training at a constant number of active weights per layer
(Huang et al. 2023, arXiv 2211.16667; Evci et al. 2020; Mocanu et al. 2018).
All three are :func:`flipout_jax.core.prune` with

* a random sparse start: each group (a layer, for every distribution except
  ``"global"``) keeps a uniformly random subset of exactly the size
  :func:`flipout_jax.distributions.budget` gives it (ERK by default), via the
  core's callable ``initial_masks``; the first update puts every weight
  outside it on exactly 0.0;
* a schedule of events at ``t = k·ΔT`` for ``k = 1, 2, ...`` while
  ``t < T_end`` (``ΔT = every``, ``T_end = end_step``), all at the same
  target sparsity, so the masks keep their counts;
* a drop-and-grow *mask rule* (:func:`drop_and_grow`): in each group with
  ``a`` active weights drop the ``n = ⌊d_t·a⌋`` active weights of smallest
  ``|θ|`` (θ after this step's update), with the cosine-decayed fraction
  ``d_t = d_0/2·(1 + cos(π·t/T_end))``, then grow the ``n`` highest-scoring
  weights among all weights inactive after the drop (just-dropped ones
  included, as in RigL's reference code);
* a grow score:

  - ``"dst_ee"``: ``S_i = |g_i| + c·ln(t + 1)/(N_i + ε)``, with g the dense
    gradient of the step (inactive weights are stored as 0.0, so it exists),
    N_i the number of updates during which weight i has been active so far
    (this one included; a :func:`coverage_counter` tracker) and c the
    exploration weight. c = 0 is exactly RigL;
  - ``"rigl"``: ``|g_i|``;
  - ``"random"`` (SET): uniform random;
* ``reset_moments="grown"``: the inner optimizer's per-parameter buffers
  (momentum, Adam's μ and ν, ... of any optax optimizer or chain) are zeroed
  for grown weights, which start at exactly 0.0.

Mask semantics of an event: the drop step removes ``n`` active weights and
the grow step activates ``n`` of the inactive ones, just-dropped weights
included. Every grown weight, also one dropped and grown back in the same
event (active before and after, so invisible in the net mask change; the
rule reports it in a :class:`flipout_jax.core.MaskUpdate`), starts at
exactly 0.0 with zeroed moments. Per group, #dropped = #grown always.

That restart of a dropped-and-regrown weight is a deliberate deviation from
RigL's reference code, whose default ``reinit_when_same=False`` keeps such a
weight's value (and its moments): here it is treated like every other grown
weight, so that "grown" means the same for every weight of an event.
``restart_regrown=False`` gives the reference behaviour. The results tables
in ``experiments/results`` use the default (``True``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from flipout_jax import core
from flipout_jax import distributions as distributions_lib
from flipout_jax import schedules
from flipout_jax import scores as scores_lib
from flipout_jax import trees
from flipout_jax import validate

GROW = ("dst_ee", "rigl", "random")
# Initial drop fraction d_0 of each family (SPEC §3): 0.5 for the gradient
# growers (RigL and DST-EE, which is RigL plus an exploration bonus), 0.3 for
# SET's random growth.
DEFAULT_DROP_FRACTION = {"dst_ee": 0.5, "rigl": 0.5, "random": 0.3}
# See `dst` for why: of the order of the larger per-weight gradients.
DEFAULT_EXPLORATION = 1e-3
_INT32_MAX = jnp.iinfo(jnp.int32).max


# ----------------------------------------------------------------------------
# The pieces: schedule, drop fraction, tracker, grow scores, mask rule, start.


def dst_schedule(sparsity: float, every: int,
                 end_step: int) -> schedules.Schedule:
  """Mask-update events at ``t = k·every``, ``k >= 1``, ``t < end_step``.

  ``end_step`` is exclusive: at ``t = end_step`` the cosine drop fraction is
  0, so an event there could not change anything. Step 0 is not an event:
  the random start has not been trained yet. Every event targets the same
  ``sparsity``, so the core hands the mask rule the same keep-counts.

  The events are stored arithmetically (a
  :class:`flipout_jax.schedules.PeriodicSchedule` with one level): the
  ``⌊(end_step − 1)/every⌋`` events cost one budget row and no table.

  Returns:
    A :class:`flipout_jax.schedules.PeriodicSchedule` (no events if
    ``end_step <= every``: then the random mask stays fixed).

  Raises:
    ValueError: naming the argument: ``sparsity`` outside [0, 1),
      ``every`` or ``end_step`` not an int in [1, 2**31 − 1].
  """
  sparsity = validate.sparsity(sparsity)
  every = validate.step(every, "every", low=1)
  end_step = _check_end_step(end_step)
  return schedules.PeriodicSchedule(every, every,
                                    (end_step - 1) // every,
                                    (sparsity,))


def _check_end_step(end_step) -> int:
  """``T_end``: exclusive, so up to 2**31 − 1 (the last event is below)."""
  return validate.step(end_step, "end_step", low=1, high=validate.INT32_MAX)


def cosine_drop_fraction(step, drop_fraction: float,
                         end_step: int) -> jax.Array:
  """``d_t = d_0/2·(1 + cos(π·min(t, T_end)/T_end))`` in float32.

  Args:
    step: the step t (int or traced int32).
    drop_fraction: ``d_0``.
    end_step: ``T_end``; ``d_t = 0`` from there on.

  Returns:
    float32 ``[]`` in ``[0, d_0]``.
  """
  t = jnp.minimum(jnp.asarray(step, jnp.float32), float(end_step))
  return jnp.float32(0.5 * drop_fraction) * (
      1.0 + jnp.cos(jnp.float32(math.pi) * t / float(end_step)))


def coverage_counter() -> core.Tracker:
  """``N_i``: the number of updates during which weight i was active.

  int32 counts in mask layout, incremented on every update for the weights
  active in it (the masks in force before that update's event), saturating
  at int32 max like ``optax.safe_increment``. Counts are cumulative: a weight
  keeps its count when dropped and resumes counting when grown again.
  """

  def init(params, masks):
    return trees.map_prunable(lambda m, p: jnp.zeros(p.shape, jnp.int32),
                              masks, params)

  def update(counts, step: core.Step):
    return trees.map_prunable(
        lambda m, c: c + (m & (c < _INT32_MAX)).astype(jnp.int32),
        step.masks, counts)

  return core.Tracker(init, update, lambda counts, masks: counts)


def rigl_score(ctx: scores_lib.ScoreContext):
  """RigL's grow score ``|g|`` of the dense gradient (mask layout, float32)."""
  return trees.map_prunable(lambda m, g: jnp.abs(g.astype(jnp.float32)),
                            ctx.masks, ctx.dense_grads)


def dst_ee_score(exploration: float = DEFAULT_EXPLORATION,
                 epsilon: float = 1.0) -> scores_lib.ScoreFn:
  """DST-EE's acquisition ``S_i = |g_i| + c·ln(t + 1)/(N_i + ε)``.

  ``t`` is the 0-based step count of the update, so ``t + 1`` is the number
  of updates done including this one; ``N_i`` (``ctx.method_state``, from
  :func:`coverage_counter`) counts this update too, so ``N_i <= t + 1`` as
  in UCB's ``n_i <= n``, and ``ln(t + 1) >= 0`` is defined at every step.
  With ``exploration = 0`` the bonus is exactly 0 and this is
  :func:`rigl_score`.
  """
  exploration, epsilon = _check_exploration(exploration, epsilon)

  def score(ctx: scores_lib.ScoreContext):
    log_t = jnp.log(ctx.step.astype(jnp.float32) + 1.0)

    def one(m, g, n):
      bonus = exploration * log_t / (n.astype(jnp.float32) + epsilon)
      return jnp.abs(g.astype(jnp.float32)) + bonus

    return trees.map_prunable(one, ctx.masks, ctx.dense_grads,
                              ctx.method_state)

  return score


def _check_exploration(exploration, epsilon):
  """``c >= 0`` and ``ε > 0``, finite; traceable (only used in the update)."""
  return (validate.number(exploration, "exploration", low=0, traceable=True),
          validate.number(epsilon, "epsilon", low=0, low_open=True,
                          traceable=True))


def check_drop_fraction(drop_fraction, grow: str):
  """``d_0`` in (0, 1), traceable; None gives the family's default."""
  if drop_fraction is None:
    drop_fraction = DEFAULT_DROP_FRACTION[grow]
  return validate.number(drop_fraction, "drop_fraction", low=0, high=1,
                         low_open=True, high_open=True, traceable=True)


def drop_and_grow(drop_fraction: float, end_step: int,
                  restart_regrown: bool = True,
                  structure=None) -> core.MaskRule:
  """The DST mask rule: :func:`flipout_jax.core.drop_and_grow_rule` with
  DST's cosine drop fraction ``d_t`` (:func:`cosine_drop_fraction`).

  For each group g (a layer, or all layers for ``"global"``) with ``a_g``
  active units (weights, or the structure's), ``n_g = ⌊d_t·a_g⌋``: keep the
  ``a_g − n_g`` active ones of largest ``|θ|`` (θ after this step's update),
  grow the ``n_g`` of highest grow score among those not kept. Exact, ties
  by position; each group keeps its count.

  Args:
    drop_fraction: ``d_0``.
    end_step: ``T_end`` of the cosine decay.
    restart_regrown: see :func:`flipout_jax.core.drop_and_grow_rule`.
    structure: the sparsity pattern (default unstructured).

  Returns:
    A :data:`flipout_jax.core.MaskRule`.
  """
  return core.drop_and_grow_rule(
      lambda step: cosine_drop_fraction(step, drop_fraction, end_step),
      structure, restart_regrown)


# ----------------------------------------------------------------------------
# Public constructors.


def dst(inner: optax.GradientTransformation,
        *,
        sparsity: float,
        every: int,
        end_step: int,
        drop_fraction: float | None = None,
        grow: str = "dst_ee",
        exploration: float = DEFAULT_EXPLORATION,
        epsilon: float = 1.0,
        distribution: distributions_lib.Distribution = "erk",
        structure=None,
        filter_fn: trees.FilterFn | None = None,
        restart_regrown: bool = True,
        seed: int = 0, packed_masks: bool = False
        ) -> optax.GradientTransformationExtraArgs:
  """Dynamic sparse training (DST-EE, RigL or SET) wrapped around ``inner``.

  Starts from a random mask at the distribution's per-layer density and,
  every ``every`` steps before ``end_step``, moves
  ``⌊d_t·a_l⌋`` of the ``a_l`` active weights of each layer:

      d_t = d_0/2 · (1 + cos(π t / T_end))
      drop: the smallest |θ| among the active weights (θ after this update)
      grow: the highest S among the weights inactive after the drop, with
        dst_ee:  S_i = |g_i| + c · ln(t + 1) / (N_i + ε)
        rigl:    S_i = |g_i|
        random:  S_i ~ U[0, 1)   (SET)

  g is the dense gradient of the step, t its 0-based count, N_i the number
  of updates (this one included) during which weight i was active. Grown
  weights start at exactly 0.0 with zeroed inner-optimizer moments; by
  default also a weight dropped and grown back in the same event, a
  deliberate deviation from RigL's reference code (see ``restart_regrown``).

  Args:
    inner: any optax optimizer (e.g. ``optax.sgd(0.1, momentum=0.9)``); it
      sees the masked gradient.
    sparsity: fraction of the prunable weights kept at 0.0, in [0, 1). With
      a ``{path: s}`` distribution the mapping's sparsities are used as given.
    every: ΔT, steps between mask updates, an int >= 1.
    end_step: T_end, an int >= 1: no mask update at or after this step (the
      last is at the largest multiple of ΔT below it), and the cosine decay
      reaches 0 here. Commonly 75% of the training steps (RigL). (There
      is no ``start_step``: the first event is at ``every``; ``every`` and
      ``end_step`` as in README, "Vocabulary".)
    drop_fraction: d_0 in (0, 1); default (None) is the family's: 0.5 for
      ``"dst_ee"`` and ``"rigl"``, 0.3 for ``"random"`` (SET).
    grow: ``"dst_ee"``, ``"rigl"`` or ``"random"``.
    exploration: c >= 0, DST-EE's exploration weight (ignored by the others).
      The default 1e-3 puts the bonus of a never-active weight,
      ``c·ln(t+1)/ε ≈ 7e-3 .. 1.2e-2`` for t in 1e3 .. 1e5, at the scale of
      the larger per-weight gradients of batch-mean losses (|g| ~ 1e-4 ..
      1e-2 in CNNs/MLPs with cross-entropy), so exploration competes with
      exploitation instead of swamping it; a weight active for 100 updates
      keeps only ~1% of that bonus. c >~ 1 grows never-active weights
      first (coverage-first), c = 0 is RigL. The paper's value was not
      available to us: tune c per model (SPEC §3).
    epsilon: ε > 0. 1.0 makes ``1/(N + ε)`` a UCB-style ``1/(N + 1)``: the
      bonus of a never-active weight stays finite (``c·ln(t+1)``), so c alone
      sets the trade-off; a tiny ε would make every never-active weight
      outrank every gradient whatever c is.
    distribution: ``"erk"`` (default), ``"uniform"``, ``{path: sparsity}``
      (per layer), or ``"global"`` (one group: only the total count is
      constant and weights may move between layers).
    structure: the sparsity pattern: ``fj.unstructured()`` (default),
      ``fj.n_m(n, m)`` (a random N:M start; every group of M regrows what it
      lost) or ``fj.units(...)`` (whole units move; ``"erk"`` counts weights,
      so pass ``"uniform"`` or ``"global"``); see :mod:`flipout_jax.structure`.
    filter_fn: ``(path, leaf) -> bool``, which leaves are sparse (default:
      float leaves with ndim >= 2).
    restart_regrown: a bool. True (default; the tables in
      ``experiments/results`` use it): a weight dropped and grown back in
      the same event restarts at exactly 0.0 with zeroed moments, like every
      grown weight. False: it keeps its value and moments, as RigL's
      reference code does (``reinit_when_same=False``).
    seed: seed of the random start and of SET's growth.
    packed_masks: store the masks as bits (0.125 B per weight, not 1);
      the same results bit for bit (:func:`flipout_jax.core.prune`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`flipout_jax.core.PruneState` (``flipout_jax.get_masks`` returns
    the active masks); for ``"dst_ee"`` its ``method_state`` holds the int32
    coverage counts N in mask layout.

  Raises:
    ValueError: for arguments outside the ranges above.
  """
  sparsity = validate.sparsity(sparsity)
  schedule = dst_schedule(sparsity, every, end_step)
  end_step = _check_end_step(end_step)
  grow = validate.choice(grow, "grow", GROW)
  drop_fraction = check_drop_fraction(drop_fraction, grow)
  exploration, epsilon = _check_exploration(exploration, epsilon)
  distributions_lib.validate_distribution(distribution)
  restart_regrown = validate.boolean(restart_regrown, "restart_regrown")

  if grow == "dst_ee":
    score_fn, tracker = dst_ee_score(exploration, epsilon), coverage_counter()
  elif grow == "rigl":
    score_fn, tracker = rigl_score, None
  else:
    score_fn, tracker = scores_lib.random, None
  return core.prune(
      inner,
      score_fn=score_fn,
      schedule=schedule,
      mask_rule=drop_and_grow(drop_fraction, end_step, restart_regrown,
                              structure),
      distribution=distribution,
      structure=structure,
      tracker=tracker,
      reset_moments="grown",
      filter_fn=filter_fn,
      initial_masks=core.random_masks(sparsity, distribution, structure),
      seed=seed,
      packed_masks=packed_masks,
      name=grow if grow != "random" else "set")


def dst_ee(inner: optax.GradientTransformation, *, sparsity: float,
           every: int, end_step: int, drop_fraction: float = 0.5,
           exploration: float = DEFAULT_EXPLORATION, epsilon: float = 1.0,
           distribution="erk", structure=None, filter_fn=None,
           restart_regrown: bool = True, seed: int = 0,
           packed_masks: bool = False) -> optax.GradientTransformationExtraArgs:
  """DST-EE (Huang et al. 2023): grow by ``|g| + c·ln(t+1)/(N + ε)``.

  :func:`dst` with ``grow="dst_ee"``; arguments as there.
  """
  return dst(inner, sparsity=sparsity, every=every,
             end_step=end_step, drop_fraction=drop_fraction, grow="dst_ee",
             exploration=exploration, epsilon=epsilon,
             distribution=distribution, structure=structure,
             filter_fn=filter_fn, restart_regrown=restart_regrown, seed=seed,
             packed_masks=packed_masks)


def rigl(inner: optax.GradientTransformation, *, sparsity: float,
         every: int, end_step: int, drop_fraction: float = 0.5,
         distribution="erk", structure=None, filter_fn=None,
         restart_regrown: bool = True, seed: int = 0,
           packed_masks: bool = False) -> optax.GradientTransformationExtraArgs:
  """RigL (Evci et al. 2020): drop by ``|θ|``, grow by ``|g|``.

  :func:`dst` with ``grow="rigl"``; arguments as there.
  """
  return dst(inner, sparsity=sparsity, every=every,
             end_step=end_step, drop_fraction=drop_fraction, grow="rigl",
             distribution=distribution, structure=structure,
             filter_fn=filter_fn, restart_regrown=restart_regrown, seed=seed,
             packed_masks=packed_masks)


def set_(inner: optax.GradientTransformation, *, sparsity: float,
         every: int, end_step: int, drop_fraction: float = 0.3,
         distribution="erk", structure=None, filter_fn=None,
         restart_regrown: bool = True, seed: int = 0,
           packed_masks: bool = False) -> optax.GradientTransformationExtraArgs:
  """SET (Mocanu et al. 2018): drop by ``|θ|``, grow uniformly at random.

  :func:`dst` with ``grow="random"``; arguments as there. (Named ``set_``
  to not shadow the builtin.)
  """
  return dst(inner, sparsity=sparsity, every=every,
             end_step=end_step, drop_fraction=drop_fraction, grow="random",
             distribution=distribution, structure=structure,
             filter_fn=filter_fn, restart_regrown=restart_regrown, seed=seed,
             packed_masks=packed_masks)

