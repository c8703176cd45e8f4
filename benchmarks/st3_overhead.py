"""Overhead of ST-3 over its inner optimizer on LeNet-300-100.

Times one jitted train step (forward, backward, optimizer update, apply) of a
784-300-100-10 MLP at batch 128 on synthetic data, for the plain inner
optimizer and for ST-3 / ST-3σ / ST-3 in its frozen fine-tuning phase wrapped
around it, and reports the median step time and its ratio to the plain step.
Also reports the optimizer-state bytes ST-3 adds per parameter (raw weights,
masks, thresholds, scales, count, key) beyond the inner optimizer's state.

Run: python benchmarks/st3_overhead.py [--steps 200] [--inner sgd|adam]
One process; prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flipout_jax.methods import st3 as st3_lib  # pylint: disable=g-import-not-at-top
from flipout_jax.models import LeNet300100  # pylint: disable=g-import-not-at-top


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _timed(fn):
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--inner", choices=("sgd", "adam"), default="sgd")
  args = parser.parse_args(argv)

  model = LeNet300100()
  key = jax.random.PRNGKey(0)
  params = model.init(key, jnp.zeros((1, 28, 28, 1)))["params"]
  keys = jax.random.split(jax.random.PRNGKey(1), 8)
  batches = [(jax.random.normal(k, (args.batch, 28, 28, 1)),
              jax.random.randint(k, (args.batch,), 0, 10)) for k in keys]

  def make_inner():
    if args.inner == "sgd":
      return optax.sgd(0.1, momentum=0.9)
    return optax.adam(1e-3)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def make_step(tx):
    @jax.jit
    def step(p, s, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s, loss
    return step

  # The ST-3 variants run in the middle of their ramp (steps counted from 0,
  # end far away), so every timed step thresholds at a non-trivial sparsity;
  # the "frozen" variant starts past freeze_step (fine-tuning path only).
  variants = {
      "plain": make_inner(),
      "st3": st3_lib.st3(make_inner(), sparsity=0.9, start_step=0,
                         end_step=10_000),
      "st3_sigma": st3_lib.st3(make_inner(), sparsity=0.9, start_step=0,
                               end_step=10_000, sigma_normalized=True),
      "st3_no_rescale": st3_lib.st3(make_inner(), sparsity=0.9, start_step=0,
                                    end_step=10_000, rescale=False),
      "st3_frozen": st3_lib.st3(make_inner(), sparsity=0.9, start_step=0,
                                end_step=1, freeze_step=2),
  }
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"LeNet-300-100: {num_params:,} params, batch {args.batch}, inner "
        f"{args.inner}, {args.steps} timed steps, backend "
        f"{jax.default_backend()}, {jax.device_count()} device(s)")
  inner_bytes = _nbytes(make_inner().init(params))
  print(f"inner optimizer state: {inner_bytes / num_params:.2f} bytes/param")

  # Compile and warm up everything first, then time the variants in
  # interleaved rounds so that load from other processes hits all of them
  # alike; report medians of the per-step times.
  runs = {}
  for name, tx in variants.items():
    state = tx.init(params)
    step = make_step(tx)
    p = params
    for i in range(args.warmup):  # also moves st3_frozen past its freeze
      p, state, _ = step(p, state, *batches[i % len(batches)])
    jax.block_until_ready((p, state))
    runs[name] = [step, p, state, []]
  leaves = [params["fc1"]["kernel"], params["fc2"]["kernel"],
            params["fc3"]["kernel"]]
  threshold = jax.jit(lambda ls, s: st3_lib.soft_threshold_leaves(ls, s)[0])
  jax.block_until_ready(threshold(leaves, 0.5))
  threshold_times = []

  chunk = 10
  for r in range(max(1, args.steps // chunk)):
    for name, run in runs.items():
      step, p, state, times = run
      for i in range(chunk):
        x, y = batches[(r * chunk + i) % len(batches)]
        t = time.perf_counter()
        p, state, loss = step(p, state, x, y)
        jax.block_until_ready((p, state, loss))
        times.append(time.perf_counter() - t)
      run[1], run[2] = p, state
    for _ in range(chunk):
      threshold_times.append(_timed(lambda: threshold(leaves, 0.5)))

  base = statistics.median(runs["plain"][3])
  for name, (step, _, state, times) in runs.items():
    median = statistics.median(times)
    extra = _nbytes(state) - inner_bytes
    print(f"{name:15s} median step {median * 1e3:7.3f} ms  ratio "
          f"{median / base:5.2f}x  state +{extra / num_params:5.2f} bytes/param "
          f"({extra:,} B)  compiled {step._cache_size()}x")
  print(f"{'threshold only':15s} median      {statistics.median(threshold_times) * 1e3:7.3f} ms"
        "  (selection + soft threshold + rescale of the 3 kernels, no training)")


if __name__ == "__main__":
  main()
