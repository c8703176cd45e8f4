"""The ``coupled`` structure: whole dependency groups as the units of pruning.

:func:`flipout_jax.structure.units` prunes one kernel's output units; the
next layer's input rows, a residual stream's other blocks, a head's four
projections stay. ``fj.coupled(groups)`` prunes the units of the groups that
:func:`flipout_jax.dependency_groups` traced: a unit is masked in every
prunable member of its group at once (a Dense layer's column *and* the next
layer's row; a head's query/key/value columns and output rows), so the
masks it produces are exactly what :func:`flipout_jax.compact` removes.

    groups = fj.dependency_groups(model.apply, variables, x)
    tx = fj.global_magnitude(optax.sgd(0.1), sparsity=0.5,
                             structure=fj.coupled(groups))
    ...
    small = fj.compact(model.apply, variables, x, masks=fj.get_masks(state))

A unit's score is the ``reduce`` (``sum``, ``mean``, ``max`` or ``l2``) of
the per-weight scores of every prunable entry it holds, over all members
(any method's score: ``|w|`` for the L2 magnitude with ``reduce="l2"``,
the gradient-flow scores, FlipOut's saliency summed). Budgets count units
(``"global"``: one ranking of every group's units; ``"uniform"``: each group
on its own; or ``{name: s}`` with a group named ``"<path>:<axis>"`` after its
first prunable member), and every group keeps at least ``min_per_layer`` of
its alive units. Only removable groups with a prunable member take part;
leaves in none of them keep their masks. A weight in two groups (a kernel's
rows and columns) is alive when both its units are. ST-3's soft thresholds
are per leaf and are not defined for groups that span leaves. Post-training:
``fj.post_training.prune(..., method="magnitude" or "wanda",
structure=fj.coupled(groups))``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

from flipout_jax import structure as structure_lib
from flipout_jax import validate


def _view(shape, axis, stride, n):
  """The leaf as ``(before, outer, n, stride, after)``."""
  return (math.prod(shape[:axis]), shape[axis] // (n * stride), n, stride,
          math.prod(shape[axis + 1:]))


def _unit_rows(x, member, n):
  """``[n, entries]``: row ``j`` holds unit ``j``'s entries of a leaf."""
  _, axis, stride = member
  v = jnp.reshape(x, _view(x.shape, axis, stride, n))
  return jnp.reshape(jnp.moveaxis(v, 2, 0), (n, -1))


def _spread(u, shape, member, n):
  """bool ``[n]`` broadcast to the leaf's ``shape`` along the member."""
  _, axis, stride = member
  v = jnp.broadcast_to(u[None, None, :, None, None],
                       _view(shape, axis, stride, n))
  return jnp.reshape(v, shape)


