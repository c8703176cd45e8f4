"""Pytree utilities: which leaves are prunable, masked maps, moment resets.

Every method in the library sees a parameter pytree through the same lens: a
*mask tree* with the structure of the params whose prunable leaves are boolean
arrays (True = weight alive) and whose other leaves are ``None``. Per-weight
method state (flip counts, coverage counts, raw weights) uses the same layout,
so one helper, :func:`map_prunable`, maps over "the prunable leaves" of any of
them.

A *filter* decides what is prunable. It is called as ``filter_fn(path, leaf)``
with ``path`` the leaf's key path rendered as ``"a/b/kernel"`` (dict keys,
attribute names and sequence indices joined by ``/``), so the same filter works
on plain dicts, Flax Linen variables, ``nnx.State`` and lists.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
from jax.experimental.shard_alike import shard_alike
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
FilterFn = Callable[[str, Any], bool]


def path_str(key_path: Sequence[Any]) -> str:
  """Renders a ``jax.tree_util`` key path as ``"a/b/0/kernel"``."""
  return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/")


def default_filter(path: str, leaf: Any) -> bool:
  """Prunes float leaves with ``ndim >= 2``: Dense and Conv kernels.

  Biases (ndim 1), BatchNorm/LayerNorm scales (ndim 1) and scalars are kept
  dense, as in the papers this library implements.
  """
  del path
  return bool(jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 2)


def _is_none(x: Any) -> bool:
  return x is None


def leaves_with_paths(tree: PyTree, is_leaf=None) -> list[tuple[str, Any]]:
  """``[(path, leaf), ...]`` in ``jax.tree`` flattening order (``is_leaf`` as
  in ``jax.tree_util``, e.g. to keep None leaves).

  Flax NNX Variable wrappers add no path segment: a leaf reads
  ``"l1/kernel"`` whether the tree holds ``nnx.Param``s (``nnx.state``, what
  ``nnx.Optimizer`` passes to ``init``) or their arrays (what it passes to
  ``update``), so paths computed at init still name the leaves in update.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(
      _unwrap_variables(tree), is_leaf=is_leaf)
  return [(path_str(p), leaf) for p, leaf in flat]


def _unwrap_variables(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x, tree,
                      is_leaf=lambda x: x is None or _is_variable(x))


def prunable_tree(params: PyTree, filter_fn: FilterFn | None = None) -> PyTree:
  """Evaluates the filter: a params-shaped tree of Python bools.

  Zero-size leaves are never prunable (their entry is False).

  Raises:
    ValueError: if the filter selects no leaf, or selects a non-float leaf, or
      params has a leaf that is not an array.
  """
  if isinstance(params, optax.LookaheadParams):
    raise ValueError(
        "params: is an optax.LookaheadParams (fast and slow weights). "
        "optax.lookahead keeps its slow copy of the weights in the params, "
        "where no pruning state can keep it sparse; lookahead is not "
        "supported in either order (see the README's composition rules).")
  filter_fn = default_filter if filter_fn is None else filter_fn
  flat = leaves_with_paths(params)
  treedef = jax.tree.structure(params)
  selected = []
  for path, leaf in flat:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise ValueError(
          f"params: leaf {path!r} is a {type(leaf).__name__}, not an array; "
          "pass a pytree of jax/numpy arrays.")
    # A zero-size leaf (e.g. a (0, 5) kernel) has nothing to prune; it would
    # only divide budgets (ERK) by zero.
    chosen = bool(filter_fn(path, leaf)) and math.prod(leaf.shape) > 0
    if chosen and not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(
          f"filter_fn: selected leaf {path!r} has dtype {leaf.dtype}; only "
          "floating-point leaves can be pruned.")
    selected.append(chosen)
  if not any(selected):
    raise ValueError(
        "filter_fn: selects no leaf of params, so there is nothing to prune "
        f"(leaves: {[p for p, _ in flat][:10]}...). The default "
        "filter prunes float leaves with ndim >= 2.")
  return jax.tree.unflatten(treedef, selected)


