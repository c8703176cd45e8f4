"""Sparse (BCOO) vs dense inference of exported pruned Dense layers on CPU.

Two models, each pruned by global magnitude to 90, 99 and 99.9 % sparsity
(masks from flipout_jax.selection), exported with flipout_jax.sparse_export and run
at batch 128 and batch 1:

* LeNet-300-100: a 784-300-100-10 MLP (ReLU), whole forward pass;
* one 4096 x 4096 Dense layer;
* plus the 4096 x 4096 layer at 2:4 in the compact N:M format (densified
  then multiplied: on CPU N:M saves bytes, not time).

For each case: the best-of-``--reps`` time of the jitted dense forward
(masked dense kernels, ``x @ W + b``) and of the jitted sparse one
(:func:`flipout_jax.sparse_export.sparse_dense_apply`), their ratio (``> 1``: sparse
is faster), the max abs difference of the outputs, and the bytes of the
prunable kernels dense vs exported.

Run: python benchmarks/export.py [--reps 20] [--sizes 90,99,99.9]
One process; prints a table.
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

from flipout_jax import sparse_export as export_lib  # pylint: disable=g-import-not-at-top
from flipout_jax import structure as nm_lib  # pylint: disable=g-import-not-at-top
from flipout_jax import selection  # pylint: disable=g-import-not-at-top


def _dense_params(key, sizes):
  keys = jax.random.split(key, len(sizes))
  return {f"dense{i}": {
      "kernel": jax.random.normal(k, (a, b)) / np.sqrt(a),
      "bias": 0.01 * jax.random.normal(k, (b,))}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def _magnitude_masks(params, sparsity):
  """Global magnitude masks keeping exactly N − round(s·N) kernel weights."""
  names = sorted(params)
  kernels = [params[n]["kernel"] for n in names]
  total = sum(k.size for k in kernels)
  keep = total - int(round(sparsity * total))
  kept = selection.top_k_masks([jnp.abs(k) for k in kernels],
                               [list(range(len(kernels)))], jnp.array([keep]))
  return {n: {"kernel": m, "bias": None} for n, m in zip(names, kept)}


def _forward(params, x, apply):
  names = sorted(params)
  for i, name in enumerate(names):
    x = apply(x, params[name]["kernel"], params[name]["bias"])
    if i < len(names) - 1:
      x = jax.nn.relu(x)
  return x


def _dense_apply(x, kernel, bias):
  return x @ kernel + bias


def _time(fn, *args, reps: int) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))  # compile + warm up
  if time.perf_counter() - t > 2.0:
    reps = min(reps, 3)  # e.g. BCOO at 90 % sparsity and batch 128
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def _kernel_bytes(report):
  rows = [l for l in report.layers if l.format != "dense"]
  return sum(l.dense_bytes for l in rows), sum(l.sparse_bytes for l in rows)


def _row(model, label, batch, params, masks, exported, reps):
  masked = jax.tree.map(lambda p, m: p if m is None else jnp.where(m, p, 0.0),
                        params, masks, is_leaf=lambda x: x is None)
  in_dim = params[sorted(params)[0]]["kernel"].shape[0]
  x = jax.random.normal(jax.random.PRNGKey(batch), (batch, in_dim))
  dense_fn = jax.jit(lambda p, x: _forward(p, x, _dense_apply))
  sparse_fn = jax.jit(lambda p, x: _forward(p, x,
                                            export_lib.sparse_dense_apply))
  t_dense = _time(dense_fn, masked, x, reps=reps)
  t_sparse = _time(sparse_fn, exported, x, reps=reps)
  diff = float(jnp.max(jnp.abs(dense_fn(masked, x) - sparse_fn(exported, x))))
  dense_b, sparse_b = _kernel_bytes(export_lib.export_report(exported))
  speed = t_dense / t_sparse
  verdict = "sparse faster" if speed > 1 else "SPARSE SLOWER"
  print(f"| {model} | {label} | {batch} | {t_dense * 1e3:.3f} | "
        f"{t_sparse * 1e3:.3f} | {speed:.2f}x ({verdict}) | {diff:.1e} | "
        f"{dense_b / 2**20:.2f} | {sparse_b / 2**20:.3f} "
        f"({sparse_b / dense_b:.3f}) |", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--sizes", default="90,99,99.9",
                      help="sparsities in percent, comma-separated")
  parser.add_argument("--batches", default="128,1")
  args = parser.parse_args(argv)
  sparsities = [float(s) / 100 for s in args.sizes.split(",") if s]
  batches = [int(b) for b in args.batches.split(",") if b]

  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, best of "
        f"{args.reps}; ratio = dense time / sparse time")
  print("| model | sparsity | batch | dense ms | sparse ms | ratio | max |diff| "
        "| kernel MiB dense | exported MiB (ratio) |")
  print("|---|---|---:|---:|---:|---|---:|---:|---:|")
  models = {"784-300-100-10": (784, 300, 100, 10),
            "4096x4096": (4096, 4096)}
  for model, sizes in models.items():
    params = _dense_params(jax.random.PRNGKey(0), sizes)
    for s in sparsities:
      masks = _magnitude_masks(params, s)
      exported = export_lib.export(params, masks)
      for batch in batches:
        _row(model, f"{s:.1%} bcoo", batch, params, masks, exported,
             args.reps)
  params = _dense_params(jax.random.PRNGKey(0), (4096, 4096))
  masks = {"dense0": {"kernel": nm_lib.nm_masks(
      jnp.abs(params["dense0"]["kernel"]), 2, 4), "bias": None}}
  exported = export_lib.export(params, masks, format="nm", n=2, m=4)
  for batch in batches:
    _row("4096x4096", "2:4 nm", batch, params, masks, exported, args.reps)


if __name__ == "__main__":
  main()
