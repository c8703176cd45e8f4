"""Pruning schedules: at which steps masks change and which sparsity they reach.

A schedule is a static, finite list of *events* ``(step, sparsity)``.
The event at ``step`` fires inside the update whose step count (number of
updates done before it) equals ``step``; it prunes the model to ``sparsity``
of the prunable weights. Being static, its distinct targets are turned into
exact integer keep-counts once per model (see
:mod:`flipout_jax.distributions`) and looked up inside the jitted update
with no host round trip. Two representations share one interface
(``num_events``, ``targets``, ``event_index``, ``target_index``,
``sparsity``, ``final_sparsity``):

* :class:`Schedule`: one entry per event (custom lists, one-shot,
  polynomial, N:M);
* :class:`PeriodicSchedule`: events every ``every`` steps with one target
  per *distinct* level, the event index computed arithmetically from the
  step count, so its cost does not grow with the number of events (DST's
  ``every=2`` up to step 2**31 − 2 holds one budget row).

Every event step must be in ``[0, 2**31 − 2]``: the step counter is int32
and saturates at 2**31 − 1 (constructors raise, naming the argument).

The arguments ``every``, ``start_step`` and ``end_step`` mean what they mean
in every method constructor (README, "Vocabulary"): update counts; no event
before ``start_step`` or after ``end_step``, ``every`` steps between events.

Constructors:

* :func:`one_shot`: one event (SNIP at step 0, or prune-after-training).
* :func:`periodic`: every ``every`` steps remove ``rate`` of the survivors
  until ``sparsity`` (FlipOut: sparsity after n events is ``1 − (1−rate)^n``;
  the last event removes only what is needed).
* :func:`periodic_until`: the same, reaching ``sparsity`` at ``end_step``
  (the period is derived from the number of events needed).
* :func:`n_events`: ``num_events`` equal-rate events,
  rate ``1 − (1 − S)^(1/N)``.
* :func:`polynomial`: Zhu & Gupta's gradual schedule
  ``s_t = S·(1 − (1 − (t − t0)/(t1 − t0))^power)`` (cubic for power 3).
* :func:`rounds`: the gradient-flow protocol: round k removes
  ``r_k = p / (k·p + n·(1 − p))`` of what is left, reaching exactly ``p``
  after ``n`` rounds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence, Union

import jax.numpy as jnp
import numpy as np

from flipout_jax import validate


def _check_targets(sparsities, name: str) -> tuple[float, ...]:
  """Sparsities in [0, 1), non-decreasing (masks only shrink)."""
  out = tuple(validate.sparsity(s, f"{name}[{i}]")
              for i, s in enumerate(sparsities))
  for i, (a, b) in enumerate(zip(out, out[1:])):
    if b < a:
      raise ValueError(
          f"{name}: must be non-decreasing (masks only shrink), got {b} after "
          f"{a} at event {i + 1}.")
  return out


def _target_sparsity(schedule, step) -> jnp.ndarray:
  """Target sparsity in force at ``step`` (0 before the first event)."""
  if not schedule.num_events:
    return jnp.float32(0.0)
  _, idx = schedule.event_index(step)
  table = jnp.asarray(schedule.targets, jnp.float32)
  return jnp.where(idx >= 0, table[schedule.target_index(idx)], 0.0)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A finite, static list of pruning events, one entry per event.

  Attributes:
    steps: strictly increasing ints in ``[0, 2**31 − 2]`` (the int32 step
      counter): the step of each event.
    sparsities: the target sparsity of each event, non-decreasing, in [0, 1).
  """
  steps: tuple[int, ...]
  sparsities: tuple[float, ...]

  def __post_init__(self):
    if not isinstance(self.steps, (tuple, list)) or not isinstance(
        self.sparsities, (tuple, list)):
      raise ValueError("schedule: steps and sparsities must be tuples, got "
                       f"{type(self.steps).__name__} and "
                       f"{type(self.sparsities).__name__}.")
    if len(self.steps) != len(self.sparsities):
      raise ValueError(
          f"schedule: steps ({len(self.steps)}) and sparsities "
          f"({len(self.sparsities)}) differ in length.")
    steps = tuple(validate.step(s, f"schedule.steps[{i}]")
                  for i, s in enumerate(self.steps))
    for i, (a, b) in enumerate(zip(steps, steps[1:])):
      if b <= a:
        raise ValueError(f"schedule.steps: must increase strictly, got {b} "
                         f"after {a} at event {i + 1}.")
    object.__setattr__(self, "steps", steps)
    object.__setattr__(self, "sparsities",
                       _check_targets(self.sparsities, "schedule.sparsities"))

  @property
  def num_events(self) -> int:
    return len(self.steps)

  @property
  def targets(self) -> tuple[float, ...]:
    """The budget rows: one target per event."""
    return self.sparsities

  @property
  def final_sparsity(self) -> float:
    return self.sparsities[-1] if self.sparsities else 0.0

  def event_index(self, step: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(is_event, index)`` of the event at ``step`` (index of the last event
    at or before ``step``, -1 before the first). Works on traced steps."""
    if not self.steps:
      return jnp.bool_(False), jnp.int32(-1)
    steps = jnp.asarray(self.steps, jnp.int32)
    idx = jnp.searchsorted(steps, step, side="right").astype(jnp.int32) - 1
    is_event = (idx >= 0) & (steps[jnp.maximum(idx, 0)] == step)
    return is_event, idx

  def target_index(self, index: jnp.ndarray) -> jnp.ndarray:
    """Row of :attr:`targets` for event ``index`` (row 0 before the first)."""
    return jnp.maximum(index, 0)

  def sparsity(self, step: jnp.ndarray) -> jnp.ndarray:
    """Target sparsity in force at ``step`` (0 before the first event)."""
    return _target_sparsity(self, step)


@dataclasses.dataclass(frozen=True)
class PeriodicSchedule:
  """Events every ``every`` steps, stored in O(distinct targets).

  Event ``k = 0 .. num_events − 1`` is at step ``first + k·every`` and
  targets ``levels[min(k, len(levels) − 1)]``: a constant sparsity (DST,
  one level) or one level per event (FlipOut's ``1 − (1 − r)^k``, ~log
  events). The event index and the target row are computed from the step
  count inside the update, ``k = (t − first) // every``, so a schedule of
  2**30 events costs what a schedule of one does.

  Attributes:
    first: step of event 0, in ``[0, 2**31 − 2]``.
    every: steps between events, >= 1.
    num_events: number of events, >= 0; the last one,
      ``first + (num_events − 1)·every``, must be <= 2**31 − 2.
    levels: non-decreasing sparsities in [0, 1), at most ``num_events``
      (at least one if there are events).
  """
  first: int
  every: int
  num_events: int
  levels: tuple[float, ...]

  def __post_init__(self):
    first = validate.step(self.first, "schedule.first")
    every = validate.step(self.every, "schedule.every", low=1)
    num = validate.integer(self.num_events, "schedule.num_events", low=0)
    levels = _check_targets(tuple(self.levels), "schedule.levels")
    if num and not 1 <= len(levels) <= num:
      raise ValueError(f"schedule.levels: must hold 1 to num_events={num} "
                       f"sparsities, got {len(levels)}.")
    if num:
      validate.last_event_step(
          first + (num - 1) * every, "schedule.num_events",
          f"first={first} + ({num} - 1)·every={every}")
    for field, value in (("first", first), ("every", every),
                         ("num_events", num), ("levels", levels)):
      object.__setattr__(self, field, value)

  @property
  def targets(self) -> tuple[float, ...]:
    """The budget rows: the distinct levels (event k uses row min(k, L−1))."""
    return self.levels if self.num_events else ()

  @property
  def steps(self) -> tuple[int, ...]:
    """Every event step (materialised: O(num_events); the update never
    reads it)."""
    return tuple(range(self.first, self.first + self.num_events * self.every,
                       self.every))

  @property
  def sparsities(self) -> tuple[float, ...]:
    """The target of every event (materialised: O(num_events))."""
    last = len(self.levels) - 1
    return tuple(self.levels[min(k, last)] for k in range(self.num_events))

  @property
  def final_sparsity(self) -> float:
    return self.levels[-1] if self.num_events else 0.0

  def event_index(self, step: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(is_event, index)`` as :meth:`Schedule.event_index`, by arithmetic:
    ``k = (t − first) // every``, an event iff ``t >= first``, ``every``
    divides ``t − first`` and ``k < num_events``. int32 throughout (no
    overflow: ``0 <= t, first < 2**31``)."""
    if not self.num_events:
      return jnp.bool_(False), jnp.int32(-1)
    offset = jnp.asarray(step, jnp.int32) - jnp.int32(self.first)
    k = offset // jnp.int32(self.every)
    is_event = ((offset >= 0) & (offset % jnp.int32(self.every) == 0)
                & (k < self.num_events))
    idx = jnp.where(offset < 0, jnp.int32(-1),
                    jnp.minimum(k, jnp.int32(self.num_events - 1)))
    return is_event, idx.astype(jnp.int32)

  def target_index(self, index: jnp.ndarray) -> jnp.ndarray:
    """Row of :attr:`targets` for event ``index``: ``clip(k, 0, L − 1)``."""
    return jnp.clip(index, 0, len(self.levels) - 1).astype(jnp.int32)

  def sparsity(self, step: jnp.ndarray) -> jnp.ndarray:
    """Target sparsity in force at ``step`` (0 before the first event)."""
    return _target_sparsity(self, step)


@dataclasses.dataclass(frozen=True)
class Ramp:
  """A target that moves every step, no events: Zhu & Gupta's curve
  :func:`polynomial_sparsity` evaluated at the (traced) step count.

  It drives the ``weights="raw"`` mode of :func:`flipout_jax.core.prune`,
  whose rule re-selects the masks from the raw weights at every update
  (ST-3's cubic ramp), so no budget table per step exists: the rule counts
  ``round(s_t·n)`` inside the update. Build it with :func:`ramp`.

  Attributes:
    target: ``S``, reached at ``end_step``, in [0, 1).
    start_step: ``t0``; ``initial`` up to it.
    end_step: ``t1 > t0``.
    power: > 0; may be a traced scalar (``optax.inject_hyperparams``).
    initial: ``s0`` in [0, S].
  """
  target: float
  start_step: int
  end_step: int
  power: Any = 3.0
  initial: float = 0.0

  num_events = 0
  steps = ()

  @property
  def targets(self) -> tuple[float, ...]:
    """One budget row, the final target (what init checks and warns on)."""
    return (self.target,)

  @property
  def final_sparsity(self) -> float:
    return self.target

  def event_index(self, step: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    del step
    return jnp.bool_(False), jnp.int32(-1)

  def target_index(self, index: jnp.ndarray) -> jnp.ndarray:
    return jnp.zeros_like(index)

  def sparsity(self, step: jnp.ndarray) -> jnp.ndarray:
    """``s_t``, float32, at a (traced) step."""
    return polynomial_sparsity(step, self.target, self.start_step,
                               self.end_step, self.power, self.initial)


def ramp(sparsity: float, start_step: int, end_step: int,
         power: float = 3.0, initial: float = 0.0) -> Ramp:
  """A :class:`Ramp` from ``initial`` at ``start_step`` to ``sparsity`` at
  ``end_step`` (``power`` traceable).

  Raises:
    ValueError: naming the argument, for sparsities outside [0, 1),
      ``initial > sparsity``, ``end_step <= start_step`` or ``power <= 0``.
  """
  sparsity = validate.sparsity(sparsity)
  initial = validate.sparsity(initial, "initial")
  if initial > sparsity:
    raise ValueError(f"initial: must be <= sparsity={sparsity}, got "
                     f"{initial}.")
  start = validate.step(start_step, "start_step")
  end = validate.step(end_step, "end_step")
  validate.ordered(end, "end_step", start, "start_step")
  power = validate.number(power, "power", low=0, low_open=True,
                          traceable=True)
  return Ramp(sparsity, start, end, power, initial)


AnySchedule = Union[Schedule, PeriodicSchedule, Ramp]


def events_needed(sparsity: float, rate: float) -> int:
  """Events of ``rate`` needed to reach ``sparsity``: ceil(log(1−S)/log(1−r))."""
  if sparsity <= 0.0:
    return 0
  # The epsilon absorbs float error for exact powers, e.g. 1 − 0.5^3.
  return max(1, math.ceil(math.log1p(-sparsity) / math.log1p(-rate) - 1e-9))


def one_shot(sparsity: float, start_step: int = 0) -> Schedule:
  """A single event at ``start_step`` pruning to ``sparsity`` (so
  ``end_step = start_step``)."""
  return Schedule((validate.step(start_step, "start_step"),),
                  (validate.sparsity(sparsity),))


def periodic(sparsity: float, every: int, rate: float = 0.5,
             start_step: int = 0) -> PeriodicSchedule:
  """Every ``every`` steps after ``start_step``, remove ``rate`` of the
  survivors.

  Events are at ``start_step + k·every`` for ``k = 1..n``, ``n`` the number
  needed to reach ``sparsity``; event k targets
  ``min(1 − (1 − rate)^k, sparsity)``.

  Raises:
    ValueError: naming the argument (``every``, ``prune_rate``,
      ``start_step``, ``sparsity``), also if the last event would be beyond
      the int32 step counter (step ``2**31 − 2``).
  """
  sparsity = validate.sparsity(sparsity)
  every = validate.step(every, "every", low=1)
  rate = validate.number(rate, "prune_rate", low=0, high=1, low_open=True,
                         high_open=True)
  start = validate.step(start_step, "start_step")
  n = events_needed(sparsity, rate)
  validate.last_event_step(
      start + n * every, "every",
      f"start_step={start} + {n} events·every={every} to reach "
      f"sparsity {sparsity} at prune_rate {rate}")
  levels = tuple(min(1.0 - (1.0 - rate) ** k, sparsity) for k in range(1, n + 1))
  return PeriodicSchedule(start + every, every, n, levels)


def periodic_until(sparsity: float, end_step: int, rate: float = 0.5,
                   start_step: int = 0) -> AnySchedule:
  """:func:`periodic` with the period chosen so the last event is at or just
  before ``end_step``: ``every = (end_step − start_step) // n``."""
  sparsity = validate.sparsity(sparsity)
  rate = validate.number(rate, "prune_rate", low=0, high=1, low_open=True,
                         high_open=True)
  end_step = validate.step(end_step, "end_step", low=1)
  start = validate.step(start_step, "start_step")
  n = events_needed(sparsity, rate)
  if n == 0:
    return Schedule((), ())
  every = (end_step - start) // n
  if every <= 0:
    raise ValueError(
        f"end_step: {end_step} leaves no room for {n} events after start "
        f"{start}; need end_step >= start + {n}.")
  return periodic(sparsity, every, rate, start)


def n_events(sparsity: float, num_events: int, every: int,
             start_step: int = 0) -> PeriodicSchedule:
  """``num_events`` events at ``start_step + k·every``, ``k = 1..num_events``,
  each removing ``1 − (1 − S)^(1/N)`` of the survivors."""
  sparsity = validate.sparsity(sparsity)
  num_events = validate.integer(num_events, "num_events", low=1)
  every = validate.step(every, "every", low=1)
  start = validate.step(start_step, "start_step")
  validate.last_event_step(start + num_events * every, "every",
                           f"start_step={start} + num_events={num_events}"
                           f"·every={every}")
  sps = tuple(1.0 - (1.0 - sparsity) ** (k / num_events)
              for k in range(1, num_events + 1))
  return PeriodicSchedule(start + every, every, num_events,
                          sps[:-1] + (sparsity,))


def polynomial_sparsity(step, sparsity: float, start_step: int,
                        end_step: int, power: float = 3.0,
                        initial: float = 0.0):
  """Zhu & Gupta: ``s_t = S + (s0 − S)·(1 − (t − t0)/(t1 − t0))^power``.

  0-dimensional jnp value; ``initial`` up to ``start_step`` (``t0``),
  ``sparsity`` from ``end_step`` (``t1``) on. Works on traced steps (ST-3
  evaluates it every step).
  """
  start, end = start_step, end_step
  frac = jnp.clip((jnp.asarray(step, jnp.float32) - start) / (end - start), 0.0, 1.0)
  # Before start frac = 0 gives ``initial``; after end frac = 1 gives S.
  return sparsity + (initial - sparsity) * (1.0 - frac) ** power


def polynomial(sparsity: float, start_step: int, end_step: int,
               every: int = 1, power: float = 3.0,
               initial: float = 0.0) -> Schedule:
  """Events every ``every`` steps from ``start_step`` to ``end_step`` (both
  included) on the polynomial curve of :func:`polynomial_sparsity`."""
  sparsity = validate.sparsity(sparsity)
  initial = validate.sparsity(initial, "initial")
  start = validate.step(start_step, "start_step")
  end = validate.step(end_step, "end_step")
  every = validate.step(every, "every", low=1)
  validate.ordered(end, "end_step", start, "start_step")
  power = validate.number(power, "power", low=0, low_open=True)
  steps = list(range(start, end + 1, every))
  if steps[-1] != end:
    steps.append(end)
  t = (np.asarray(steps, np.float64) - start) / (end - start)
  sps = sparsity + (initial - sparsity) * (1.0 - t) ** power
  sps[-1] = sparsity
  return Schedule(tuple(steps), tuple(float(s) for s in np.maximum.accumulate(sps)))


def rounds_sparsities(sparsity: float, num_rounds: int) -> tuple[float, ...]:
  """Cumulative sparsity after each round of the gradient-flow protocol.

  Round k removes ``r_k = p/(k·p + n(1 − p))`` of what is left, so the
  fraction left after k rounds telescopes to ``n(1−p)/(k·p + n(1−p))``.
  """
  p, n = sparsity, num_rounds
  return tuple(1.0 - n * (1 - p) / (k * p + n * (1 - p)) for k in range(1, n + 1))


def rounds(sparsity: float, num_rounds: int, every: int,
           start_step: int = 0) -> PeriodicSchedule:
  """``num_rounds`` events at ``start_step + k·every``, ``k = 1..num_rounds``."""
  sparsity = validate.sparsity(sparsity)
  num_rounds = validate.integer(num_rounds, "rounds", low=1)
  every = validate.step(every, "every", low=1)
  start = validate.step(start_step, "start_step")
  validate.last_event_step(
      start + num_rounds * every, "every",
      f"start_step={start} + rounds={num_rounds}·every={every}")
  sps = rounds_sparsities(sparsity, num_rounds)
  return PeriodicSchedule(start + every, every, num_rounds,
                          sps[:-1] + (sparsity,))


def as_schedule(events: AnySchedule | Sequence[tuple[int, float]],
                name: str = "schedule") -> AnySchedule:
  """Accepts a schedule or a list of ``(step, sparsity)`` pairs.

  Raises:
    ValueError: naming ``name``, for anything else, steps that do not
      increase strictly or leave ``[0, 2**31 − 2]``, and sparsities outside
      [0, 1) or decreasing.
  """
  if isinstance(events, (Schedule, PeriodicSchedule, Ramp)):
    return events
  if isinstance(events, (str, bytes)) or not isinstance(events, Sequence):
    raise ValueError(
        f"{name}: must be a flipout_jax.schedules.Schedule or a list of "
        f"(step, sparsity) pairs, got {type(events).__name__}.")
  pairs = list(events)
  for i, pair in enumerate(pairs):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(f"{name}: event {i} must be a (step, sparsity) pair, "
                       f"got {pair!r}.")
  return Schedule(tuple(s for s, _ in pairs), tuple(p for _, p in pairs))
