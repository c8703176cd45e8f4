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


@jax.tree_util.register_pytree_with_keys_class
class PackedMask:
  """A boolean mask leaf stored as bits (``packed_masks=True``).

  ``bits`` is ``jnp.packbits(mask, axis=axis)``: uint8, ``mask``'s shape
  with ``axis`` shrunk to ``ceil(n / 8)`` (0.125 byte per weight instead of
  bool's 1). ``shape`` and ``axis`` are static (the pytree's aux data), so
  a jitted update sees one array per leaf. Read with :func:`unpack_masks`.

  Attributes:
    bits: uint8, the packed mask.
    shape: the mask's shape (a tuple of ints; ``()`` for a scalar leaf,
      whose one bit is packed along a length-1 axis).
    axis: the packed axis of the mask reshaped to at least 1-D.
  """

  __slots__ = ("bits", "shape", "axis")

  def __init__(self, bits, shape, axis):
    self.bits = bits
    self.shape = tuple(shape)
    self.axis = axis

  def tree_flatten(self):
    return (self.bits,), (self.shape, self.axis)

  def tree_flatten_with_keys(self):  # key path ".bits", e.g. in reports
    return ((jax.tree_util.GetAttrKey("bits"), self.bits),), (self.shape,
                                                              self.axis)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)

  def __repr__(self) -> str:
    return (f"PackedMask(shape={self.shape}, axis={self.axis}, "
            f"bits={getattr(self.bits, 'shape', self.bits)})")


def _is_packed(x) -> bool:
  return isinstance(x, PackedMask)


def packing_axis(shape: Sequence[int], sharding: Any = None) -> int:
  """The axis :func:`pack_masks` packs a mask of ``shape`` along.

  Packing must not move data across devices, so the axis is, in order of
  preference: an axis ``sharding`` leaves unsharded whose length is a
  multiple of 8; a sharded axis whose per-shard length is a multiple of 8
  (each device packs its own shard); the longest unsharded axis; the
  longest axis. Ties go to the first such axis. ``sharding`` is a
  ``NamedSharding`` (or None: nothing is known, every axis counts as
  unsharded). A Dense kernel ``(in, out)`` packs along ``in`` when it can.
  """
  shape = tuple(int(d) for d in shape) or (1,)
  spec = getattr(sharding, "spec", None)
  mesh_shape = dict(getattr(getattr(sharding, "mesh", None), "shape", {}) or {})
  ways = []
  for a in range(len(shape)):
    names = spec[a] if spec is not None and a < len(spec) else None
    names = () if names is None else (
        (names,) if isinstance(names, str) else tuple(names))
    ways.append(math.prod(int(mesh_shape.get(n, 1)) for n in names))
  local = [a for a in range(len(shape)) if ways[a] == 1]
  for a in local:
    if shape[a] % 8 == 0:
      return a
  for a in range(len(shape)):
    if ways[a] > 1 and shape[a] % (8 * ways[a]) == 0:
      return a
  pool = local or list(range(len(shape)))
  return max(pool, key=lambda a: (shape[a], -a))


def param_sharding(x: Any) -> Any:
  """A param's ``NamedSharding`` when it is known (a concrete array, or a
  tracer under an explicit-axes mesh), else None."""
  if isinstance(x, jax.core.Tracer):
    try:
      sharding = jax.typeof(x).sharding
    except Exception:  # pylint: disable=broad-except
      return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or not mesh.explicit_axes:
      return None
    return sharding
  sharding = getattr(x, "sharding", None)
  return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def _bit_weights(ndim: int, axis: int) -> jax.Array:
  # 2**(7 - k) along a new axis after ``axis`` (big-endian, as packbits).
  return (jnp.uint8(1) << (7 - jnp.arange(8, dtype=jnp.uint8))).reshape(
      (1,) * (axis + 1) + (8,) + (1,) * (ndim - axis - 1))


