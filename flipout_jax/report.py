"""Sparsity reports: global and per-layer counts, printable as a table."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from flipout_jax import trees


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
  path: str
  shape: tuple[int, ...]
  size: int  # number of weights
  zeros: int  # pruned weights (mask False, or value exactly 0 without masks)

  @property
  def sparsity(self) -> float:
    return self.zeros / self.size if self.size else 0.0


@dataclasses.dataclass(frozen=True)
class SparsityReport:
  """Sparsity of the prunable leaves; ``str(report)`` is a Markdown table."""
  layers: tuple[LayerSparsity, ...]

  @property
  def size(self) -> int:
    return sum(l.size for l in self.layers)

  @property
  def zeros(self) -> int:
    return sum(l.zeros for l in self.layers)

  @property
  def sparsity(self) -> float:
    """Global sparsity over all prunable weights."""
    return self.zeros / self.size if self.size else 0.0

  def as_dict(self) -> dict[str, float]:
    """``{path: sparsity}`` per layer."""
    return {l.path: l.sparsity for l in self.layers}

  def __str__(self) -> str:
    rows = ["| layer | shape | weights | zeros | sparsity |",
            "|---|---|---:|---:|---:|"]
    for l in self.layers:
      rows.append(f"| {l.path} | {'x'.join(map(str, l.shape))} | {l.size:,} | "
                  f"{l.zeros:,} | {100 * l.sparsity:.2f}% |")
    rows.append(f"| **global** | | {self.size:,} | {self.zeros:,} | "
                f"{100 * self.sparsity:.2f}% |")
    return "\n".join(rows)


def sparsity_report(params: Any, masks: Any = None,
                    filter_fn=None) -> SparsityReport:
  """Counts pruned weights per prunable layer and globally.

  Args:
    params: the params pytree.
    masks: a mask tree (e.g. ``fj.get_masks(state)``); a weight is pruned
      where its mask is False. Without masks, a prunable weight is pruned
      where it is exactly 0.0 and ``filter_fn`` decides what is prunable.
    filter_fn: used only without masks (default: float leaves, ndim >= 2).

  Returns:
    A :class:`SparsityReport`.
  """
  if masks is None:
    prunable = trees.prunable_tree(params, filter_fn)
    masks = jax.tree.map(lambda p, s: np.asarray(p) != 0 if s else None,
                         params, prunable)
  else:
    trees.check_same_structure(params, masks, what="sparsity_report")
  layers = []
  for path, m in trees.leaves_with_paths(masks):
    m = np.asarray(m)
    layers.append(LayerSparsity(path, tuple(m.shape), int(m.size),
                                int(m.size - np.count_nonzero(m))))
  return SparsityReport(tuple(layers))
