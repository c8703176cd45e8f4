"""UniPTS's reducing-regrowing search of per-layer sparsities (SPEC §4 (b)).

**Decoding a genome.** A genome is ``x ∈ R^L``, one gene per prunable layer
(``n_l`` weights, ``N = Σ n_l``). With ``a = softmax(x)`` and the regrowth
budget ``A = r·N`` (``r = 0.05``)::

    p_l = min(max(0, P + r − A·a_l/n_l), 1 − 1/n_l)

Every layer is over-pruned to ``P + r``; then the ``A`` weights (5% of all)
are regrown, layer l getting the share ``a_l``. When neither clamp binds,
``Σ n_l·p_l = (P + r)·N − A·Σ a_l = P·N``: the global sparsity is exactly P
(up to the later ``round(p_l·n_l)``, at most half a weight per layer either
way). The clamps make every genome decode to a valid model:

* ``max(0, ·)`` (the paper's): a layer cannot regrow more than it pruned. By
  default the unused share is lost (as in the authors' code), so a clamped
  genome is sparser than P. This is common, not an edge case: a layer
  smaller than ``a_l·A/(P + r)`` is always clamped (LeNet-300-100's 1,000
  weight head against a budget of 13,310 weights). With
  ``redistribute=True`` the unused share goes to the unclamped layers in
  proportion to their ``a_l`` (water-filling, as ERK re-solves over its
  non-dense layers), so ``Σ n_l·p_l = P·N`` whenever the upper clamp does
  not bind;
* ``min(·, 1 − 1/n_l)`` (ours): for ``P + r > 1 − 1/n_l`` the formula can
  reach 1 or more; the cap keeps at least one weight in every layer, so a
  layer is never removed and every ``p_l`` lies in ``[0, 1)``.

**The evolutionary search** (the authors' genetic algorithm; SPEC's numbers
are :data:`flipout_jax.unipts.PAPER_CONFIG`):

* initial population: the *uniform genome* (every gene equal to P, as in the
  authors' code; any constant vector gives ``a_l = 1/L``: every layer regrows
  ``A/L`` weights) and ``population_size − 1`` genomes with genes ~ U[0, 1);
* every generation is evaluated, and its ``num_parents`` fittest genomes are
  the parents of the next: ``crossover_children`` children, the first always
  the uniform genome, each other one from two distinct random parents (with
  probability ``crossover_prob``, gene-wise uniform crossover; else a copy of
  the first parent); ``mutation_children`` children, each a random parent
  whose genes are, each with probability ``mutation_prob``, replaced by
  ``x·(1 + N(0, 1))``; and random U[0, 1) genomes up to ``population_size``
  if the children are fewer (the authors' code meant to do this but dropped
  them: its later generations have 24 genomes, not 25);
* ``generations`` breeding rounds, so ``generations + 1`` populations are
  evaluated (the authors' loop evaluates 25 and its final ``max`` the 26th);
* the result is the best genome *ever evaluated* (the fitness is
  deterministic, so this is never worse than the authors' best-of-last
  population). Ties go to the earlier evaluation.

Fitness values are compared as Python values, so a tuple (e.g. accuracy,
then a tie-breaker) is ranked lexicographically. Genomes decoding to the same
sparsities are evaluated once (a cache), since the fitness depends on the
sparsities only. A numpy ``Generator`` seeded with ``seed`` draws everything:
with a deterministic fitness the whole search is reproducible.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Sequence

import numpy as np

from flipout_jax import validate

Fitness = Any  # a float, or a tuple of floats compared lexicographically


def _check_fraction(value, name: str, *, upper_open: bool = True) -> float:
  """A number in [0, 1) (or [0, 1]), :mod:`flipout_jax.validate`'s check."""
  return validate.number(value, name, low=0, high=1, high_open=upper_open)


def _check_sizes(sizes: Sequence[int]) -> np.ndarray:
  sizes = np.asarray(sizes)
  if sizes.ndim != 1 or sizes.size == 0 or not np.issubdtype(sizes.dtype, np.integer) \
      or np.any(sizes < 1):
    raise ValueError(
        f"sizes: must be a non-empty list of layer sizes >= 1, got {sizes!r}.")
  return sizes.astype(np.int64)


def softmax(x: np.ndarray) -> np.ndarray:
  """Numerically stable float64 softmax of a 1-D genome."""
  z = np.asarray(x, np.float64)
  z = np.exp(z - np.max(z))
  return z / np.sum(z)


