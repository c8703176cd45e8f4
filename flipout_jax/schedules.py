"""Pruning schedules: at which steps masks change and which sparsity they reach.

A :class:`Schedule` is a static, finite list of *events* ``(step, sparsity)``.
The event at ``step`` fires inside the update whose step count (number of
updates done before it) equals ``step``; it prunes the model to ``sparsity``
of the prunable weights. Being static, an event list is turned into exact
integer keep-counts once per model (see :mod:`flipout_jax.distributions`) and
looked up inside the jitted update with no host round trip.

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
from typing import Sequence

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A finite, static list of pruning events.

  Attributes:
    steps: strictly increasing non-negative ints: the step of each event.
    sparsities: the target sparsity of each event, non-decreasing, in [0, 1).
  """
  steps: tuple[int, ...]
  sparsities: tuple[float, ...]

  def __post_init__(self):
    if len(self.steps) != len(self.sparsities):
      raise ValueError("schedule: steps and sparsities differ in length.")
    if any(int(s) != s or s < 0 for s in self.steps):
      raise ValueError(f"schedule: steps must be non-negative ints, got {self.steps}.")
    if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
      raise ValueError(f"schedule: steps must increase strictly, got {self.steps}.")
    for s in self.sparsities:
      if not 0.0 <= s < 1.0:
        raise ValueError(f"schedule: sparsity {s} is outside [0, 1).")

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

  def sparsity(self, step: jnp.ndarray) -> jnp.ndarray:
    """Target sparsity in force at ``step`` (0 before the first event)."""
    if not self.steps:
      return jnp.float32(0.0)
    _, idx = self.event_index(step)
    table = jnp.asarray(self.sparsities, jnp.float32)
    return jnp.where(idx >= 0, table[jnp.maximum(idx, 0)], 0.0)


def _check_sparsity(sparsity: float, name: str = "sparsity") -> float:
  sparsity = float(sparsity)
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"{name}: {sparsity} is outside [0, 1).")
  return sparsity


def _check_positive_int(value: int, name: str) -> int:
  if int(value) != value or value <= 0:
    raise ValueError(f"{name}: must be a positive int, got {value!r}.")
  return int(value)


def _check_step(value: int, name: str) -> int:
  if int(value) != value or value < 0:
    raise ValueError(f"{name}: must be a non-negative int, got {value!r}.")
  return int(value)


def _check_rate(rate: float, name: str = "prune_rate") -> float:
  rate = float(rate)
  if not 0.0 < rate < 1.0:
    raise ValueError(f"{name}: {rate} is outside (0, 1).")
  return rate


def events_needed(sparsity: float, rate: float) -> int:
  """Events of ``rate`` needed to reach ``sparsity``: ceil(log(1−S)/log(1−r))."""
  if sparsity <= 0.0:
    return 0
  # The epsilon absorbs float error for exact powers, e.g. 1 − 0.5^3.
  return max(1, math.ceil(math.log1p(-sparsity) / math.log1p(-rate) - 1e-9))


def one_shot(sparsity: float, step: int = 0) -> Schedule:
  """A single event at ``step`` pruning to ``sparsity``."""
  sparsity = _check_sparsity(sparsity)
  return Schedule((_check_step(step, "step"),), (sparsity,))


def periodic(sparsity: float, every: int, rate: float = 0.5,
             start: int = 0) -> Schedule:
  """Every ``every`` steps after ``start``, remove ``rate`` of the survivors.

  Events are at ``start + k·every`` for ``k = 1..n``, ``n`` the number needed
  to reach ``sparsity``; event k targets ``min(1 − (1 − rate)^k, sparsity)``.
  """
  sparsity = _check_sparsity(sparsity)
  every = _check_positive_int(every, "prune_every")
  rate = _check_rate(rate)
  start = _check_step(start, "start_step")
  n = events_needed(sparsity, rate)
  steps = tuple(start + k * every for k in range(1, n + 1))
  sps = tuple(min(1.0 - (1.0 - rate) ** k, sparsity) for k in range(1, n + 1))
  return Schedule(steps, sps)


def periodic_until(sparsity: float, end_step: int, rate: float = 0.5,
                   start: int = 0) -> Schedule:
  """:func:`periodic` with the period chosen so the last event is at or just
  before ``end_step``: ``every = (end_step − start) // n``."""
  sparsity = _check_sparsity(sparsity)
  rate = _check_rate(rate)
  end_step = _check_positive_int(end_step, "end_step")
  start = _check_step(start, "start_step")
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
             start: int = 0) -> Schedule:
  """``num_events`` events, each removing ``1 − (1 − S)^(1/N)`` of survivors."""
  sparsity = _check_sparsity(sparsity)
  num_events = _check_positive_int(num_events, "num_events")
  every = _check_positive_int(every, "every")
  start = _check_step(start, "start_step")
  steps = tuple(start + k * every for k in range(1, num_events + 1))
  sps = tuple(1.0 - (1.0 - sparsity) ** (k / num_events)
              for k in range(1, num_events + 1))
  return Schedule(steps, sps[:-1] + (sparsity,))


def polynomial_sparsity(step, sparsity: float, start: int, end: int,
                        power: float = 3.0, initial: float = 0.0):
  """Zhu & Gupta: ``s_t = S + (s0 − S)·(1 − (t − t0)/(t1 − t0))^power``.

  0-dimensional jnp value; ``initial`` before ``start``, ``sparsity`` after
  ``end``. Works on traced steps (ST-3 evaluates it every step).
  """
  frac = jnp.clip((jnp.asarray(step, jnp.float32) - start) / (end - start), 0.0, 1.0)
  # Before start frac = 0 gives ``initial``; after end frac = 1 gives S.
  return sparsity + (initial - sparsity) * (1.0 - frac) ** power


def polynomial(sparsity: float, start: int, end: int, every: int = 1,
               power: float = 3.0, initial: float = 0.0) -> Schedule:
  """Events every ``every`` steps from ``start`` to ``end`` (inclusive) on the
  polynomial curve of :func:`polynomial_sparsity`."""
  sparsity = _check_sparsity(sparsity)
  initial = _check_sparsity(initial, "initial")
  start = _check_step(start, "start_step")
  end = _check_step(end, "end_step")
  every = _check_positive_int(every, "every")
  if end <= start:
    raise ValueError(f"end_step: {end} must be greater than start_step {start}.")
  if power <= 0:
    raise ValueError(f"power: {power} must be > 0.")
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


def rounds(sparsity: float, num_rounds: int, steps_per_round: int,
           start: int = 0) -> Schedule:
  """``num_rounds`` events, one after every ``steps_per_round`` steps."""
  sparsity = _check_sparsity(sparsity)
  num_rounds = _check_positive_int(num_rounds, "rounds")
  steps_per_round = _check_positive_int(steps_per_round, "steps_per_round")
  start = _check_step(start, "start_step")
  sps = rounds_sparsities(sparsity, num_rounds)
  steps = tuple(start + k * steps_per_round for k in range(1, num_rounds + 1))
  return Schedule(steps, sps[:-1] + (sparsity,))


def as_schedule(events: Schedule | Sequence[tuple[int, float]]) -> Schedule:
  """Accepts a :class:`Schedule` or a list of ``(step, sparsity)`` pairs."""
  if isinstance(events, Schedule):
    return events
  events = list(events)
  return Schedule(tuple(int(s) for s, _ in events),
                  tuple(float(p) for _, p in events))
