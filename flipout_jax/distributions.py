"""Layer-wise budgets: how a sparsity target is split over prunable tensors.

A budget says which tensors are ranked together (the *groups*) and how many
weights each group keeps. Budgets are computed in NumPy float64 from static
shapes, so counts are exact integers however large the model.

* ``"global"``: one group of all prunable tensors; keeps ``N - round(s·N)``.
* ``"uniform"``: every tensor keeps ``n_l - round(s·n_l)``.
* ``"erk"``: Erdős–Rényi-Kernel (Evci et al. 2020): density of layer l is
  proportional to ``sum(shape_l) / prod(shape_l)``; layers whose density would
  exceed 1 are made dense and the scale is re-solved over the others. Integer
  counts are rounded by largest remainder so the global count is exactly
  ``N - round(s·N)``.
* a ``{path: sparsity}`` mapping: custom per-layer sparsities, reached at the
  final target; an intermediate target ``s`` prunes each named layer to
  ``mapping[path]·s/s_final``. Prunable layers not named stay dense.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence, Union

import numpy as np

from flipout_jax import validate

Distribution = Union[str, Mapping[str, float]]
DISTRIBUTIONS = ("global", "uniform", "erk")


class Budget(NamedTuple):
  """Which tensors are ranked together and how many weights each group keeps."""
  groups: tuple[tuple[int, ...], ...]  # indices of prunable tensors per group
  keep: np.ndarray  # int64 [num_groups]: weights kept per group


def validate_distribution(distribution: Distribution,
                          paths: Sequence[str] | None = None) -> None:
  """Raises ValueError for an unknown name, bad custom sparsities or paths."""
  if isinstance(distribution, str):
    if distribution not in DISTRIBUTIONS:
      raise ValueError(
          f"distribution: unknown name {distribution!r}; valid names are "
          f"{DISTRIBUTIONS} or a mapping path -> sparsity.")
    return
  if not isinstance(distribution, Mapping):
    raise ValueError(
        f"distribution: expected one of {DISTRIBUTIONS} or a mapping path -> "
        f"sparsity, got {type(distribution).__name__}.")
  for path, s in distribution.items():
    if not isinstance(path, str):
      raise ValueError(f"distribution: keys must be parameter paths (str), "
                       f"got {path!r}.")
    validate.sparsity(s, f"distribution[{path!r}]")
  if paths is not None:
    unknown = sorted(set(distribution) - set(paths))
    if unknown:
      raise ValueError(
          f"distribution: {unknown} are not prunable parameters; prunable "
          f"paths are {list(paths)}.")


def erk_densities(shapes: Sequence[Sequence[int]], density: float,
                  erk_power_scale: float = 1.0) -> np.ndarray:
  """ERK per-layer densities whose weighted mean is exactly ``density``.

  Args:
    shapes: shapes of the prunable tensors.
    density: global density in (0, 1].
    erk_power_scale: exponent on the raw ERK ratio (1.0 = standard ERK).

  Returns:
    float64 ``[num_layers]`` densities in (0, 1].
  """
  sizes = np.array([np.prod(s) for s in shapes], np.float64)
  raw = np.array([np.sum(s) / np.prod(s) for s in shapes], np.float64)
  raw = raw ** erk_power_scale
  dense = np.zeros(len(shapes), bool)
  while True:
    # Solve eps·Σ_sparse raw_l·n_l = density·N − Σ_dense n_l.
    budget = density * sizes.sum() - sizes[dense].sum()
    eps = budget / np.sum(raw[~dense] * sizes[~dense])
    dens = np.where(dense, 1.0, eps * raw)
    over = (dens > 1.0) & ~dense
    if not over.any():
      return dens
    dense |= over


def _largest_remainder(target: int, ideal: np.ndarray, cap: np.ndarray) -> np.ndarray:
  """Integers ``<= cap`` close to ``ideal`` summing exactly to ``target``."""
  base = np.minimum(np.floor(ideal).astype(np.int64), cap)
  short = int(target - base.sum())
  order = np.argsort(-(ideal - base), kind="stable")
  for i in order:
    if short <= 0:
      break
    if base[i] < cap[i]:
      base[i] += 1
      short -= 1
  return base


def budget(distribution: Distribution, paths: Sequence[str],
           shapes: Sequence[Sequence[int]], sparsity: float,
           final_sparsity: float | None = None) -> Budget:
  """Splits a sparsity target over the prunable tensors.

  Args:
    distribution: ``"global"``, ``"uniform"``, ``"erk"`` or ``{path: s}``.
    paths: paths of the prunable tensors (for custom mappings).
    shapes: their shapes.
    sparsity: target sparsity in [0, 1).
    final_sparsity: the schedule's last target; custom mappings are scaled by
      ``sparsity / final_sparsity`` (used as given when None or 0).

  Returns:
    A :class:`Budget`.
  """
  sizes = np.array([int(np.prod(s)) for s in shapes], np.int64)
  n = int(sizes.sum())
  if isinstance(distribution, Mapping):
    scale = sparsity / final_sparsity if final_sparsity else 1.0
    keep = np.array([
        size - int(round(scale * float(distribution.get(p, 0.0)) * size))
        for p, size in zip(paths, sizes)], np.int64)
    return Budget(tuple((i,) for i in range(len(sizes))), keep)
  if distribution == "global":
    return Budget((tuple(range(len(sizes))),),
                  np.array([n - int(round(sparsity * n))], np.int64))
  if distribution == "uniform":
    keep = sizes - np.round(sparsity * sizes).astype(np.int64)
    return Budget(tuple((i,) for i in range(len(sizes))), keep)
  if distribution == "erk":
    total_keep = n - int(round(sparsity * n))
    if total_keep == n:
      keep = sizes.copy()
    else:
      dens = erk_densities(shapes, total_keep / n)
      keep = _largest_remainder(total_keep, dens * sizes, sizes)
    return Budget(tuple((i,) for i in range(len(sizes))), keep)
  validate_distribution(distribution)
  raise AssertionError("unreachable")
