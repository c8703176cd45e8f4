"""Step-time and memory overhead of each pruning method over its inner optimizer.

    python -m benchmarks.overhead [--repeats 200] [--batch 128]
    python -m benchmarks.overhead --models gpt [--gpt_blocks 4]

For LeNet-300-100 and LeNet-5 (Flax, MNIST-shaped random data), or the
GPT-style decoder (``--models gpt``: ``models.get_gpt("gpt_tiny")``, d_model
128, 4 heads, MLP 512, vocabulary 1000, ``--gpt_blocks`` blocks, random
tokens, batch 8 of 64 tokens whatever ``--batch`` says) it times, in
one process and interleaved round-robin so that machine load hits all
candidates alike, the median of a jitted train step (forward, backward,
``tx.update``, ``apply_updates``) for the plain inner optimizer and for every
method on non-pruning steps, and prints ratios against the plain optimizer.
It also times a pruning step (the same jitted step on a state whose counter
sits on an event) and counts the optimizer-state bytes per parameter beyond
the inner optimizer's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flipout_jax as fj
from flipout_jax import models

EVENT = 1000  # the first pruning event (well after the timed steps)


def methods(inner):
  common = dict(sparsity=0.99, every=EVENT)
  return {
      "sgd+momentum (plain)": inner,
      "global_magnitude": fj.global_magnitude(inner, **common),
      "random_pruning": fj.random_pruning(inner, **common),
      "snip": fj.snip(inner, sparsity=0.99, start_step=EVENT),
      "noisy_global_magnitude": fj.global_magnitude(inner, noise_scale=1.0, **common),
      "flipout": fj.flipout(inner, **common),
      "flipout (hash noise)": fj.flipout(inner, noise_generator="hash",
                                         **common),
  }


def every_method(inner, params):
  """Every transformation of the library, at typical arguments (for memory)."""
  dense = {path: 0.9 for path, _ in fj.trees.leaves_with_paths(
      fj.trees.mask_like(params, fj.trees.prunable_tree(params)))}
  common = dict(sparsity=0.9, every=EVENT)
  dst = dict(sparsity=0.9, every=100, end_step=EVENT)
  nm24 = fj.n_m(2, 4, skip_incompatible=True)
  return {
      "global_magnitude": fj.global_magnitude(inner, **common),
      "random_pruning": fj.random_pruning(inner, **common),
      "noisy global_magnitude": fj.global_magnitude(inner, noise_scale=1.0, **common),
      "flipout": fj.flipout(inner, **common),
      "snip": fj.snip(inner, sparsity=0.9),
      "fixed_mask": fj.fixed_mask(inner, jax.tree.map(
          lambda p: jnp.ones(p.shape, bool) if p.ndim >= 2 else None, params)),
      "hoyer_square (regulariser)": optax.chain(fj.hoyer_square(1e-4), inner),
      "gradient_flow (abs θHg)": fj.gradient_flow(
          inner, measure="gradient_norm_preservation", sparsity=0.9, rounds=3,
          every=100),
      "grasp": fj.grasp(inner, sparsity=0.9),
      "st3": fj.st3(inner, sparsity=0.9, start_step=0, end_step=EVENT),
      "dst_ee": fj.dst_ee(inner, **dst),
      "rigl": fj.rigl(inner, **dst),
      "set": fj.set_(inner, **dst),
      "movement": fj.movement(inner, sparsity=0.9, start_step=0,
                              end_step=EVENT),
      "global_magnitude 2:4": fj.global_magnitude(
          inner, sparsity=0.5, end_step=EVENT, structure=nm24),
      "flipout 2:4": fj.flipout(inner, sparsity=0.5, end_step=EVENT,
                                structure=nm24),
      "st3 2:4": fj.st3(inner, sparsity=0.5, start_step=0, end_step=EVENT,
                        structure=nm24),
      "rigl 2:4": fj.rigl(inner, sparsity=0.5, every=100,
                          end_step=EVENT, structure=nm24),
      "unipts sparse_training": fj.unipts.sparse_training(inner, sparsities=dense),
  }


GPT_BATCH, GPT_SEQ = 8, 64


def model_and_batch(name, batch, gpt_blocks=4):
  """``(model, x, y)``: the model ``name`` and a random batch for it."""
  kx, ky = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  if name == "gpt":
    model = models.get_gpt("gpt_tiny", num_layers=gpt_blocks)
    shape = (GPT_BATCH, GPT_SEQ)
    x = jax.random.randint(kx, shape, 0, model.vocab_size)
    return model, x, jax.random.randint(ky, shape, 0, model.vocab_size)
  model = models.get_model(name)
  x = jax.random.normal(kx, (batch, 28, 28, 1))
  return model, x, jax.random.randint(ky, (batch,), 0, 10)


def state_memory(name, gpt_blocks=4):
  """Extra optimizer-state bytes of every method over the inner optimizer."""
  model, x, _ = model_and_batch(name, 1, gpt_blocks)
  params = model.init(jax.random.PRNGKey(2), x)["params"]
  n_params = sum(p.size for p in jax.tree.leaves(params))
  n_prunable = sum(m.size for m in jax.tree.leaves(
      fj.trees.mask_like(params, fj.trees.prunable_tree(params))))
  inner = optax.sgd(0.01, momentum=0.9)
  inner_bytes = state_bytes(inner.init(params))
  print(f"\n### optimizer-state memory, {name} ({n_params:,} params, "
        f"{n_prunable:,} prunable), inner sgd+momentum = "
        f"{inner_bytes / n_params:.2f} bytes/param\n")
  print("| method | extra bytes / param | extra bytes / prunable weight | "
        "by dtype (bytes / prunable weight) |")
  print("|---|---:|---:|---|")
  inner_by_dtype = bytes_by_dtype(inner.init(params))
  for label, tx in every_method(inner, params).items():
    by_dtype = bytes_by_dtype(jax.eval_shape(tx.init, params))
    extra = {k: v - inner_by_dtype.get(k, 0) for k, v in by_dtype.items()}
    total = sum(extra.values())
    parts = ", ".join(f"{k} {v / n_prunable:.2f}" for k, v in sorted(extra.items())
                      if v / n_prunable >= 0.005)
    print(f"| {label} | {total / n_params:.2f} | {total / n_prunable:.2f} | "
          f"{parts or '-'} |")


def bytes_by_dtype(state) -> dict[str, int]:
  out = {}
  for leaf in jax.tree.leaves(state):
    key = str(np.dtype(leaf.dtype))
    out[key] = out.get(key, 0) + leaf.size * np.dtype(leaf.dtype).itemsize
  return out


def make_step(model, tx):
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def state_bytes(state) -> int:
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))


def bench_model(name, repeats, batch, gpt_blocks=4):
  model, x, y = model_and_batch(name, batch, gpt_blocks)
  batch = x.shape[0]
  params = model.init(jax.random.PRNGKey(2), x)["params"]
  n_params = sum(p.size for p in jax.tree.leaves(params))
  inner = optax.sgd(0.01, momentum=0.9)
  inner_bytes = state_bytes(inner.init(params))

  runs = {}
  for label, tx in methods(inner).items():
    step = make_step(model, tx)
    state = tx.init(params)
    jax.block_until_ready(step(params, state, x, y))  # compile
    runs[label] = (step, state)

  times = {label: [] for label in runs}
  for _ in range(repeats):
    for label, (step, state) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(step(params, state, x, y))
      times[label].append(time.perf_counter() - t0)

  # A pruning step: the same compiled function, counter on an event.
  event_times = {}
  for label, (step, state) in runs.items():
    if not isinstance(state, fj.PruneState):
      continue
    ev_state = state._replace(count=jnp.int32(EVENT))
    jax.block_until_ready(step(params, ev_state, x, y))
    ts = []
    for _ in range(max(5, repeats // 10)):
      t0 = time.perf_counter()
      jax.block_until_ready(step(params, ev_state, x, y))
      ts.append(time.perf_counter() - t0)
    event_times[label] = statistics.median(ts)

  base = statistics.median(times["sgd+momentum (plain)"])
  print(f"\n### {name} (batch {batch}, {n_params:,} params, median of {repeats})\n")
  print("| method | step (ms) | ratio vs plain | pruning step (ms) | extra state bytes/param |")
  print("|---|---:|---:|---:|---:|")
  for label, (step, state) in runs.items():
    med = statistics.median(times[label])
    extra = (state_bytes(state) - inner_bytes) / n_params
    ev = event_times.get(label)
    ev_s = f"{1e3 * ev:.2f}" if ev is not None else "-"
    print(f"| {label} | {1e3 * med:.2f} | {med / base:.2f}x | {ev_s} | {extra:.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=200)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--models", default="lenet300100,lenet5",
                      help="comma-separated: lenet300100, lenet5, gpt")
  parser.add_argument("--gpt_blocks", type=int, default=4,
                      help="depth of the GPT (--models gpt)")
  parser.add_argument("--memory_only", action="store_true",
                      help="only the optimizer-state memory of every method")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s)")
  for name in args.models.split(","):
    state_memory(name, args.gpt_blocks)
  if args.memory_only:
    return
  for name in args.models.split(","):
    bench_model(name, args.repeats if name == "lenet300100" else max(20, args.repeats // 5),
                args.batch, args.gpt_blocks)


if __name__ == "__main__":
  main()
