"""One layer, one shot: magnitude, Wanda and SparseGPT on a kernel ``W [in, out]``.

Every solver takes the kernel as a matrix (:class:`~flipout_jax.post_training.
capture.KernelView`: rows are input features, columns output units) and
returns ``(mask, new_kernel)``; ``mask`` is True where a weight is kept.

Counts. A layer of ``n = in·out`` weights at sparsity ``s`` prunes
``k = round(s·n)`` (the library's count convention), and the methods that
compare within each output unit (Wanda, SparseGPT) give output ``j`` the
count ``⌊k/out⌋ + [j < k mod out]``: exact per layer, as even as it can be
across outputs. N:M (``n_keep`` of every ``m`` consecutive inputs of each
output) replaces the count.

* :func:`magnitude`: the ``k`` smallest ``|W|`` of the layer (ties: the
  later position is pruned, as in :mod:`flipout_jax.selection`).
* :func:`wanda` (Sun et al. 2023): score ``|W_ij|·‖X_i‖₂``, ``X_i`` input
  feature ``i`` over every calibration token; lowest scores of each output
  pruned; no weight update.
* :func:`sparsegpt` (Frantar & Alistarh 2023): with ``H = XᵀX +
  λ·mean(diag H)·I`` (``λ = 0.01``; a dead input, ``H_ii = 0``, gets
  ``H_ii = 1`` and its weights 0) and ``U`` the upper Cholesky factor of
  ``H⁻¹``, inputs are processed in blocks of ``B = 128``. At a block's start
  each output's mask in it is chosen from ``w²/U_ii²`` (adaptive selection;
  output ``j``'s count is split over the blocks by cumulative rounding,
  ``round(k_j·end/in) − round(k_j·start/in)``); N:M chooses every group of
  ``m`` at its first column from the updated weights. Input ``i`` of the
  block is then quantised to ``q = w·mask``, the error ``e = (w − q)/U_ii``
  is compensated on the block's later inputs (``w_l −= e·U_il``), and the
  accumulated errors update the inputs right of the block at its end (lazy
  batch update).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from flipout_jax import selection


def output_counts(k: int, num_in: int, num_out: int) -> np.ndarray:
  """Pruned count of each output: ``⌊k/out⌋ + [j < k mod out]``."""
  del num_in
  q, r = divmod(int(k), int(num_out))
  return (q + (np.arange(num_out) < r)).astype(np.int64)


def _lowest_per_column(scores: jax.Array, counts) -> jax.Array:
  """Keep-mask: column ``j`` loses its ``counts[j]`` lowest scores, exactly
  (ties: the later row is pruned first)."""
  # A stable ascending sort of the reversed rows ranks tied later rows first.
  rank = jnp.argsort(jnp.argsort(scores[::-1], axis=0, stable=True), axis=0)
  return rank[::-1] >= jnp.asarray(counts)[None, :]


def _keep_n_of_m(scores: jax.Array, n_keep: int, m: int) -> jax.Array:
  """Keep-mask: the ``n_keep`` highest of every ``m`` consecutive rows."""
  rows, cols = scores.shape
  g = scores.reshape(rows // m, m, cols)
  order = jnp.argsort(-g, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1)
  return (rank < n_keep).reshape(rows, cols)


def magnitude(w: jax.Array, k: int):
  """``(mask, w·mask)``: the ``k`` smallest ``|w|`` of the layer pruned."""
  keep = selection.top_k_mask(jnp.abs(w.astype(jnp.float32)), w.size - int(k))
  return keep, jnp.where(keep, w, 0)


def wanda(w: jax.Array, sq: jax.Array, k: int | None = None, *,
          n_m: tuple[int, int] | None = None):
  """``(mask, w·mask)`` by ``|W_ij|·‖X_i‖₂`` within each output (or N:M)."""
  scores = jnp.abs(w.astype(jnp.float32)) * jnp.sqrt(sq)[:, None]
  if n_m is not None:
    keep = _keep_n_of_m(scores, *n_m)
  else:
    keep = _lowest_per_column(scores, output_counts(k, *w.shape))
  return keep, jnp.where(keep, w, 0)


@functools.partial(jax.jit, static_argnames=("counts", "n_m", "block",
                                             "dampening"))
def _sparsegpt(w, gram, counts, n_m, block, dampening):
  num_in, num_out = w.shape
  wt = w.astype(jnp.float32).T  # [out, in], the reference's layout
  h = gram.astype(jnp.float32)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  wt = jnp.where(dead[None, :], 0.0, wt)
  h = h + dampening * jnp.mean(jnp.diag(h)) * jnp.eye(num_in)
  hinv = jnp.linalg.inv(h)
  hinv = jnp.linalg.cholesky((hinv + hinv.T) / 2).T  # U: UᵀU = H⁻¹, upper
  keep_all = []
  for start in range(0, num_in, block):
    end = min(start + block, num_in)
    w1, u1 = wt[:, start:end], hinv[start:end, start:end]
    d = jnp.diag(u1)
    if n_m is None:
      c = np.asarray(counts)
      kb = np.round(c * end / num_in) - np.round(c * start / num_in)
      pruned = ~_lowest_per_column((w1 ** 2 / d[None, :] ** 2).T, kb).T
    else:
      pruned = jnp.zeros_like(w1, bool)  # w1's sharding (explicit axes)

    def column(i, carry, u1=u1, d=d):
      w1, pruned, q1, err1 = carry
      if n_m is not None:
        def choose(pruned):
          m = n_m[1]
          s = (lax.dynamic_slice_in_dim(w1, i, m, axis=1) ** 2
               / lax.dynamic_slice_in_dim(d, i, m)[None, :] ** 2)
          return lax.dynamic_update_slice_in_dim(
              pruned, ~_keep_n_of_m(s.T, *n_m).T, i, axis=1)
        pruned = lax.cond(i % n_m[1] == 0, choose, lambda p: p, pruned)
      wi = w1[:, i]
      q = jnp.where(pruned[:, i], 0.0, wi)
      e = (wi - q) / d[i]
      # U is upper triangular: row i touches columns >= i only.
      w1 = w1 - e[:, None] * u1[i][None, :]
      return w1, pruned, q1.at[:, i].set(q), err1.at[:, i].set(e)

    _, pruned, q1, err1 = lax.fori_loop(
        0, end - start, column,
        (w1, pruned, jnp.zeros_like(w1), jnp.zeros_like(w1)))
    wt = wt.at[:, start:end].set(q1)
    wt = wt.at[:, end:].add(-err1 @ hinv[start:end, end:])
    keep_all.append(~pruned)
  keep = jnp.concatenate(keep_all, axis=1).T
  return keep, jnp.where(keep, wt.T, 0.0).astype(w.dtype)


def sparsegpt(w: jax.Array, gram: jax.Array, k: int | None = None, *,
              n_m: tuple[int, int] | None = None, block: int = 128,
              dampening: float = 0.01):
  """``(mask, reconstructed w)`` of SparseGPT (module docstring)."""
  if n_m is not None and block % n_m[1]:
    raise ValueError(f"block: must be a multiple of m={n_m[1]}, got {block}.")
  counts = None if n_m is not None else tuple(
      int(c) for c in output_counts(k, *w.shape))
  return _sparsegpt(w, gram, counts, n_m, int(block), float(dampening))