def mask_like(params: PyTree, prunable: PyTree, fill: bool = True) -> PyTree:
  """A mask tree: ``bool[shape]`` filled with ``fill`` where prunable, else None."""
  # full_like (not full) so that a sharded param gives an equally sharded mask.
  return jax.tree.map(
      lambda p, s: jnp.full_like(p, fill, dtype=jnp.bool_) if s else None,
      params, prunable)


def fill_from(partial: PyTree, params: PyTree) -> PyTree:
  """``partial``'s leaves where it has them (mask layout), ``params``' at
  its None leaves: e.g. raw prunable weights completed to a whole model."""
  return jax.tree.map(lambda x, p: p if x is None else x, partial, params,
                      is_leaf=lambda x: x is None)


def map_prunable(fn: Callable[..., Any], masks: PyTree, *trees: PyTree) -> PyTree:
  """Maps ``fn(mask, *leaves)`` over the prunable leaves; None elsewhere.

  Args:
    fn: called once per prunable leaf with the mask leaf and the matching
      leaves of ``trees``.
    masks: a mask tree (``None`` at non-prunable leaves).
    *trees: trees with the params' structure (or mask-tree layout).

  Returns:
    A tree in mask-tree layout holding ``fn``'s results.
  """
  return jax.tree.map(
      lambda m, *xs: None if m is None else fn(m, *xs),
      masks, *trees, is_leaf=_is_none)


