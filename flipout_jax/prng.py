"""JAX's default PRNG, bit for bit, as elementwise operators.

Under the default ``threefry2x32`` implementation with
``jax_threefry_partitionable`` (JAX's default), entry ``j`` of
``jax.random.bits(key, shape)`` (32-bit) is ``x1 ^ x2`` for ``(x1, x2)`` the
Threefry-2x32 hash of the counter ``(0, j)`` under ``key``, and row ``i`` of
``jax.random.split(key, n)`` is the hash of ``(0, i)`` itself (``j < 2**32``).

:func:`threefry2x32` writes that hash with uint32 operators, so it runs on
jnp arrays, where XLA fuses its 20 rounds into the kernel that consumes
them, and on NumPy arrays, on the host. JAX's own CPU lowering of the hash
is a rolled loop over its 5 groups of rounds: over the 5 M counters of a
24-block GPT's random masks it took ~4× longer to compile and ~20× longer
to run than the fused one. The init of the random masks uses it; keys
drawn any other way (another implementation, the non-partitionable layout)
go through ``jax.random``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Rotations of the rounds (Salmon et al. 2011, Threefry-2x32), alternating
# by groups of four.
ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
# The key schedule's parity constant.
PARITY = 0x1BD11BDA


def threefry2x32(k1, k2, x1, x2):
  """The Threefry-2x32 hash (20 rounds) of the counters ``(x1, x2)`` under
  the key ``(k1, k2)``: ``jax.extend.random.threefry2x32_p``, bit for bit.

  With ``ks = (k1, k2, k1 ^ k2 ^ PARITY)``: ``x += (ks[0], ks[1])``, then
  five times (``i = 0..4``) four rounds ``x1 += x2; x2 = rotl(x2, r) ^ x1``
  (``r`` from :data:`ROTATIONS` ``[i % 2]``) followed by the key injection
  ``x1 += ks[(i+1) % 3]; x2 += ks[(i+2) % 3] + i + 1``, all mod 2**32.

  Args:
    k1, k2, x1, x2: uint32 arrays (jnp, or NumPy of ndim >= 1, whose
      arithmetic wraps silently), broadcast together.

  Returns:
    ``(x1, x2)``, uint32, the broadcast shape.
  """
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(PARITY))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))) ^ x1
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def hashed(key: jax.Array | None = None) -> bool:
  """Whether ``key``'s draws (None: a ``jax.random.PRNGKey``'s) are the
  position hashes of the module docstring: the ``threefry2x32``
  implementation with ``jax_threefry_partitionable``."""
  if key is not None and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(key))
  else:
    impl = jax.config.jax_default_prng_impl
  return impl == "threefry2x32" and bool(jax.config.jax_threefry_partitionable)


def key_data(key: jax.Array) -> jax.Array:
  """uint32 ``[..., 2]``: a raw key as it is, a typed key's data."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return key


def split_data(key: jax.Array, num: int) -> jax.Array:
  """uint32 ``[num, 2]``: the data of ``jax.random.split(key, num)`` for a
  :func:`hashed` key, in jnp ops."""
  data = key_data(key)
  x1, x2 = threefry2x32(data[..., 0], data[..., 1],
                        jnp.zeros((num,), jnp.uint32),
                        jnp.arange(num, dtype=jnp.uint32))
  return jnp.stack([x1, x2], axis=-1)


def split_seed(seed: int, num: int) -> np.ndarray | None:
  """uint32 ``[num, 2]``, on the host: ``jax.random.split(
  jax.random.PRNGKey(seed), num)`` (no program to compile), for an int
  ``0 <= seed < 2**32`` (whose key is ``(0, seed)`` with or without x64)
  under :func:`hashed` keys; None otherwise (ask ``jax.random``)."""
  if not 0 <= seed < 2**32 or not hashed():
    return None
  x1, x2 = threefry2x32(np.zeros((1,), np.uint32),
                        np.full((1,), seed, np.uint32),
                        np.zeros((num,), np.uint32),
                        np.arange(num, dtype=np.uint32))
  return np.stack([x1, x2], axis=-1)