def decode_genome(genome, sizes: Sequence[int], sparsity: float,
                  regrow: float = 0.05, *,
                  redistribute: bool = False) -> np.ndarray:
  """Per-layer sparsities ``p_l`` of a genome (module docstring for the math).

  Args:
    genome: ``x``, float ``[L]``, finite.
    sizes: ``n_l``, the number of weights of each of the L prunable layers.
    sparsity: ``P``, the global target in [0, 1).
    regrow: ``r``, the over-pruning and regrowth fraction of N, in [0, 1)
      (paper: 0.05).
    redistribute: give the regrowth a layer cannot use (``p_l`` clamped at
      0) to the other layers, by their shares (default False: the paper's).

  Returns:
    float64 ``[L]``, every entry in ``[0, 1 − 1/n_l] ⊂ [0, 1)``.

  Raises:
    ValueError: for a genome of the wrong length or with a non-finite gene,
      and for arguments outside the ranges above.
  """
  sizes = _check_sizes(sizes)
  sparsity = _check_fraction(sparsity, "sparsity")
  regrow = _check_fraction(regrow, "regrow")
  x = np.asarray(genome, np.float64)
  if x.shape != sizes.shape:
    raise ValueError(
        f"genome: has shape {x.shape}; expected ({sizes.size},), one gene per "
        "prunable layer.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"genome: has non-finite genes {x}.")
  n = sizes.astype(np.float64)
  budget = regrow * np.sum(n)
  a = softmax(x)
  p = np.maximum(0.0, sparsity + regrow - budget * a / n)
  if redistribute:
    # Water-filling: layers that would regrow more than they over-pruned
    # regrow exactly that (p = 0); the rest of the budget is shared by the
    # others in proportion to a_l. Each round fixes at least one more layer.
    capped = np.zeros(n.shape, bool)
    while True:
      left = budget - np.sum((sparsity + regrow) * n[capped])
      free = ~capped
      regrown = left * a / max(np.sum(a[free]), np.finfo(np.float64).tiny)
      over = free & (regrown >= (sparsity + regrow) * n)
      if not over.any() or left <= 0:
        break
      capped |= over
    if capped.any():  # else p is already right (and bitwise the paper's)
      p = np.where(capped, 0.0,
                   np.maximum(0.0, sparsity + regrow - regrown / n))
  return np.minimum(p, 1.0 - 1.0 / n)


def num_pruned(sparsities, sizes: Sequence[int]) -> np.ndarray:
  """``round(p_l·n_l)`` per layer (half to even, the library's count
  convention), int64, computed in float64.

  This is the count of zeros every UniPTS mask has (search fitness and
  sparse training alike), so both stages agree on it exactly.
  """
  sizes = _check_sizes(sizes)
  p = np.asarray(sparsities, np.float64)
  if p.shape != sizes.shape:
    raise ValueError(f"sparsities: shape {p.shape} != ({sizes.size},).")
  return np.clip(np.round(p * sizes), 0, sizes).astype(np.int64)


def is_valid(sparsities) -> bool:
  """Whether every per-layer sparsity is finite and in [0, 1)."""
  p = np.asarray(sparsities, np.float64)
  return bool(np.all(np.isfinite(p)) and np.all(p >= 0.0) and np.all(p < 1.0))


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """What :func:`evolutionary_search` found.

  Attributes:
    genome: float64 ``[L]``, the best genome evaluated.
    sparsities: float64 ``[L]``, its decoded per-layer sparsities.
    fitness: its fitness.
    uniform_fitness: the fitness of the uniform genome (the baseline every
      generation contains).
    history: one dict per evaluated population: ``generation``,
      ``best_fitness``, ``mean_fitness`` (of the first component for tuple
      fitness), ``best_so_far`` and ``new_evaluations``.
    evaluations: calls of the fitness function (cache misses).
    genomes_seen: genomes scored, cache hits included.
  """
  genome: np.ndarray
  sparsities: np.ndarray
  fitness: Fitness
  uniform_fitness: Fitness
  history: list
  evaluations: int
  genomes_seen: int


def _first(f: Fitness) -> float:
  return float(f[0]) if isinstance(f, (tuple, list)) else float(f)


def _best_index(fitness: list) -> int:
  """Index of the largest fitness; the earliest among equals."""
  best = 0
  for i in range(1, len(fitness)):
    if fitness[i] > fitness[best]:
      best = i
  return best


def _parents(population: np.ndarray, fitness: list, k: int) -> np.ndarray:
  # Stable: among equal fitness the earlier genome ranks first.
  order = sorted(range(len(fitness)), key=lambda i: fitness[i], reverse=True)
  return population[order[:k]]


def _crossover(rng, parents, uniform, num, prob):
  children = [uniform]
  while len(children) < num:
    i, j = rng.choice(len(parents), 2, replace=False)
    if rng.random() < prob:
      take = rng.integers(0, 2, size=uniform.shape).astype(bool)
      children.append(np.where(take, parents[i], parents[j]))
    else:
      children.append(parents[i].copy())
  return children[:num]


def _mutation(rng, parents, num, prob):
  children = []
  for _ in range(num):
    x = parents[rng.integers(len(parents))]
    hit = rng.random(x.shape) < prob
    children.append(np.where(hit, x * (1.0 + rng.standard_normal(x.shape)), x))
  return children


def evolutionary_search(fitness_fn: Callable[[np.ndarray], Fitness],
                        sizes: Sequence[int],
                        sparsity: float,
                        *,
                        population_size: int = 25,
                        generations: int = 25,
                        num_parents: int = 10,
                        crossover_children: int = 12,
                        mutation_children: int = 12,
                        mutation_prob: float = 0.1,
                        crossover_prob: float = 1.0,
                        regrow: float = 0.05,
                        redistribute: bool = False,
                        seed: int = 0,
                        log_fn: Callable[[str], None] | None = None
                        ) -> SearchResult:
  """The reducing-regrowing genetic search (module docstring for the algorithm).

  Args:
    fitness_fn: ``sparsities float64 [L] -> fitness`` (higher is better; a
      float or a tuple). Only ever called with valid sparsities (finite, in
      [0, 1)), each distinct one once.
    sizes: ``n_l`` of the L prunable layers.
    sparsity: the global target P in [0, 1).
    population_size: genomes of the initial population and the least of
      every later one (paper: 25).
    generations: breeding rounds (paper: 25); ``generations + 1``
      populations are evaluated.
    num_parents: fittest genomes kept as parents, ``2 <= k <=
      population_size`` (paper: 10).
    crossover_children: >= 1, the uniform genome included (paper: 12).
    mutation_children: >= 0 (paper: 12).
    mutation_prob: per-gene mutation probability in [0, 1] (paper: 0.1).
    crossover_prob: probability that a crossover child mixes two parents
      rather than copying one, in [0, 1] (paper: 1).
    regrow: r of :func:`decode_genome` (paper: 0.05).
    redistribute: :func:`decode_genome`'s option (paper: False).
    seed: seed of the numpy ``Generator`` drawing genomes and operators.
    log_fn: optional ``str -> None`` progress printer.

  Returns:
    A :class:`SearchResult`.

  Raises:
    ValueError: for arguments outside the ranges above.
  """
  sizes = _check_sizes(sizes)
  sparsity = _check_fraction(sparsity, "sparsity")
  regrow = _check_fraction(regrow, "regrow")
  for value, name, low in ((population_size, "population_size", 2),
                           (generations, "generations", 0),
                           (num_parents, "num_parents", 2),
                           (crossover_children, "crossover_children", 1),
                           (mutation_children, "mutation_children", 0),
                           (seed, "seed", 0)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
        or value < low:
      raise ValueError(f"{name}: must be an int >= {low}, got {value!r}.")
  if num_parents > population_size:
    raise ValueError(
        f"num_parents: {num_parents} exceeds population_size "
        f"{population_size}.")
  mutation_prob = _check_fraction(mutation_prob, "mutation_prob", upper_open=False)
  crossover_prob = _check_fraction(crossover_prob, "crossover_prob",
                                   upper_open=False)

  rng = np.random.default_rng(seed)
  num_layers = sizes.size
  uniform = np.full((num_layers,), sparsity, np.float64)
  cache: dict[bytes, Fitness] = {}
  counters = {"evaluations": 0, "seen": 0}
  best = {"genome": None, "fitness": None}

  def score(genome: np.ndarray) -> Fitness:
    p = decode_genome(genome, sizes, sparsity, regrow,
                      redistribute=redistribute)
    # Decoding clamps into [0, 1 − 1/n]; this guard makes "never evaluates
    # an invalid genome" a checked property rather than an argument.
    if not is_valid(p):
      raise AssertionError(f"decoded an invalid genome {genome} -> {p}")
    counters["seen"] += 1
    key = p.tobytes()
    if key not in cache:
      counters["evaluations"] += 1
      cache[key] = fitness_fn(p)
    f = cache[key]
    if best["fitness"] is None or f > best["fitness"]:
      best["genome"], best["fitness"] = genome.copy(), f
    return f

  def random_genomes(k):
    return list(rng.random((k, num_layers)))

  population = np.stack([uniform] + random_genomes(population_size - 1))
  uniform_fitness = None
  history = []
  for generation in range(generations + 1):
    before = counters["evaluations"]
    fitness = [score(g) for g in population]
    if uniform_fitness is None:
      uniform_fitness = fitness[0]
    firsts = [_first(f) for f in fitness]
    history.append({
        "generation": generation,
        "best_fitness": fitness[_best_index(fitness)],
        "mean_fitness": float(np.mean(firsts)),
        "best_so_far": best["fitness"],
        "new_evaluations": counters["evaluations"] - before,
    })
    if log_fn is not None:
      log_fn(f"search generation {generation}/{generations}: best "
             f"{fitness[_best_index(fitness)]}, mean {np.mean(firsts):.4f}, "
             f"best so far {best['fitness']}")
    if generation == generations:
      break
    parents = _parents(population, fitness, num_parents)
    children = (_crossover(rng, parents, uniform, crossover_children,
                           crossover_prob)
                + _mutation(rng, parents, mutation_children, mutation_prob))
    fill = max(0, population_size - len(children))
    population = np.stack(children + random_genomes(fill))

  genome = best["genome"]
  return SearchResult(
      genome=genome,
      sparsities=decode_genome(genome, sizes, sparsity, regrow,
                               redistribute=redistribute),
      fitness=best["fitness"],
      uniform_fitness=uniform_fitness,
      history=history,
      evaluations=counters["evaluations"],
      genomes_seen=counters["seen"])