def apply_masks(tree: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the entries of ``tree`` whose mask is False (exactly 0.0)."""
  return jax.tree.map(
      lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)),
      masks, tree, is_leaf=_is_none)


def prunable_leaves(masks: PyTree, tree: PyTree) -> list[Any]:
  """The leaves of ``tree`` at the prunable positions of ``masks``, in order."""
  out = []
  jax.tree.map(
      lambda m, x: out.append(x) if m is not None else None,
      masks, tree, is_leaf=_is_none)
  return out


def unflatten_prunable(masks: PyTree, leaves: Sequence[Any]) -> PyTree:
  """Inverse of :func:`prunable_leaves`: puts ``leaves`` back in mask layout."""
  it = iter(leaves)
  return jax.tree.map(
      lambda m: None if m is None else next(it), masks, is_leaf=_is_none)


def same_shape_groups(arrays: Sequence[Any]) -> list[list[int]]:
  """Indices of ``arrays`` grouped by (shape, dtype), in first-seen order.

  The batching unit of per-leaf work: a computation vmapped over a stacked
  group compiles once per distinct shape instead of once per tensor (a GPT
  of any depth has a handful of distinct kernel shapes).
  """
  groups: dict[tuple[Any, Any], list[int]] = {}
  for i, x in enumerate(arrays):
    groups.setdefault((tuple(jnp.shape(x)), jnp.result_type(x)), []).append(i)
  return list(groups.values())


def check_same_structure(params: PyTree, masks: PyTree, *, what: str,
                         prefix: bool = False) -> None:
  """Raises ValueError if params no longer matches the tree ``init`` saw.

  ``None`` leaves of ``params`` (e.g. ``bias=None``, or an Equinox model
  filtered with ``eqx.filter``) are part of the structure, as in optax: they
  stay ``None`` in the mask layout. With ``prefix``, a ``None`` of ``masks``
  may also stand for a whole subtree of ``params`` (masks read from an
  ``optax.partition`` whose labels name subtrees).
  """
  expected = jax.tree.structure(masks, is_leaf=_is_none)
  got = jax.tree.structure(params, is_leaf=_is_none)
  if not prefix and expected != got:
    raise ValueError(
        f"params: the tree passed to {what}.update has structure {got}, but "
        f"{what}.init saw {expected}. Pass the same params tree to init and "
        "update.")
  try:
    subtrees = expected.flatten_up_to(params)
  except (ValueError, TypeError):
    raise ValueError(f"masks: the masks passed to {what} have structure "
                     f"{expected}, which does not fit params {got}.") from None
  for (path, m), p in zip(leaves_with_paths(masks, is_leaf=_is_none), subtrees):
    if m is not None and tuple(np.shape(p)) != tuple(m.shape):
      raise ValueError(
          f"params: leaf {path!r} has shape {tuple(np.shape(p))} in "
          f"{what}, but its mask (from init) has {tuple(m.shape)}.")


def reset_params_like(state: PyTree, params: PyTree, reset: PyTree) -> PyTree:
  """Zeroes per-parameter buffers of an optimizer state where ``reset`` is True.

  Any subtree of ``state`` with the params' tree structure and leaf shapes is
  taken to be a per-parameter buffer (momentum, Adam's first and second
  moments, ...), whatever optax class holds it; scalars such as step counts
  are left alone. This is how grown weights start with zero moments under any
  inner optimizer or chain of them.

  Args:
    state: an optax optimizer state.
    params: the params tree (only its structure and shapes are used).
    reset: a mask tree; entries that are True are zeroed. ``None`` leaves
      are not touched.

  Returns:
    ``state`` with the selected entries of every per-parameter buffer zeroed.
  """
  treedef = jax.tree.structure(params)
  shapes = [tuple(np.shape(p)) for p in jax.tree.leaves(params)]

  params_is_leaf = treedef.num_nodes == 1 and treedef.num_leaves == 1

  def is_params_like(x):
    if x is None:
      return False
    if isinstance(x, (jax.Array, np.ndarray)):
      # A bare array is a per-parameter buffer only when params is one array.
      return params_is_leaf and tuple(np.shape(x)) == shapes[0]
    try:
      if jax.tree.structure(x) != treedef:
        return False
    except Exception:  # pylint: disable=broad-except
      return False
    return [tuple(np.shape(l)) for l in jax.tree.leaves(x)] == shapes

  def zero(x):
    if not is_params_like(x):
      return x
    return jax.tree.map(
        lambda r, buf: buf if r is None else jnp.where(r, jnp.zeros_like(buf), buf),
        reset, x, is_leaf=_is_none)

  return jax.tree.map(zero, state, is_leaf=is_params_like)


def _shard_like(x: Any, ref: Any) -> Any:
  """``x`` placed with the sharding of the parameter ``ref`` (same shape).

  Eagerly, ``x`` is moved (``device_put``) to ``ref.sharding`` unless it is
  already equivalent (a no-op in single-device use). Under ``jit`` with an
  explicit-axes mesh (``jax.make_mesh``'s default; ``jax.set_mesh``) the
  sharding is part of ``ref``'s type and ``x`` is ``reshard``-ed to it; with
  auto axes (classic GSPMD) it is not known while tracing, so ``shard_alike``
  asks the partitioner to give ``x`` whatever sharding ``ref`` gets.
  """
  if (x is None or not hasattr(x, "shape")
      or tuple(np.shape(x)) != tuple(np.shape(ref))):
    return x
  if isinstance(ref, jax.core.Tracer):
    ref_sharding = jax.typeof(ref).sharding
    mesh = ref_sharding.mesh
    if not mesh.empty and mesh.explicit_axes:
      if jax.typeof(x).sharding.spec != ref_sharding.spec:
        x = jax.sharding.reshard(x, ref_sharding)
      return x
    return shard_alike(x, ref)[0]
  if isinstance(x, jax.core.Tracer):
    # A traced buffer of a concrete param (e.g. init under vmap over seeds):
    # nothing to place while tracing.
    return x
  sharding = getattr(ref, "sharding", None)
  if (isinstance(ref, jax.Array) and isinstance(x, jax.Array)
      and not x.sharding.is_equivalent_to(sharding, x.ndim)):
    return jax.device_put(x, sharding)
  return x


def shard_like_params(tree: PyTree, params: PyTree) -> PyTree:
  """Gives every per-parameter buffer in ``tree`` its parameter's sharding.

  A per-parameter buffer is a subtree with the params' structure and leaf
  shapes (optimizer moments) or in mask layout (masks, flip counts, coverage
  counts: ``None`` at non-prunable leaves). Other leaves (step counts, keys)
  are left as they are. Under ``jax.sharding`` this keeps per-weight state
  sharded like the weights instead of replicated on every device, whether
  ``init`` runs eagerly or under ``jit`` (see :func:`_shard_like`); on a
  single device it changes nothing.
  """
  treedef = jax.tree.structure(params)
  refs = jax.tree.leaves(params)
  shapes = [tuple(np.shape(p)) for p in refs]
  params_is_leaf = treedef.num_nodes == 1 and treedef.num_leaves == 1

  def is_buffer(x):
    if x is None:
      return False
    if isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "aval"):
      return params_is_leaf and tuple(np.shape(x)) == shapes[0]
    try:
      if jax.tree.structure(x, is_leaf=_is_none) != treedef:
        return False
    except Exception:  # pylint: disable=broad-except
      return False
    leaves = jax.tree.leaves(x, is_leaf=_is_none)
    return all(l is None or tuple(np.shape(l)) == s
               for l, s in zip(leaves, shapes))

  def place(x):
    if not is_buffer(x):
      return x
    if params_is_leaf:
      return _shard_like(x, refs[0])
    return jax.tree.map(lambda b, p: None if b is None else _shard_like(b, p),
                        x, params, is_leaf=_is_none)

  return jax.tree.map(place, tree, is_leaf=is_buffer)


def _is_variable(x) -> bool:
  # nnx.Optimizer keeps its state in Variable wrappers (OptVariable/OptArray).
  return hasattr(x, "get_value") and callable(x.get_value)


def _is_masked_node(x) -> bool:
  # optax.masked / partition / multi_transform hand an inner transformation
  # params with MaskedNode() at the leaves outside its group.
  return isinstance(x, optax.MaskedNode)


def user_view(tree: PyTree) -> PyTree:
  """A tree as a user reads it: Flax NNX Variable wrappers (as in
  ``nnx.Optimizer.opt_state`` or ``nnx.state(model)``) replaced by the values
  they hold, and optax's ``MaskedNode`` (the leaves outside a
  ``masked``/``partition`` group) by None; other trees unchanged."""
  return jax.tree.map(
      lambda x: None if _is_masked_node(x) else (
          x.get_value() if _is_variable(x) else x), tree,
      is_leaf=lambda x: x is None or _is_variable(x) or _is_masked_node(x))


def combine_masks(a: PyTree, b: PyTree) -> PyTree:
  """Masks of two pruning transformations over one params tree: a weight is
  alive only if every transformation that prunes it keeps it.

  ``None`` and optax's ``MaskedNode`` stand for "no mask here" and may cover
  a whole subtree (a ``partition`` label given for a subtree), so the two
  trees are merged node by node.
  """
  absent = lambda x: x is None or _is_masked_node(x)  # pylint: disable=unnecessary-lambda-assignment
  if absent(a):
    return b
  if absent(b):
    return a
  if hasattr(a, "shape") and hasattr(b, "shape"):
    return a & b
  # One level of each node: its children become the leaves.
  kids_a, node_a = jax.tree_util.tree_flatten(a, is_leaf=lambda x: x is not a)
  kids_b, node_b = jax.tree_util.tree_flatten(b, is_leaf=lambda x: x is not b)
  if node_a != node_b:
    raise ValueError(f"masks: the pruning states cover different trees "
                     f"({node_a} vs {node_b}).")
  return node_a.unflatten([combine_masks(x, y) for x, y in zip(kids_a, kids_b)])