def coupled(groups: Sequence, *, reduce: str = "sum",
            min_per_layer: int = 1) -> structure_lib.Structure:
  """Whole coupled units of :func:`flipout_jax.dependency_groups` groups.

  Args:
    groups: the groups traced from the model (``fj.dependency_groups``);
      their paths are matched to the prunable leaves, with or without the
      Flax collection (``"params/fc1/kernel"`` or ``"fc1/kernel"``).
    reduce: how the scores of a unit's entries combine into its score.
    min_per_layer: units every group keeps at least (>= 1).

  Returns:
    A :class:`flipout_jax.structure.Structure` (see the module docstring).

  Raises:
    ValueError: for a ``reduce`` or ``min_per_layer`` out of range, or
      groups that are not ``fj.dependency_groups``' (at construction); a
      group whose leaves do not fit the model's shapes (at ``init``).
  """
  reduce = validate.choice(reduce, "reduce", structure_lib.REDUCE)
  min_per_layer = validate.integer(min_per_layer, "min_per_layer", low=1)
  groups = tuple(groups)
  if not all(hasattr(g, "members") and hasattr(g, "removable")
             for g in groups):
    raise ValueError("groups: expected the groups of fj.dependency_groups("
                     "apply_fn, variables, x).")

  def resolve(paths, shapes=None):
    """``[(n, name, [(leaf, axis, stride)])]``: the groups taking part."""
    index = {p: i for i, p in enumerate(paths)}
    used = []
    for g in groups:
      if not g.removable:
        continue
      members = []
      for m in g.members:
        i = index.get(m.path, index.get(m.path.split("/", 1)[-1]))
        if i is None:
          continue
        if shapes is not None and (
            m.axis >= len(shapes[i])
            or shapes[i][m.axis] % (g.size * m.stride)):
          raise ValueError(
              f"structure: group member {m.path!r} (axis {m.axis}, "
              f"{g.size} units) does not fit the leaf of shape "
              f"{tuple(shapes[i])}; trace the groups from this model.")
        members.append((i, m.axis, m.stride))
      if members:
        first = members[0]
        used.append((g.size, f"{paths[first[0]]}:{first[1]}", members))
    return used

  # The selection itself is fj.units' on a virtual kernel per group: its
  # ``[entries, n]`` rows (every prunable entry of unit j in column j).
  inner = structure_lib.units(reduce=reduce, min_per_layer=min_per_layer,
                              exclude=None)

  def virtual(lay):
    used = resolve(lay.paths)
    names = tuple(name for _, name, _ in used)
    shapes = tuple((sum(math.prod(lay.shapes[m[0]]) // n for m in ms), n)
                   for n, _, ms in used)
    return used, inner.layout(names, shapes)

  def rows(leaves, used, dtype=None):
    return [jnp.concatenate([jnp.transpose(_unit_rows(
        jnp.asarray(leaves[m[0]], dtype), m, n)) for m in ms], axis=0)
            for n, _, ms in used]

  def spread(lay, base, used, unit_masks):
    """Each leaf of ``base`` AND the unit masks of every group holding it."""
    out = list(base)
    for (n, _, ms), u in zip(used, unit_masks):
      for m in ms:
        out[m[0]] = out[m[0]] & _spread(u, lay.shapes[m[0]], m, n)
    return out

  def units_of(vmasks):
    return [jnp.any(v, axis=0) for v in vmasks]

  def layout(paths, shapes):
    shapes = tuple(tuple(s) for s in shapes)
    active = set(i for _, _, ms in resolve(paths, shapes) for i, _, _ in ms)
    return structure_lib.Layout(tuple(paths), shapes,
                                tuple(i in active for i in range(len(paths))))

  def budget(distribution, lay, sparsities, final):
    if distribution == "erk":
      raise ValueError(
          "distribution: 'erk' is not defined for coupled units; use "
          "'global', 'uniform' or a mapping '<path>:<axis>' -> sparsity.")
    _, vlay = virtual(lay)
    return inner.budget(distribution, vlay, sparsities, final)

  def shrink(lay, masks, scores, bgroups, keep):
    used, vlay = virtual(lay)
    if not used:
      return list(masks)
    vmasks = inner.shrink(vlay, rows(masks, used), rows(scores, used,
                                                        jnp.float32),
                          bgroups, keep)
    return spread(lay, masks, used, units_of(vmasks))

  def drop_and_grow(lay, masks, magnitudes, grow_scores, bgroups, keep,
                    fraction):
    used, vlay = virtual(lay)
    if not used:
      return list(masks), [jnp.zeros_like(x) for x in masks]
    after, grown = inner.drop_and_grow(
        vlay, rows(masks, used), rows(magnitudes, used, jnp.float32),
        rows(grow_scores, used, jnp.float32), bgroups, keep, fraction)
    after, grown = units_of(after), units_of(grown)
    ones = [jnp.ones(s, jnp.bool_) for s in lay.shapes]
    new = spread(lay, ones, used, after)
    through = spread(lay, ones, used, [a & ~g for a, g in zip(after, grown)])
    out = [x if act else m for x, m, act in zip(new, masks, lay.active)]
    return out, [x & ~t if act else jnp.zeros_like(m)
                 for x, t, m, act in zip(new, through, masks, lay.active)]

  def random(lay, key, bgroups, keep):
    used, vlay = virtual(lay)
    ones = [jnp.ones(s, jnp.bool_) for s in lay.shapes]
    if not used:
      return ones
    return spread(lay, ones, used,
                  units_of(inner.random(vlay, key, bgroups, keep)))

  def threshold(lay, weights, sparsity, **unused):
    del lay, weights, sparsity, unused
    raise ValueError(
        "structure: fj.coupled has no soft-threshold selection (ST-3's "
        "thresholds are per leaf; a coupled unit spans several leaves); use "
        "fj.units() or fj.unstructured() with ST-3.")

  return structure_lib.Structure(
      "coupled", "coupled",
      dict(groups=groups, reduce=reduce, min_per_layer=min_per_layer),
      layout, budget, shrink, drop_and_grow, random, threshold)
