"""Exact global top-k at scale: radix select vs a full sort and lax.top_k.

For each size n (default 10^6 and 10^7) draws n float32 scores and times one
jitted "keep the k = n/10 highest" mask (90 % sparsity), same process, with

* ``radix``      flipout_jax.selection.top_k_mask (exact, ties by position);
* ``radix-ties`` the same on scores quantised to 64 levels, so that the k-th
                 score is tied and the tie-position pass runs;
* ``kth-keys``   flipout_jax.selection.kth_largest_keys on precomputed keys
                 (what ST-3 calls every step);
* ``bisect32``   the previous implementation (32 compare-and-count passes
                 over stored keys + a full-size cumsum for ties), kept here
                 as the before-reference;
* ``argsort``    ``jnp.argsort(-s, stable=True)[:k]`` scattered into a mask
                 (the exact full-sort reference);
* ``lax.top_k``  ``jax.lax.top_k(s, k)`` indices scattered into a mask.

Reports the best-of-``--reps`` wall time, the speed-up of each method over
``argsort``, and XLA's compiled memory (``memory_analysis``): temporaries and
outputs relative to the scores' bytes (peak <= arguments + outputs + temps).
Every method's mask is checked to hold exactly k entries, and radix against
argsort for equality.

Run: python benchmarks/selection.py [--sizes 1e6,1e7] [--reps 3]
     [--skip lax.top_k,bisect32]
10^8 needs ~4 GB and, for argsort, ~70 s per run here: e.g.
python benchmarks/selection.py --sizes 1e8 --reps 1 --skip lax.top_k
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flipout_jax import selection  # pylint: disable=g-import-not-at-top

METHODS = ("radix", "radix-ties", "kth-keys", "bisect32", "argsort",
           "lax.top_k")


# --------------------------------------------------------------------------
# The previous implementation (commit ccb0037), for the before/after numbers.


def _bisect32_kth(keys, k):
  def body(bit, prefix):
    cand = prefix | jnp.left_shift(jnp.uint32(1), (31 - bit).astype(jnp.uint32))
    return jnp.where(jnp.sum(keys >= cand, dtype=jnp.int32) >= k, cand, prefix)
  return jax.lax.fori_loop(0, 32, body, jnp.uint32(0))


def _bisect32_mask(scores, k):
  keys = selection.sortable_key(scores)
  t = _bisect32_kth(keys, k)
  above = jnp.sum(keys > t, dtype=jnp.int32)
  tie = keys == t
  rank = jnp.cumsum(tie, dtype=jnp.int32)
  return (keys > t) | (tie & (rank <= k - above))


# --------------------------------------------------------------------------


def _mask_from_indices(idx, n):
  return jnp.zeros((n,), jnp.bool_).at[idx].set(True)


def _make(method: str, n: int, k: int):
  if method in ("radix", "radix-ties"):
    return lambda s: selection.top_k_mask(s, k)
  if method == "kth-keys":
    return lambda keys: selection.kth_largest_keys([keys], [[0]],
                                                   jnp.array([k]))
  if method == "bisect32":
    return lambda s: _bisect32_mask(s, k)
  if method == "argsort":
    return lambda s: _mask_from_indices(jnp.argsort(-s, stable=True)[:k], n)
  if method == "lax.top_k":
    return lambda s: _mask_from_indices(jax.lax.top_k(s, k)[1], n)
  raise ValueError(f"method: unknown {method!r}; valid: {METHODS}.")


def _time(compiled, arg, reps: int) -> float:
  """Best of ``reps`` calls of an already compiled function (no warm-up
  call: at 10^8 one argsort call is ~70 s; best-of absorbs first-call
  effects at small sizes)."""
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(arg))
    best = min(best, time.perf_counter() - t)
  return best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="1e6,1e7",
                      help="comma-separated sizes, e.g. 1e6,1e7,1e8")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--keep", type=float, default=0.1,
                      help="fraction kept (k = round(keep·n))")
  parser.add_argument("--skip", default="", help="comma-separated methods")
  args = parser.parse_args(argv)
  sizes = [int(float(s)) for s in args.sizes.split(",") if s]
  skip = {s for s in args.skip.split(",") if s}
  unknown = skip - set(METHODS)
  if unknown:
    raise ValueError(f"--skip: unknown methods {sorted(unknown)}; valid: {METHODS}.")

  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, "
        f"keep {args.keep:.0%}, best of {args.reps}")
  header = (f"{'n':>11} {'method':>11} {'time':>11} {'vs argsort':>11} "
            f"{'ns/elem':>8} {'temp/S':>7} {'(temp+out)/S':>13}")
  print(header)
  print("-" * len(header))
  for n in sizes:
    k = int(round(args.keep * n))
    scores = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
    tied = jnp.round(scores * 8.0) / 8.0  # ~64 levels: k-th score is tied
    keys = selection.sortable_key(scores)
    # Dispatch is asynchronous: finish the inputs before any timing.
    jax.block_until_ready((scores, tied, keys))
    nbytes = 4 * n
    rows, reference = {}, None
    for method in METHODS:
      if method in skip:
        continue
      arg = {"radix-ties": tied, "kth-keys": keys}.get(method, scores)
      compiled = jax.jit(_make(method, n, k)).lower(arg).compile()
      mem = compiled.memory_analysis()
      seconds = _time(compiled, arg, args.reps)
      out = compiled(arg)
      if method != "kth-keys":
        count = int(jnp.sum(out))
        if count != k:
          raise AssertionError(f"{method}: kept {count} entries, expected {k}")
        if method == "argsort":
          reference = np.asarray(out)
        if method == "radix":
          rows["_radix_mask"] = np.asarray(out)
      print(f"  [{n:,} {method}: {seconds:.3f} s]", file=sys.stderr, flush=True)
      rows[method] = (seconds, mem.temp_size_in_bytes / nbytes,
                      (mem.temp_size_in_bytes + mem.output_size_in_bytes)
                      / nbytes)
      del out
    if reference is not None and "_radix_mask" in rows:
      if not np.array_equal(rows["_radix_mask"], reference):
        raise AssertionError("radix mask differs from the stable argsort mask")
    rows.pop("_radix_mask", None)
    base = rows.get("argsort", (None,))[0]
    for method, (seconds, temp, total) in rows.items():
      ratio = f"{base / seconds:10.1f}x" if base else f"{'-':>11}"
      print(f"{n:>11,} {method:>11} {seconds * 1e3:9.1f}ms {ratio} "
            f"{seconds / n * 1e9:8.2f} {temp:7.3f} {total:13.3f}", flush=True)


if __name__ == "__main__":
  main()
