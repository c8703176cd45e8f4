"""FlipOut's gradient noise, scaled per tensor by the gradient's own norm.

For every selected tensor with gradient ``g`` (already masked), add
``ε ~ N(0, σ²I)`` with ``σ = λ·‖g‖₂ / sqrt(numel(g))``: noise of the gradient's
root-mean-square size times ``λ``. ``numel`` counts the whole tensor, pruned
entries included, as in the reference implementation.

Drawing the noise is most of FlipOut's per-step cost on a CPU, and almost all
of that is generating random bits (threefry: ~8 ns per 32-bit word here). By
default each 32-bit word therefore yields *two* standard normals through the
inverse CDF of a 16-bit uniform, ``z = √2·erfinv(2u − 1)``,
``u = (k + ½)/2¹⁶``: a Gaussian quantised to 65,536 levels with tails cut at
|z| ≈ 4.3 (variance within 0.02 % of 1). ``exact=True`` uses
``jax.random.normal`` instead.

Each leaf draws with its own key, but the leaves of one shape and dtype are
noised by one loop, so the compiled update holds one draw per distinct shape
(a handful for a GPT of any depth) rather than one per leaf.

The noise is a piece of :func:`flipout_jax.core.prune` (``noise=``), built by
:func:`gradient_noise`; FlipOut is a score, a tracker and this piece.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flipout_jax import prng
from flipout_jax import trees
from flipout_jax import validate

PyTree = Any
NOISE_ON = ("all", "prunable")
GENERATORS = ("threefry", "hash")


def noise_std(grad: jax.Array, scale: float) -> jax.Array:
  """``σ = scale · ‖grad‖₂ / sqrt(grad.size)`` as a float32 scalar."""
  g = grad.astype(jnp.float32)
  return scale * jnp.sqrt(jnp.sum(g * g) / g.size)


def _fmix32(x: jax.Array) -> jax.Array:
  # MurmurHash3's 32-bit finaliser: a bijection with full avalanche.
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape) -> jax.Array:
  """32-bit words from a counter hash: ``fmix(fmix(i·φ + k₀) ^ k₁)``.

  ``i`` is each entry's row-major index (uint32; tensors of 2³² entries or
  more repeat their words), ``(k₀, k₁)`` the key's two words, ``φ`` the
  golden-ratio constant and ``fmix`` MurmurHash3's finaliser. About 12
  integer operations per word against threefry's ~100: the noise of
  ``generator="hash"``. Like ``jax.random.bits`` it is elementwise in
  ``shape`` (computed from iotas), so under ``jax.sharding`` every device
  hashes only its shard's counters. Not a cryptographic generator; its
  statistics (uniform bits, no correlation between neighbours, keys or
  steps) are tested in ``tests/test_core.py``.

  Args:
    key: a PRNG key (typed, or the raw ``uint32[2]`` of ``PRNGKey``).
    shape: the words' shape.

  Returns:
    ``uint32`` array of ``shape``.
  """
  k = prng.key_data(key).reshape(-1).astype(jnp.uint32)
  shape = tuple(int(d) for d in shape)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(
        stride % 2**32)
    stride *= shape[d]
  x = _fmix32(index * jnp.uint32(0x9E3779B9) + k[0])
  return _fmix32(x ^ k[-1])


def normal16(key: jax.Array, shape, generator: str = "threefry") -> jax.Array:
  """Standard normals from 16-bit uniforms through the inverse CDF.

  ``"threefry"``: two normals per 32-bit word of ``jax.random.bits``. The
  words are drawn in the tensor's own shape with one axis halved (the first
  axis of even length, else the first axis), and the two 16-bit halves of
  word ``[..., j, ...]`` fill entries ``2j`` and ``2j + 1`` of that axis.
  Under ``jax.sharding`` every device therefore draws only the words of its
  own shard (``jax.random`` is partitionable and sharding-invariant with
  ``jax_threefry_partitionable``, JAX's default), where one flat draw split
  in halves would make every device draw all the words of the tensor. On
  one device it costs the same as the flat draw.

  ``"hash"``: one word of :func:`hash_bits` per entry, its high 16 bits
  looked up in a table of the same 65,536 inverse-CDF values. A hash word
  costs less than interleaving two halves into the tensor's layout, so
  this generator spends a word on every normal; it is elementwise in the
  entry's index, so a device hashes only its shard.
  """
  shape = tuple(int(d) for d in shape)
  if generator == "hash":
    k = hash_bits(key, shape) >> 16
    return jnp.asarray(_normal16_table())[k.astype(jnp.int32)]
  if not shape:
    return normal16(key, (1,), generator).reshape(())
  even = [a for a, d in enumerate(shape) if d % 2 == 0]
  axis = even[0] if even else 0
  half = (shape[axis] + 1) // 2
  words = jax.random.bits(key, shape[:axis] + (half,) + shape[axis + 1:],
                          jnp.uint32)
  k = jnp.stack([words >> 16, words & 0xFFFF], axis=axis + 1)
  k = k.reshape(shape[:axis] + (2 * half,) + shape[axis + 1:])
  if 2 * half != shape[axis]:
    k = jax.lax.slice_in_dim(k, 0, shape[axis], axis=axis)
  return _inverse_cdf16(k)


def _inverse_cdf16(k: jax.Array) -> jax.Array:
  """``√2·erfinv(2u − 1)`` at ``u = (k + ½)/2¹⁶`` (float32)."""
  u = (k.astype(jnp.float32) + 0.5) * (2.0 / 65536.0) - 1.0
  return np.sqrt(2.0) * jax.lax.erf_inv(u)


@functools.lru_cache(maxsize=None)
def _normal16_table() -> np.ndarray:
  """:func:`_inverse_cdf16` of every 16-bit value, float32 ``[65536]``
  (256 KiB; computed once, on first use, by the same XLA expression)."""
  with jax.ensure_compile_time_eval():
    return np.asarray(_inverse_cdf16(jnp.arange(65536, dtype=jnp.uint32)))


def add_gradient_noise(grads: PyTree, key: jax.Array, scale: float,
                       selected: PyTree, exact: bool = False,
                       generator: str = "threefry") -> PyTree:
  """Adds per-tensor Gaussian noise of std ``noise_std(g, scale)``.

  Args:
    grads: gradient pytree.
    key: PRNG key; each leaf gets its own sub-key.
    scale: λ >= 0.
    selected: params-shaped tree of Python bools: which leaves get noise.
    exact: draw with ``jax.random.normal`` instead of :func:`normal16`.
    generator: :func:`normal16`'s words, ``"threefry"`` or ``"hash"``.

  Returns:
    ``grads`` with noise added to the selected floating-point leaves.
  """
  keys = optax.tree.split_key_like(key, grads)
  leaves, treedef = jax.tree.flatten(grads)
  key_leaves = treedef.flatten_up_to(keys)
  chosen = [i for i, (g, sel) in enumerate(
      zip(leaves, treedef.flatten_up_to(selected)))
            if sel and jnp.issubdtype(g.dtype, jnp.floating)]
  out = list(leaves)
  draw = ((lambda k, shape: jax.random.normal(k, shape, jnp.float32)) if exact
          else functools.partial(normal16, generator=generator))

  def noised(g, k):
    return (g + noise_std(g, scale) * draw(k, g.shape)).astype(g.dtype)

  # Threefry's draw is a large kernel to compile, so the leaves of one
  # (shape, dtype) are noised as one stacked array by a loop (each leaf with
  # its own key: the numbers of a per-leaf draw) and the program grows with
  # the distinct shapes, not the leaves. (A loop, not a vmap: sliced out of
  # one batched expression, the draw would be fused into, and compiled
  # once for, the slice of every leaf.) The hash is a dozen integer
  # operations: each leaf draws its own, fused into its update, without the
  # stacking copies.
  if generator == "hash" and not exact:
    groups = [[j] for j in range(len(chosen))]
  else:
    groups = trees.same_shape_groups([leaves[i] for i in chosen])
  for members in groups:
    idx = [chosen[j] for j in members]
    if len(idx) == 1:  # the program of a per-leaf draw, op for op
      out[idx[0]] = noised(leaves[idx[0]], key_leaves[idx[0]])
      continue
    noisy = jax.lax.map(lambda a: noised(*a),
                        (jnp.stack([leaves[i] for i in idx]),
                         jnp.stack([key_leaves[i] for i in idx])))
    for n, i in enumerate(idx):
      out[i] = noisy[n]
  return treedef.unflatten(out)


class GradientNoise(NamedTuple):
  """The gradient noise piece of :func:`flipout_jax.core.prune`.

  ``noise(grads, masks, key)`` adds ``N(0, (scale·‖g‖/√n)²)`` to every
  selected leaf of the (masked) gradient; ``core.prune`` masks the result
  again, so pruned weights never get noise. Build it with
  :func:`gradient_noise`.

  Attributes:
    scale: λ, a Python float > 0 or a traced float32 scalar (then the noise
      is always drawn and scaled by it).
    on: ``"all"`` float leaves or ``"prunable"`` leaves only.
    exact: draw with ``jax.random.normal`` instead of :func:`normal16`.
    generator: :func:`normal16`'s words: ``"threefry"`` or ``"hash"``.
  """
  scale: Any
  on: str = "all"
  exact: bool = False
  generator: str = "threefry"

  def __call__(self, grads: PyTree, masks: PyTree, key: jax.Array) -> PyTree:
    # Over the gradient's leaves (a None param has none), reading each
    # leaf's mask (None: not prunable).
    selected = jax.tree.map(
        lambda g, m: m is not None if self.on == "prunable" else True,
        grads, masks)
    return add_gradient_noise(grads, key, self.scale, selected,
                              exact=self.exact, generator=self.generator)


def gradient_noise(scale, *, on: str = "all", exact: bool = False,
                   generator: str = "threefry") -> GradientNoise | None:
  """FlipOut's per-tensor gradient noise as a piece of ``core.prune``.

  Args:
    scale: λ >= 0 (finite); a traced jnp scalar (``optax.inject_hyperparams``)
      is used as is inside the update.
    on: ``"all"`` float leaves (the reference) or ``"prunable"`` only.
    exact: ``jax.random.normal`` instead of the 16-bit inverse-CDF normals.
    generator: the random words of those normals: ``"threefry"`` (JAX's,
      the default) or ``"hash"`` (:func:`hash_bits`, ~8x fewer operations;
      on a CPU the draw is most of FlipOut's step). Not with ``exact``.

  Returns:
    A :class:`GradientNoise`, or None when ``scale`` is a Python 0 (no noise
    at all: nothing is drawn).

  Raises:
    ValueError: naming the argument, for a negative or non-finite ``scale``,
      an unknown ``on`` or ``generator``, a non-bool ``exact`` or ``exact``
      with the hash generator.
  """
  scale = validate.number(scale, "noise_scale", low=0, traceable=True)
  validate.choice(on, "noise_on", NOISE_ON)
  validate.boolean(exact, "exact_noise")
  validate.choice(generator, "noise_generator", GENERATORS)
  if exact and generator != "threefry":
    raise ValueError("noise_generator: exact_noise=True draws "
                     "jax.random.normal (threefry); the 'hash' generator "
                     "makes 16-bit inverse-CDF normals only.")
  if not validate.is_dynamic(scale) and scale == 0.0:
    return None
  return GradientNoise(scale, on, exact, generator)
