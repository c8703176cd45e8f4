"""Export a pruned model: sparse storage, byte sizes, sparse inference.

:func:`export` replaces every prunable leaf (a mask that is not ``None``) of a
params tree by a compressed kernel holding exactly the weights its mask keeps
(including a kept weight that happens to be 0.0):

* ``"bcoo"``: a :class:`jax.experimental.sparse.BCOO` of shape
  ``kernel.shape``: ``data[nse]`` (param dtype) and ``indices[nse, ndim]``
  (int16 when every dimension is < 2^15, else int32), in row-major order.
  Bytes: ``nse·(itemsize + ndim·index_bytes)``, e.g. 8 B per kept float32
  weight of a Dense kernel with int16 indices: smaller than dense only below
  50 % density (12 B with int32 indices: below 33 %).
* ``"nm"``: an :class:`NMKernel` for N:M masks (see :func:`flipout_jax.structure.n_m`):
  ``values[..., in/M·N, out]`` (param dtype) and ``indices`` (uint8, same
  shape) giving each value's position ``0..M−1`` inside its group of M along
  axis -2; the value ``M`` marks an empty slot (a group that keeps fewer than
  N). Bytes: ``(N/M)·size·(itemsize + 1)``, e.g. 62.5 % of dense for 2:4
  float32 (hardware formats pack the position in 2 bits: 53 %).
* ``"auto"``: ``"nm"`` for leaves whose mask is N:M (``n``/``m`` given) and
  ``"bcoo"`` for the others.

Other leaves stay dense arrays. :func:`to_dense` inverts :func:`export`
exactly (``where(mask, params, 0)``), :func:`export_report` counts bytes,
and :func:`sparse_dense_apply` runs a Dense layer ``x @ W + b`` on the
compressed kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from flipout_jax import structure as structure_lib
from flipout_jax import trees

PyTree = Any
FORMATS = ("bcoo", "nm", "auto")


@jax.tree_util.register_pytree_node_class
class NMKernel:
  """An N:M-sparse kernel stored compactly along axis -2.

  Attributes:
    values: ``[..., in/M·N, out]``: the kept weights of each group of M
      (``in`` axis), in increasing position, 0.0 in empty slots.
    indices: uint8, same shape: each value's position ``0..M−1`` within its
      group, ``M`` for an empty slot.
    n, m: the pattern (static).
    shape: the dense shape ``(..., in, out)`` (static).
  """

  def __init__(self, values, indices, n: int, m: int, shape):
    self.values = values
    self.indices = indices
    self.n, self.m = int(n), int(m)
    self.shape = tuple(shape)

  def tree_flatten(self):
    return (self.values, self.indices), (self.n, self.m, self.shape)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def dtype(self):
    return self.values.dtype

  @property
  def nbytes(self) -> int:
    return int(self.values.nbytes + self.indices.nbytes)

  @property
  def nse(self) -> int:
    """Stored (non-empty) entries."""
    return int(np.sum(np.asarray(self.indices) < self.m))

  def todense(self) -> jax.Array:
    """The dense kernel: ``values`` scattered to their positions, 0 elsewhere."""
    return _nm_todense(self.values, self.indices, self.n, self.m, self.shape)

  def __repr__(self):
    return (f"NMKernel({self.n}:{self.m}, shape={self.shape}, "
            f"dtype={self.values.dtype})")


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _nm_todense(values, indices, n, m, shape):
  *lead, _, out = shape
  groups = shape[-2] // m
  vals = values.reshape(*lead, groups, n, out)
  idx = indices.reshape(*lead, groups, n, out).astype(jnp.int32)
  position = jax.lax.broadcasted_iota(jnp.int32, (*lead, groups, m, out),
                                      len(lead) + 1)
  dense = jnp.zeros((*lead, groups, m, out), values.dtype)
  # Positions within a group are distinct (empty slots hold m, matching
  # none), so selecting instead of adding reproduces every value bit for
  # bit, -0.0 included.
  for r in range(n):
    dense = jnp.where(position == idx[..., r:r + 1, :], vals[..., r:r + 1, :],
                      dense)
  return dense.reshape(shape)


def nm_compress(kernel: jax.Array, mask: jax.Array, n: int, m: int) -> NMKernel:
  """Packs ``where(mask, kernel, 0)`` into an :class:`NMKernel` (axis -2).

  Raises:
    ValueError: if ``kernel`` is not N:M-compatible (ndim >= 2, axis -2
      divisible by ``m``), shapes differ, or a group of ``mask`` keeps more
      than ``n`` entries.
  """
  n, m = structure_lib.check_nm_args(n, m)
  kernel = jnp.asarray(kernel)
  mask = jnp.asarray(mask, jnp.bool_)
  if mask.shape != kernel.shape:
    raise ValueError(f"mask: shape {mask.shape} differs from kernel "
                     f"{kernel.shape}.")
  if not structure_lib.nm_compatible(kernel.shape, m):
    raise ValueError(f"kernel: shape {kernel.shape} cannot be N:M with m={m} "
                     "(needs ndim >= 2 and axis -2 divisible by m).")
  most = int(jnp.max(structure_lib.nm_group_counts(mask, m), initial=0))
  if most > n:
    raise ValueError(f"mask: a group keeps {most} > n={n} entries; it is not "
                     f"{n}:{m}.")
  values, indices = _nm_pack(kernel, mask, n, m)
  return NMKernel(values, indices, n, m, kernel.shape)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _nm_pack(kernel, mask, n, m):
  *lead, cin, out = kernel.shape
  groups = cin // m
  gm = mask.reshape(*lead, groups, m, out)
  gk = kernel.reshape(*lead, groups, m, out)
  shape = (*lead, groups * n, out)
  if n == 0:
    return jnp.zeros(shape, kernel.dtype), jnp.zeros(shape, jnp.uint8)
  # rank[j] = number of kept entries before position j in the group.
  rank = jnp.cumsum(gm, axis=-2, dtype=jnp.int32) - 1
  values, indices = [], []
  for r in range(n):
    slot = gm & (rank == r)
    present = jnp.any(slot, axis=-2, keepdims=True)
    where = jnp.argmax(slot, axis=-2, keepdims=True).astype(jnp.int32)
    values.append(jnp.where(present, jnp.take_along_axis(gk, where, axis=-2),
                            jnp.zeros((), kernel.dtype)))
    indices.append(jnp.where(present, where, m).astype(jnp.uint8))
  return (jnp.concatenate(values, axis=-2).reshape(shape),
          jnp.concatenate(indices, axis=-2).reshape(shape))


def _index_dtype(shape, index_dtype):
  if index_dtype == "auto":
    return np.int16 if max(shape, default=0) < 2**15 else np.int32
  dtype = np.dtype(index_dtype)
  if dtype not in (np.dtype(np.int16), np.dtype(np.int32)):
    raise ValueError(f"index_dtype: must be 'auto', int16 or int32, got "
                     f"{index_dtype!r}.")
  if max(shape, default=0) > np.iinfo(dtype).max:
    raise ValueError(f"index_dtype: {dtype} cannot index shape {shape}.")
  return dtype


def bcoo_from_mask(kernel: jax.Array, mask: jax.Array,
                   index_dtype="auto") -> sparse.BCOO:
  """A BCOO holding ``kernel`` exactly where ``mask`` is True (row-major).

  Unlike ``BCOO.fromdense`` the stored entries are the mask's, not the
  nonzeros: a kept weight equal to 0.0 is stored, so the count matches the
  mask and masks can be recovered from the export.
  """
  kernel = np.asarray(kernel)
  mask = np.asarray(mask, bool)
  if mask.shape != kernel.shape:
    raise ValueError(f"mask: shape {mask.shape} differs from kernel "
                     f"{kernel.shape}.")
  dtype = _index_dtype(kernel.shape, index_dtype)
  idx = np.argwhere(mask).astype(dtype)  # row-major, so sorted and unique
  return sparse.BCOO((jnp.asarray(kernel[mask]), jnp.asarray(idx)),
                     shape=kernel.shape, indices_sorted=True,
                     unique_indices=True)


def _is_compressed(x) -> bool:
  return isinstance(x, (sparse.BCOO, NMKernel))


def export(params: PyTree, masks: PyTree, *, format: str = "bcoo",  # pylint: disable=redefined-builtin
           n: int | None = None, m: int | None = None,
           index_dtype="auto") -> PyTree:
  """Compresses every masked leaf of ``params``.

  Args:
    params: the params pytree (e.g. after training; pruned weights 0.0).
    masks: a mask tree (``flipout_jax.get_masks(state)``): bool arrays at the
      prunable leaves, ``None`` elsewhere.
    format: ``"bcoo"``, ``"nm"`` (every masked leaf must be N:M) or
      ``"auto"`` (N:M where the mask is, BCOO elsewhere).
    n, m: the pattern, required by ``"nm"`` and ``"auto"``'s N:M branch.
    index_dtype: BCOO index dtype: ``"auto"`` (int16 when every dimension is
      < 2^15, else int32), ``"int16"`` or ``"int32"``.

  Returns:
    A tree like ``params`` with ``BCOO``/:class:`NMKernel` leaves at the
    masked positions (host-side; not jittable, sizes are data-dependent).

  Raises:
    ValueError: for an unknown ``format``, mismatched trees, ``"nm"``
      without ``n``/``m`` or with a mask that is not N:M (layer named).
  """
  if format not in FORMATS:
    raise ValueError(f"format: unknown value {format!r}; valid values are "
                     f"{FORMATS}.")
  if format == "nm" and (n is None or m is None):
    raise ValueError("n: format='nm' needs both n and m.")
  if (n is None) != (m is None):
    raise ValueError("m: give both n and m, or neither.")
  if n is not None:
    n, m = structure_lib.check_nm_args(n, m)
  trees.check_same_structure(params, masks, what="export")

  def one(path, mask, leaf):
    if format != "bcoo" and n is not None:
      fits = (structure_lib.nm_compatible(leaf.shape, m)
              and int(jnp.max(structure_lib.nm_group_counts(mask, m))) <= n)
      if fits:
        return nm_compress(leaf, mask, n, m)
      if format == "nm":
        raise ValueError(f"masks: layer {path!r} (shape {tuple(leaf.shape)}) "
                         f"is not {n}:{m} sparse; use format='auto' or "
                         "'bcoo'.")
    return bcoo_from_mask(leaf, mask, index_dtype)

  flat_p, treedef = jax.tree_util.tree_flatten_with_path(params)
  flat_m = jax.tree.leaves(masks, is_leaf=lambda x: x is None)
  out = [leaf if mask is None else one(trees.path_str(kp), mask, leaf)
         for (kp, leaf), mask in zip(flat_p, flat_m)]
  return jax.tree.unflatten(treedef, out)


def _leaves_with_paths(exported: PyTree):
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      exported, is_leaf=_is_compressed)
  return [(trees.path_str(kp), leaf) for kp, leaf in flat], treedef


def _todense(x):
  if isinstance(x, sparse.BCOO) and not isinstance(x.data, jax.core.Tracer):
    # Host-side scatter: an eager BCOO.todense compiles a program per shape.
    dense = np.zeros(x.shape, x.dtype)
    dense[tuple(np.asarray(x.indices).T)] = np.asarray(x.data)
    return jnp.asarray(dense)
  return x.todense() if _is_compressed(x) else x


def to_dense(exported: PyTree) -> PyTree:
  """Inverse of :func:`export`: dense arrays, 0.0 where masks were False.

  Works eagerly (host-side scatter) and under ``jit``.
  """
  flat, treedef = _leaves_with_paths(exported)
  return jax.tree.unflatten(treedef, [_todense(x) for _, x in flat])


def masks_of(exported: PyTree) -> PyTree:
  """The mask tree an export was made with (None at dense leaves)."""
  flat, treedef = _leaves_with_paths(exported)

  def mask(x):
    if isinstance(x, sparse.BCOO):
      out = np.zeros(x.shape, bool)
      out[tuple(np.asarray(x.indices).T)] = True
      return jnp.asarray(out)
    if isinstance(x, NMKernel):
      ones = NMKernel(jnp.ones_like(x.values, jnp.bool_), x.indices, x.n, x.m,
                      x.shape)
      return ones.todense()
    return None

  return jax.tree.unflatten(treedef, [mask(x) for _, x in flat])


# ----------------------------------------------------------------------------
# Byte sizes.


@dataclasses.dataclass(frozen=True)
class ExportedLayer:
  path: str
  shape: tuple[int, ...]
  format: str  # "bcoo", "nm" or "dense"
  size: int  # dense entries
  stored: int  # stored entries (nse)
  dense_bytes: int
  sparse_bytes: int  # bytes of the exported leaf (values + indices)

  @property
  def ratio(self) -> float:
    """sparse_bytes / dense_bytes (< 1: the export is smaller)."""
    return self.sparse_bytes / self.dense_bytes if self.dense_bytes else 1.0


@dataclasses.dataclass(frozen=True)
class ExportReport:
  """Bytes of an export; ``str(report)`` is a Markdown table."""
  layers: tuple[ExportedLayer, ...]  # every leaf, compressed or dense

  @property
  def dense_bytes(self) -> int:
    return sum(l.dense_bytes for l in self.layers)

  @property
  def sparse_bytes(self) -> int:
    return sum(l.sparse_bytes for l in self.layers)

  @property
  def ratio(self) -> float:
    return self.sparse_bytes / self.dense_bytes if self.dense_bytes else 1.0

  def __str__(self) -> str:
    rows = ["| leaf | shape | format | stored / size | dense bytes | "
            "exported bytes | ratio |", "|---|---|---|---:|---:|---:|---:|"]
    for l in self.layers:
      rows.append(
          f"| {l.path} | {'x'.join(map(str, l.shape))} | {l.format} | "
          f"{l.stored:,} / {l.size:,} | {l.dense_bytes:,} | "
          f"{l.sparse_bytes:,} | {l.ratio:.3f} |")
    rows.append(f"| **total** | | | | {self.dense_bytes:,} | "
                f"{self.sparse_bytes:,} | {self.ratio:.3f} |")
    return "\n".join(rows)


def export_report(exported: PyTree) -> ExportReport:
  """Dense vs exported bytes of every leaf of an :func:`export` result.

  Dense bytes are ``size·itemsize`` of the dense leaf; exported bytes are
  ``data + indices`` bytes of a BCOO, ``values + indices`` of an NMKernel,
  and the dense bytes for leaves left dense.
  """
  layers = []
  for path, x in _leaves_with_paths(exported)[0]:
    shape = tuple(int(d) for d in x.shape)
    size = int(np.prod(shape, dtype=np.int64))
    dense = size * np.dtype(x.dtype).itemsize
    if isinstance(x, sparse.BCOO):
      layers.append(ExportedLayer(path, shape, "bcoo", size, int(x.nse), dense,
                                  int(x.data.nbytes + x.indices.nbytes)))
    elif isinstance(x, NMKernel):
      layers.append(ExportedLayer(path, shape, "nm", size, x.nse, dense,
                                  x.nbytes))
    else:
      layers.append(ExportedLayer(path, shape, "dense", size, size, dense,
                                  dense))
  return ExportReport(tuple(layers))


# ----------------------------------------------------------------------------
# Inference.


def sparse_dense_apply(x: jax.Array, kernel, bias: jax.Array | None = None
                       ) -> jax.Array:
  """A Flax Dense layer on an exported kernel: ``x @ W + bias``.

  Args:
    x: ``[..., in]``.
    kernel: ``W`` of shape ``(in, out)``: a ``BCOO`` (sparse-dense product
      via ``jax.experimental.sparse``: a gather of ``x``'s columns per
      stored entry and a segment sum, O(nse·batch) work), an
      :class:`NMKernel` (densified, then a dense matmul: on CPU N:M saves
      bytes, not time) or a dense array.
    bias: optional ``[out]``.

  Returns:
    ``[..., out]`` in the result dtype of ``x @ W``.

  Raises:
    ValueError: if ``kernel`` is not 2-d or ``x``'s last axis is not
      ``kernel.shape[0]``.
  """
  x = jnp.asarray(x)
  if len(kernel.shape) != 2:
    raise ValueError(f"kernel: a Dense kernel is 2-d (in, out), got shape "
                     f"{tuple(kernel.shape)}.")
  cin, out = kernel.shape
  if x.ndim < 1 or x.shape[-1] != cin:
    raise ValueError(f"x: last axis must be the kernel's in={cin}, got shape "
                     f"{x.shape}.")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, cin)
  if isinstance(kernel, NMKernel):
    y = x2 @ kernel.todense()
  else:
    y = x2 @ kernel
  if bias is not None:
    y = y + bias
  return y.reshape(*lead, out)
