"""FlipOut (Apostol, Stol & Forré 2020) and its gradual-pruning baselines.

All of them are :func:`flipout_jax.core.prune` with a periodic schedule: every
``every`` steps after ``start_step``, remove ``prune_rate`` of the
surviving prunable weights, ranked globally by

* FlipOut: ``τ = |θ|^p / (flips + 1)``, flips = sign changes of the weight
  since initialisation, plus gradient noise of std ``λ‖g‖/√n`` per tensor;
* global magnitude: ``|θ|`` (with ``noise_scale > 0``: noisy global magnitude);
* random: uniform among the survivors.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from flipout_jax import core
from flipout_jax import noise
from flipout_jax import schedules
from flipout_jax import scores
from flipout_jax import trees
from flipout_jax import validate

_INT32_MAX = jnp.iinfo(jnp.int32).max


def flip_counter() -> core.Tracker:
  """Counts, per prunable weight, how often its sign changed.

  ``sign(0) = 0``, so moving to or from exactly 0 counts as a change. Counts
  accumulate from initialisation, saturate at int32 max, are never reset at
  pruning events, and are zeroed for pruned weights.
  """

  def init(params, masks):
    return trees.map_prunable(lambda m, p: jnp.zeros_like(p, dtype=jnp.int32),
                              masks, params)

  def update(counts, step: core.Step):
    def count(m, c, a, b):
      flipped = jnp.sign(a) != jnp.sign(b)
      return c + (flipped & (c < _INT32_MAX)).astype(jnp.int32)
    return trees.map_prunable(count, step.masks, counts, step.params,
                              step.new_params)

  def prune(counts, masks):
    return trees.map_prunable(lambda m, c: jnp.where(m, c, 0), masks, counts)

  return core.Tracker(init, update, prune)


def periodic_schedule(sparsity: float, every: int | None,
                      prune_rate: float, start_step: int,
                      end_step: int | None) -> schedules.Schedule:
  """Events every ``every`` steps, or spread to finish by ``end_step``
  (a :class:`flipout_jax.schedules.PeriodicSchedule` of ~log events)."""
  if (every is None) == (end_step is None):
    raise ValueError(
        "every: give exactly one of every (steps between events) "
        "or end_step (reach the target sparsity by this step).")
  if every is not None:
    return schedules.periodic(sparsity, every, prune_rate, start_step)
  return schedules.periodic_until(sparsity, end_step, prune_rate, start_step)


def flipout(inner: optax.GradientTransformation, *, sparsity: float,
            every: int | None = None, prune_rate: float = 0.5,
            p: float = 2.0, noise_scale: float = 1.0, noise_on: str = "all",
            exact_noise: bool = False, noise_generator: str = "threefry",
            start_step: int = 0, end_step: int | None = None,
            distribution="global", structure=None, filter_fn=None,
            seed: int = 0, packed_masks: bool = False
        ) -> optax.GradientTransformationExtraArgs:
  """FlipOut: prune the weights whose sign oscillates, ``τ = |θ|^p/(flips+1)``.

  Args:
    inner: the optimizer to wrap (e.g. ``optax.sgd(0.1, momentum=0.9)``).
    sparsity: final fraction of prunable weights at 0, in [0, 1); the final
      number pruned is ``round(sparsity·N)`` exactly.
    every: steps between pruning events (events at
      ``start_step + k·every``, ``k >= 1``); or give ``end_step`` instead.
    prune_rate: fraction of the surviving weights each event removes, (0, 1).
    p: exponent of the magnitude in the saliency, finite and > 0.
    noise_scale: λ of the gradient noise, finite and >= 0; 0 disables it.
    noise_on: ``"all"`` leaves (the reference) or ``"prunable"`` only.
    exact_noise: use ``jax.random.normal`` rather than the cheaper 16-bit
      inverse-CDF normals (see :mod:`flipout_jax.noise`).
    noise_generator: the random words of those normals, ``"threefry"``
      (JAX's) or ``"hash"`` (a counter hash, ~8x cheaper to draw; see
      :func:`flipout_jax.noise.hash_bits`).
    start_step: the first event is at ``start_step + every``.
    end_step: reach ``sparsity`` at (or just before) this step instead of
      giving ``every`` (then ``every = (end_step − start_step) // n``, ``n``
      the events needed). ``every``, ``start_step``, ``end_step``: README,
      "Vocabulary".
    distribution: ``"global"`` (the paper), ``"uniform"``, ``"erk"`` or a map.
    structure: the sparsity pattern: ``fj.unstructured()`` (default),
      ``fj.n_m(n, m)`` or ``fj.units(...)`` (:mod:`flipout_jax.structure`).
    filter_fn: which leaves are prunable (default: float leaves, ndim >= 2).
    seed: PRNG seed of the gradient noise, an int in [0, 2**63 − 1].
    packed_masks: store the masks as bits (0.125 B per weight, not 1);
      the same results bit for bit (:func:`flipout_jax.core.prune`).

  ``p`` and ``noise_scale`` may be traced (``optax.inject_hyperparams``);
  every other numeric argument shapes the schedule, the keep-counts or the
  PRNG key and must be a Python number (list it in ``static_args``).

  Returns:
    An optax transformation; its state holds masks and int32 flip counts.

  Raises:
    ValueError: naming the argument, for a value outside the ranges above,
      a string or bool given as a number, a traced static argument, or a
      last event beyond the int32 step counter (step 2**31 − 2).
  """
  # p only enters the traced score: traceable (optax.inject_hyperparams).
  p = validate.number(p, "p", low=0, low_open=True, traceable=True)
  return core.prune(
      inner, score_fn=scores.flipout_saliency(p),
      schedule=periodic_schedule(sparsity, every, prune_rate,
                                 start_step, end_step),
      distribution=distribution, structure=structure,
      noise=noise.gradient_noise(noise_scale, on=noise_on, exact=exact_noise,
                                 generator=noise_generator),
      tracker=flip_counter(), filter_fn=filter_fn, seed=seed,
      packed_masks=packed_masks, name="flipout")


def global_magnitude(inner: optax.GradientTransformation, *, sparsity: float,
                     every: int | None = None, prune_rate: float = 0.5,
                     noise_scale: float = 0.0, noise_on: str = "all",
                     exact_noise: bool = False,
                     noise_generator: str = "threefry", start_step: int = 0,
                     end_step: int | None = None,
                     distribution="global", structure=None, filter_fn=None,
                     seed: int = 0, packed_masks: bool = False
        ) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning on FlipOut's schedule; score ``|θ|``.

  ``noise_scale > 0`` adds FlipOut's gradient noise: the paper's "noisy
  global magnitude" ablation. Arguments as in :func:`flipout`.
  """
  return core.prune(
      inner, score_fn=scores.magnitude,
      schedule=periodic_schedule(sparsity, every, prune_rate,
                                 start_step, end_step),
      distribution=distribution, structure=structure,
      noise=noise.gradient_noise(noise_scale, on=noise_on, exact=exact_noise,
                                 generator=noise_generator),
      filter_fn=filter_fn, seed=seed,
      packed_masks=packed_masks, name="global_magnitude")


def random_pruning(inner: optax.GradientTransformation, *, sparsity: float,
                   every: int | None = None, prune_rate: float = 0.5,
                   start_step: int = 0, end_step: int | None = None,
                   distribution="global", structure=None, filter_fn=None,
                   seed: int = 0, packed_masks: bool = False
        ) -> optax.GradientTransformationExtraArgs:
  """Removes ``prune_rate`` of the survivors uniformly at random per event."""
  return core.prune(
      inner, score_fn=scores.random,
      schedule=periodic_schedule(sparsity, every, prune_rate,
                                 start_step, end_step),
      distribution=distribution, structure=structure, filter_fn=filter_fn,
      seed=seed,
      packed_masks=packed_masks,
      name="random_pruning")
