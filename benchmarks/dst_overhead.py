"""Overhead of dynamic sparse training (DST-EE, RigL, SET): time and memory.

LeNet-300-100 (784-300-100-10, 266,610 parameters) on a synthetic batch of
128, SGD with momentum 0.9 as the inner optimizer. In one process, with the
variants interleaved round by round so machine load hits them alike, it
measures the median time of

* the optimizer update alone (``tx.update`` + ``optax.apply_updates`` on a
  fixed gradient): plain inner vs DST on a non-update step and on a
  mask-update step;
* a full train step (forward, backward, update) likewise;

and the optimizer-state bytes DST adds per parameter. Timings use fixed
inputs (the state is not carried), so every call does the same work; the
mask-update step is timed by setting the state's step count to an event.

    python benchmarks/dst_overhead.py [--reps 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# pylint: disable=g-import-not-at-top
from flipout_jax import core
from flipout_jax import models
from flipout_jax.methods import dst

BATCH = 128
UPDATE_EVERY = 100
END_STEP = 10_000
SPARSITY = 0.9


def _nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _median_ms(fn, args, reps: int) -> list[float]:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return times


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=50,
                      help="timed calls per variant per round")
  parser.add_argument("--rounds", type=int, default=5,
                      help="interleaved rounds over all variants")
  args = parser.parse_args(argv)

  model = models.LeNet300100()
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (BATCH, 28, 28, 1))
  y = jax.random.randint(ky, (BATCH,), 0, 10)
  params = model.init(kp, x)["params"]
  n_params = sum(p.size for p in jax.tree.leaves(params))

  def loss_fn(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grads = jax.grad(loss_fn)(params)

  def inner():
    return optax.sgd(0.1, momentum=0.9)

  common = dict(sparsity=SPARSITY, every=UPDATE_EVERY,
                end_step=END_STEP)
  txs = {
      "sgd": inner(),
      "dst_ee": dst.dst_ee(inner(), **common),
      "rigl": dst.rigl(inner(), **common),
      "set": dst.set_(inner(), **common),
  }
  states = {name: tx.init(params) for name, tx in txs.items()}
  n_prunable = sum(int(m.size) for m in jax.tree.leaves(
      core.get_masks(states["dst_ee"])))

  # Variants: (label, jitted fn, args). Non-update steps use count
  # UPDATE_EVERY + 1, update steps count UPDATE_EVERY (an event).
  def with_count(state, count):
    return state._replace(count=jnp.int32(count))

  variants = []
  for name, tx in txs.items():
    def update_only(g, s, p, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    def train_step(s, p, tx=tx):
      g = jax.grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    update_only, train_step = jax.jit(update_only), jax.jit(train_step)
    counts = ([None] if name == "sgd"
              else [UPDATE_EVERY + 1, UPDATE_EVERY])
    for count in counts:
      state = states[name] if count is None else with_count(states[name],
                                                            count)
      kind = ("" if count is None
              else " non-update" if count != UPDATE_EVERY else " update")
      variants.append((f"update  {name}{kind}", update_only,
                       (grads, state, params)))
      variants.append((f"step    {name}{kind}", train_step, (state, params)))

  for _, fn, fargs in variants:  # compile and warm up
    for _ in range(3):
      jax.block_until_ready(fn(*fargs))
  times = {label: [] for label, _, _ in variants}
  for _ in range(args.rounds):
    for label, fn, fargs in variants:
      times[label] += _median_ms(fn, fargs, args.reps)
  med = {label: float(np.median(t)) for label, t in times.items()}

  print(f"LeNet-300-100, batch {BATCH}, {n_params:,} params "
        f"({n_prunable:,} prunable), sparsity {SPARSITY} ERK, "
        f"inner sgd(momentum=0.9), {jax.devices()[0].platform}, "
        f"{args.rounds}x{args.reps} calls per variant")
  print(f"{'variant':34s} {'median ms':>10s} {'vs sgd':>8s}")
  for label, t in med.items():
    base = med["update  sgd" if label.startswith("update") else "step    sgd"]
    print(f"{label:34s} {t:10.4f} {t / base:7.2f}x")

  print()
  print(f"amortized over one period of {UPDATE_EVERY} steps "
        f"({UPDATE_EVERY - 1} non-update + 1 update):")
  for name in ("dst_ee", "rigl", "set"):
    for kind in ("update ", "step   "):
      amortized = ((UPDATE_EVERY - 1) * med[f"{kind} {name} non-update"]
                   + med[f"{kind} {name} update"]) / UPDATE_EVERY
      base = med[f"{kind} sgd"]
      print(f"  {kind} {name:7s} {amortized:8.4f} ms  {amortized / base:5.2f}x")

  print()
  base = _nbytes(states["sgd"])
  print(f"optimizer state: sgd {base:,} B = {base / n_params:.2f} B/param")
  for name in ("dst_ee", "rigl", "set"):
    extra = _nbytes(states[name]) - base
    print(f"  {name:7s} extra {extra:,} B = {extra / n_params:.3f} B/param "
          f"({extra / n_prunable:.3f} B per prunable weight)")


if __name__ == "__main__":
  main()