def pack_mask(mask: jax.Array, axis: int) -> PackedMask:
  """One bool mask as a :class:`PackedMask` packed along ``axis``.

  The bits of ``jnp.packbits(mask, axis=axis)`` (big-endian, the last byte
  zero-padded), computed in place (a reshape that splits ``axis`` in
  bytes of 8 entries) rather than by moving ``axis`` last and back, so that
  no transpose enters the compiled update.
  """
  shape = tuple(mask.shape)
  m = jnp.asarray(mask, jnp.bool_).reshape(shape or (1,))
  n = m.shape[axis]
  nbytes = -(-n // 8)
  if 8 * nbytes != n:
    pad = [(0, 0)] * m.ndim
    pad[axis] = (0, 8 * nbytes - n)
    m = jnp.pad(m, pad)
  split = m.shape[:axis] + (nbytes, 8) + m.shape[axis + 1:]
  bits = m.reshape(split).astype(jnp.uint8) * _bit_weights(m.ndim, axis)
  return PackedMask(jnp.sum(bits, axis=axis + 1, dtype=jnp.uint8), shape,
                    axis)


def unpack_mask(packed: PackedMask) -> jax.Array:
  """The bool mask of a :class:`PackedMask` (exactly the one packed), by
  the inverse reshape of :func:`pack_mask` (no transpose)."""
  shape = packed.shape or (1,)
  axis = packed.axis
  bits = jnp.expand_dims(packed.bits, axis + 1) & _bit_weights(len(shape),
                                                               axis)
  full = bits.reshape(shape[:axis] + (-1,) + shape[axis + 1:])
  full = jax.lax.slice_in_dim(full, 0, shape[axis], axis=axis)
  return (full != 0).reshape(packed.shape)


def pack_masks(masks: PyTree, axes: PyTree) -> PyTree:
  """Packs every bool leaf of a mask tree along its axis in ``axes`` (mask
  layout: an int per prunable leaf)."""
  return map_prunable(pack_mask, masks, axes)


def unpack_masks(masks: PyTree) -> PyTree:
  """A mask tree with every :class:`PackedMask` unpacked to bool (other
  leaves, bool masks and None, unchanged): what the update computes with
  and what ``get_masks`` returns, whether or not the state packs."""
  return jax.tree.map(lambda x: unpack_mask(x) if _is_packed(x) else x,
                      masks, is_leaf=lambda x: x is None or _is_packed(x))


def repack_like(stored: PyTree, masks: PyTree) -> PyTree:
  """``masks`` (bool) in the storage of ``stored``: packed along the same
  axes where ``stored`` holds :class:`PackedMask` leaves, else unchanged."""
  return jax.tree.map(
      lambda s, m: pack_mask(m, s.axis) if _is_packed(s) else m, stored,
      masks, is_leaf=lambda x: x is None or _is_packed(x))


def shard_packed_like_params(masks: PyTree, params: PyTree) -> PyTree:
  """Gives each :class:`PackedMask`'s bits its param's sharding spec (the
  packed axis is unsharded or packs locally, so the spec fits the bits).

  Eagerly the bits are placed with ``device_put``; under ``jit`` with an
  explicit-axes mesh they are ``reshard``-ed; with auto axes the
  partitioner propagates the mask's sharding through the packing itself.
  """
  def one(m, p):
    if not _is_packed(m):
      return m
    sharding = param_sharding(p)
    if sharding is None:
      return m
    target = jax.sharding.NamedSharding(sharding.mesh, sharding.spec)
    return PackedMask(_place(m.bits, target), m.shape, m.axis)

  return jax.tree.map(one, masks, params,
                      is_leaf=lambda x: x is None or _is_packed(x))


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
  asks the partitioner to give ``x`` whatever sharding ``ref`` gets (not
  with a single device, where there is nothing to place).
  """
  if (x is None or not hasattr(x, "shape")
      or tuple(np.shape(x)) != tuple(np.shape(ref))):
    return x
  if isinstance(ref, jax.core.Tracer):
    ref_sharding = jax.typeof(ref).sharding
    mesh = ref_sharding.mesh
    if not mesh.empty and mesh.explicit_axes:
      return _place(x, ref_sharding)
    if jax.device_count() == 1:
      # Nothing to place on one device. (Each shard_alike is a side-effecting
      # custom call to trace, lower and compile: the ~1850 of a 24-block
      # GPT's init cost ~0.13 s.)
      return x
    return shard_alike(x, ref)[0]
  if isinstance(x, jax.core.Tracer):
    # A traced buffer of a concrete param (e.g. init under vmap over seeds):
    # nothing to place while tracing.
    return x
  return _place(x, ref.sharding) if isinstance(ref, jax.Array) else x


def _place(x: Any, sharding: Any) -> Any:
  """``x`` with the ``NamedSharding`` ``sharding``: ``reshard``-ed when
  traced (explicit axes), moved with ``device_put`` when a concrete array
  that is not already placed so; else as it is."""
  if isinstance(x, jax.core.Tracer):
    if jax.typeof(x).sharding.spec != sharding.spec:
      x = jax.sharding.reshard(x, sharding)
    return x
  if isinstance(x, jax.Array) and not x.sharding.is_equivalent_to(
      sharding, x.ndim):
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
  they hold, optax's ``MaskedNode`` (the leaves outside a
  ``masked``/``partition`` group) by None and :class:`PackedMask` leaves by
  their bool masks; other trees unchanged."""
  tree = jax.tree.map(
      lambda x: None if _is_masked_node(x) else (
          x.get_value() if _is_variable(x) else x), tree,
      is_leaf=lambda x: x is None or _is_variable(x) or _is_masked_node(x))
  return unpack_masks(tree)


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
