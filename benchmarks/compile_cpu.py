"""CPU seconds to compile the GPT train step, for comparing library versions.

    python benchmarks/compile_cpu.py --blocks 4 --methods adamw,global_magnitude,flipout
    PYTHONPATH=/path/to/older/checkout python benchmarks/compile_cpu.py ...

Process CPU seconds (all threads) of ``jax.jit(step).lower(...).compile()``
for the full train step (forward, backward, ``tx.update``, apply) of the GPT
decoder of ``benchmarks/compile.py`` (d_model 128, 4 heads, MLP 512,
vocabulary 1000, batch 8 × 64 tokens, ``optax.adamw(1e-3)``), caches cleared
before each. CPU seconds are what the compile costs whatever else loads the
machine; wall seconds follow the load. It reads nothing but the
``fj.global_magnitude`` / ``fj.flipout`` / ``fj.rigl`` / ``fj.st3``
constructors, so the same file measures an older checkout put first on
``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import flipout_jax as fj
from flipout_jax import models

METHODS = {
    "adamw": lambda inner: inner,
    "global_magnitude": lambda inner: fj.global_magnitude(
        inner, sparsity=0.9, every=1000),
    "flipout": lambda inner: fj.flipout(inner, sparsity=0.9, every=1000),
    "flipout_no_noise": lambda inner: fj.flipout(inner, sparsity=0.9,
                                                 every=1000, noise_scale=0),
    "flipout_hash": lambda inner: fj.flipout(inner, sparsity=0.9, every=1000,
                                             noise_generator="hash"),
    "rigl": lambda inner: fj.rigl(inner, sparsity=0.9, every=1000,
                                  end_step=2000),
    "st3": lambda inner: fj.st3(inner, sparsity=0.9, start_step=0,
                                end_step=1000),
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--blocks", type=int, default=4)
  parser.add_argument("--methods", default="adamw,global_magnitude,flipout")
  args = parser.parse_args(argv)
  names = args.methods.split(",")
  unknown = sorted(set(names) - set(METHODS))
  if unknown:
    raise SystemExit(f"--methods: unknown {unknown}; valid: "
                     f"{', '.join(METHODS)}")
  model = models.get_gpt("gpt_tiny", num_layers=args.blocks, vocab_size=1000,
                         d_model=128, num_heads=4, mlp_dim=512, max_len=64)
  x = jnp.zeros((8, 64), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  base = None
  for name in names:
    tx = METHODS[name](optax.adamw(1e-3))
    state = tx.init(params)

    def step(p, s, x, y, tx=tx):
      updates, s = tx.update(jax.grad(loss_fn)(p, x, y), s, p)
      return optax.apply_updates(p, updates), s

    jax.clear_caches()
    c0, t0 = time.process_time(), time.perf_counter()
    jax.jit(step).lower(params, state, x, x).compile()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    base = cpu if base is None else base
    print(f"{args.blocks} blocks, {name}: compile CPU {cpu:.2f} s "
          f"({cpu / base:.2f}x the first), wall {wall:.2f} s", flush=True)


if __name__ == "__main__":
  main()
