"""Compile, init and step cost of every registered method on a GPT-style model.

    python -m benchmarks.compile [--blocks 4,12,24] [--methods all]
                                 [--repeats 20] [--init-only | --update-only]

For the GPT decoder of :mod:`flipout_jax.models.gpt` (d_model 128, 4 heads,
MLP 512, vocabulary 1000, sequences of 64, batch 8; ``optax.adamw(1e-3)``;
the default filter, so the 6 kernels of every block, the head kernel and
the two embedding tables are prunable) at each depth of ``--blocks``, and
for plain adamw and every method of ``fj.registry`` (``--methods``), it
measures in one process:

* **compile**: seconds of ``jax.jit(step).lower(...).compile()`` of the full
  train step (forward, backward, ``tx.update``, ``apply_updates``), with
  ``jax.clear_caches()`` before each, and its ratio to plain adamw's at the
  same depth; the line counts of the lowered StableHLO (``as_text()``) and
  of the compiled, optimised HLO;
* **init**: seconds of the first ``tx.init(params)`` (caches cleared
  before it, so including its compiles);
  ``--init-only`` measures only this (no step is compiled or timed) and
  prints one line per method;
* beside the wall seconds of compile and init, the process's CPU seconds
  (all threads), which a loaded machine does not inflate, and the CPU
  seconds of compiling the update alone (no model), with its ratio to
  plain adamw's;
* **steady / event**: the median time of the compiled step on a state whose
  step counter sits between events (steady) and on an event (event), as a
  ratio to plain adamw's steady step; all candidates and both states are
  timed interleaved, round by round, so machine load hits them alike;
* **update**: the median time of a jitted ``tx.update`` +
  ``optax.apply_updates`` on precomputed gradients (no forward or backward),
  as a ratio to plain adamw's;
* the optimizer-state bytes beyond adamw's, per parameter.

``--update-only`` (:func:`bench_update`) times only the update, in CPU ms,
for every method with bool masks and with ``packed_masks=True``.

Beside the event ratio it prints how many mask entries the event step
flipped, which shows that the timed event really ran.

Every method is built with ``fj.registry.build`` at sparsity 0.9 on a
schedule whose first event comes after the timed steps (step ``EVENT``).
Timings reuse fixed inputs (the state is not carried), so every call does
the same work. ``grasp`` and ``gradient_flow`` (measure
``gradient_norm_preservation``, the paper's proposal) need ``loss_fn`` in
``update``: they get the model's loss on the batch, used only inside their
event branch (so their "update" column does include the model's Hessian-
vector product in the compiled program, not in the steady time). ST-3 and
UniPTS's sparse training re-select their masks at every update and have no
separate event step; ST-3's steady state sits mid-ramp.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flipout_jax as fj
from flipout_jax import models

EVENT = 1000  # the first event of every schedule (well after the timed steps)
SPARSITY = 0.9
BATCH, SEQ = 8, 64
PLAIN = "adamw (plain)"
NEEDS_LOSS_FN = ("grasp", "gradient_flow")


@dataclasses.dataclass
class Spec:
  """How one method is built and timed.

  Attributes:
    kwargs: ``params -> keyword arguments`` for ``fj.registry.build``.
    steady: the step count of the steady state (no event).
    event: the step count of an event, or None (no separate event step).
    warm: updates applied to the steady state (and params) before the
      update-only timing, so that it is a state training produces: ST-3's
      thresholds are then those of the update before (a fresh state at
      count ``steady`` holds τ = 0, which training never shows mid-ramp).
  """
  kwargs: Callable[[Any], dict[str, Any]]
  steady: int = 0
  event: int | None = EVENT
  warm: int = 0


def _prunable_paths(params) -> list[str]:
  masks = fj.trees.mask_like(params, fj.trees.prunable_tree(params))
  return [path for path, _ in fj.trees.leaves_with_paths(masks)]


def _fixed_masks(params):
  # Keeps every tenth weight (row-major) of each prunable leaf.
  prunable = fj.trees.prunable_tree(params)
  return jax.tree.map(
      lambda p, s: (jnp.arange(p.size).reshape(p.shape) % 10 == 0)
      if s else None, params, prunable)


def specs() -> dict[str, Spec]:
  """Every registered method at sparsity 0.9, first event at ``EVENT``."""
  periodic = lambda p: dict(sparsity=SPARSITY, every=EVENT)
  dst = lambda p: dict(sparsity=SPARSITY, every=EVENT, end_step=2 * EVENT)
  out = {
      "prune": Spec(lambda p: dict(
          score_fn=fj.scores.magnitude,
          schedule=fj.schedules.one_shot(SPARSITY, EVENT))),
      "flipout": Spec(periodic),
      "global_magnitude": Spec(periodic),
      "random_pruning": Spec(periodic),
      "snip": Spec(lambda p: dict(sparsity=SPARSITY, start_step=EVENT)),
      "fixed_mask": Spec(lambda p: dict(masks=_fixed_masks(p)), event=None),
      "st3": Spec(lambda p: dict(sparsity=SPARSITY, start_step=0,
                                 end_step=EVENT),
                  steady=EVENT // 2, event=None, warm=1),
      "dst": Spec(dst),
      "dst_ee": Spec(dst),
      "rigl": Spec(dst),
      "set_": Spec(dst),
      "gradient_flow": Spec(lambda p: dict(
          measure="gradient_norm_preservation", sparsity=SPARSITY, rounds=2,
          every=EVENT)),
      "grasp": Spec(lambda p: dict(sparsity=SPARSITY, start_step=EVENT)),
      "unipts.sparse_training": Spec(lambda p: dict(
          sparsities={path: SPARSITY for path in _prunable_paths(p)}),
                                     event=None),
      "movement": Spec(lambda p: dict(sparsity=SPARSITY, start_step=EVENT,
                                      end_step=3 * EVENT, every=EVENT),
                       event=2 * EVENT),
  }
  missing = sorted(set(fj.registry.names()) - set(out))
  if missing:
    raise ValueError(f"benchmarks.compile has no Spec for the registered "
                     f"methods {missing}; add one to specs().")
  return out


def _with_count(state, count: int | None):
  if count is None or not isinstance(state, fj.PruneState):
    return state
  return state._replace(count=jnp.asarray(count, state.count.dtype))


def _nbytes(tree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _load() -> str:
  """The machine's load averages (1, 5, 15 min), as printed."""
  return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def _lines(text: str) -> int:
  return text.count("\n") + 1


@dataclasses.dataclass
class Run:
  """One candidate at one depth: what was measured and what is timed."""
  name: str
  init_s: float = float("nan")
  lower_s: float = float("nan")
  compile_s: float = float("nan")
  # Process CPU seconds (all threads) of init, of lowering + compiling the
  # step and of lowering + compiling the update alone: what the work costs
  # whatever else loads the machine.
  init_cpu: float = float("nan")
  compile_cpu: float = float("nan")
  update_compile_cpu: float = float("nan")
  hlo_lines: int = 0
  compiled_lines: int = 0
  state_bytes: int = 0
  step: Any = None
  update: Any = None
  steady_state: Any = None
  event_state: Any = None
  times: dict[str, list[float]] = dataclasses.field(
      default_factory=lambda: {"steady": [], "event": [], "update": []})
  event_changes: int | None = None
  error: str | None = None


def _mask_changes(before, after) -> int:
  """Mask entries an event step flipped (checks that the event ran)."""
  a, b = fj.get_masks(before), fj.get_masks(after)
  return sum(int(jnp.sum(m != n)) for m, n in zip(
      fj.trees.prunable_leaves(a, a), fj.trees.prunable_leaves(a, b)))


def _timed(fn):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def _cpu_timed(fn):
  """``(fn(), wall seconds, process CPU seconds)``."""
  c0 = time.process_time()
  out, wall = _timed(fn)
  return out, wall, time.process_time() - c0


def _gpt(num_layers: int):
  """``(params, x, y, loss_fn, grads)`` of the benchmark's GPT."""
  model = models.get_gpt("gpt_tiny", num_layers=num_layers, vocab_size=1000,
                         d_model=128, num_heads=4, mlp_dim=512, max_len=SEQ)
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.randint(kx, (BATCH, SEQ), 0, model.vocab_size, jnp.int32)
  y = jax.random.randint(ky, (BATCH, SEQ), 0, model.vocab_size, jnp.int32)
  params = jax.jit(model.init)(kp, x)["params"]

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, x, y, loss_fn, jax.jit(jax.grad(loss_fn))(params, x, y)


# Options of a method measured as rows of their own: name -> (method, keywords).
VARIANTS = {"flipout+hash": ("flipout", dict(noise_generator="hash"))}


def _build(name: str, inner, params, **kwargs):
  """``(tx, spec)`` of a candidate (``PLAIN``, a registry name or one of
  :data:`VARIANTS`)."""
  if name == PLAIN:
    return inner, Spec(lambda p: {}, event=None)
  name, options = VARIANTS.get(name, (name, {}))
  spec = specs()[name]
  return fj.registry.build(name, inner, **spec.kwargs(params), **options,
                           **kwargs), spec


def bench_update(num_layers: int, names: list[str], repeats: int) -> None:
  """The optimizer update alone (``--update-only``): no model forward or
  backward, only a jitted ``tx.update`` + ``optax.apply_updates`` on fixed
  gradients, state and params (the state sits between events).

  Every method runs with bool masks and with ``packed_masks=True``, from
  its steady state after ``Spec.warm`` updates; all
  candidates are timed interleaved, round by round, and each call's
  process CPU time (all threads) is recorded; the table gives the median
  CPU ms, its ratio to plain adamw's, and the optimizer-state bytes per
  parameter beyond adamw's (bool / packed masks).
  """
  params, x, y, loss_fn, grads = _gpt(num_layers)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  inner = optax.adamw(1e-3)
  print(f"\n### update only, GPT, {num_layers} blocks: {n_params:,} params, "
        f"{len(_prunable_paths(params))} prunable leaves; adamw(1e-3), "
        f"sparsity {SPARSITY}; median of {repeats} interleaved rounds "
        f"(load average at start {_load()})\n", flush=True)
  inner_bytes = _nbytes(inner.init(params))
  rows = {}  # (name, packed) -> [compiled, state, state bytes, times]
  for name in [PLAIN] + names:
    for packed in ((False,) if name == PLAIN else (False, True)):
      try:
        tx, spec = _build(name, inner, params,
                          **(dict(packed_masks=True) if packed else {}))
        extra = (dict(loss_fn=lambda p: loss_fn(p, x, y))
                 if name in NEEDS_LOSS_FN else {})

        def update(g, s, p, tx=tx, extra=extra):
          updates, s = tx.update(g, s, p, **extra)
          return optax.apply_updates(p, updates), s

        state = _with_count(tx.init(params), spec.steady)
        fn = jax.jit(update).lower(grads, state, params).compile()
        p = params
        for _ in range(spec.warm):
          p, state = fn(grads, state, p)
        jax.block_until_ready(fn(grads, state, p))  # warm-up
        rows[name, packed] = [fn, state, _nbytes(state) - inner_bytes, [], p]
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {name}{' packed' if packed else ''}: failed: "
              f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
              flush=True)
  for _ in range(repeats):
    for row in rows.values():
      fn, state, p = row[0], row[1], row[4]
      c0 = time.process_time()
      jax.block_until_ready(fn(grads, state, p))
      row[3].append(time.process_time() - c0)
  med = {k: statistics.median(r[3]) for k, r in rows.items()}
  base = med.get((PLAIN, False))
  if base is None:
    print("plain adamw failed; no ratios.")
    return
  print(f"plain adamw update: {1e3 * base:.2f} CPU ms; load average at end "
        f"{_load()}\n")
  print("| method | update CPU ms | x plain | packed: CPU ms | x plain | "
        "extra state B/param (bool / packed masks) |")
  print("|---|---:|---:|---:|---:|---:|")
  for name in [PLAIN] + names:
    cells = []
    for packed in (False, True):
      if (name, packed) in med:
        cells += [f"{1e3 * med[name, packed]:.2f}",
                  f"{med[name, packed] / base:.2f}x"]
      else:
        cells += ["-", "-"]
    nbytes = [f"{rows[name, p][2] / n_params:.3f}" for p in (False, True)
              if (name, p) in rows]
    print(f"| {name} | {' | '.join(cells)} | {' / '.join(nbytes)} |",
          flush=True)


def bench_depth(num_layers: int, names: list[str], repeats: int,
                init_only: bool = False) -> None:
  params, x, y, loss_fn, grads = _gpt(num_layers)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  n_prunable = len(_prunable_paths(params))
  inner = optax.adamw(1e-3)
  inner_bytes = _nbytes(inner.init(params))
  print(f"\n### GPT, {num_layers} blocks: {n_params:,} params, {n_prunable} "
        f"prunable leaves; batch {BATCH} x seq {SEQ}, adamw(1e-3), "
        f"sparsity {SPARSITY}, first event at step {EVENT}; median of "
        f"{repeats} (load average at start "
        f"{_load()})\n", flush=True)

  runs = []
  for name in [PLAIN] + names:
    run = Run(name)
    runs.append(run)
    try:
      tx, spec = _build(name, inner, params)
      if name in NEEDS_LOSS_FN:
        extra = lambda x, y: dict(loss_fn=lambda p: loss_fn(p, x, y))
      else:
        extra = lambda x, y: {}

      jax.clear_caches()
      state, run.init_s, run.init_cpu = _cpu_timed(lambda: tx.init(params))
      run.state_bytes = _nbytes(state) - inner_bytes
      if init_only:
        print(f"  {name}: init {run.init_s:.2f} s ({run.init_cpu:.2f} CPU s)",
              flush=True)
        continue

      def step(p, s, x, y, tx=tx, extra=extra):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = tx.update(g, s, p, **extra(x, y))
        return optax.apply_updates(p, updates), s, loss

      def update(g, s, p, tx=tx, extra=extra):
        updates, s = tx.update(g, s, p, **extra(x, y))
        return optax.apply_updates(p, updates), s

      run.steady_state = _with_count(state, spec.steady)
      run.event_state = (None if spec.event is None
                         else _with_count(state, spec.event))
      jax.clear_caches()
      c0 = time.process_time()
      lowered, run.lower_s = _timed(
          lambda: jax.jit(step).lower(params, run.steady_state, x, y))
      run.step, run.compile_s = _timed(lowered.compile)
      run.compile_cpu = time.process_time() - c0
      run.hlo_lines = _lines(lowered.as_text())
      run.compiled_lines = _lines(run.step.as_text())
      jax.clear_caches()
      run.update, _, run.update_compile_cpu = _cpu_timed(
          lambda: jax.jit(update).lower(grads, run.steady_state,
                                        params).compile())
      # Warm-up calls (first executions allocate).
      jax.block_until_ready(run.step(params, run.steady_state, x, y))
      if run.event_state is not None:
        after = jax.block_until_ready(
            run.step(params, run.event_state, x, y))[1]
        run.event_changes = _mask_changes(run.event_state, after)
      jax.block_until_ready(run.update(grads, run.steady_state, params))
    except Exception as e:  # pylint: disable=broad-except
      run.error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if init_only:
      if run.error:
        print(f"  {name}: failed: {run.error}", flush=True)
      continue
    status = (f"failed: {run.error}" if run.error else
              f"init {run.init_s:.2f} s, lower {run.lower_s:.2f} s, "
              f"compile {run.compile_s:.2f} s")
    print(f"  {name}: {status}", flush=True)

  if init_only:
    return
  ok = [r for r in runs if r.error is None]
  for _ in range(repeats):
    for r in ok:
      _, t = _timed(lambda: r.step(params, r.steady_state, x, y))
      r.times["steady"].append(t)
      if r.event_state is not None:
        _, t = _timed(lambda: r.step(params, r.event_state, x, y))
        r.times["event"].append(t)
      _, t = _timed(lambda: r.update(grads, r.steady_state, params))
      r.times["update"].append(t)

  base = runs[0]
  if base.error is not None:
    print(f"plain adamw failed ({base.error}); no ratios.")
    return
  med = lambda r, k: statistics.median(r.times[k]) if r.times[k] else None
  base_compile = base.lower_s + base.compile_s
  base_steady, base_update = med(base, "steady"), med(base, "update")
  print(f"\nplain adamw: compile {base_compile:.2f} s, steady step "
        f"{1e3 * base_steady:.2f} ms, update only {1e3 * base_update:.2f} ms; "
        f"load average at end "
        f"{_load()}\n")
  print("| method | compile s (lower + compile) | x plain | compile CPU s | "
        "x plain (CPU) | update compile CPU s (x plain) | HLO lines "
        "(lowered / compiled) | init s (CPU s) | steady x | event x (masks "
        "flipped) | update x | extra state B/param |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in runs:
    if r.error is not None:
      print(f"| {r.name} | failed: {r.error} | | | | | | | | | | |")
      continue
    total = r.lower_s + r.compile_s
    ev = med(r, "event")
    ev_s = ("-" if ev is None else
            f"{ev / base_steady:.2f}x ({r.event_changes:,})")
    print(f"| {r.name} | {total:.2f} ({r.lower_s:.2f} + {r.compile_s:.2f}) | "
          f"{total / base_compile:.2f}x | {r.compile_cpu:.2f} | "
          f"{r.compile_cpu / base.compile_cpu:.2f}x | "
          f"{r.update_compile_cpu:.2f} "
          f"({r.update_compile_cpu / base.update_compile_cpu:.2f}x) | "
          f"{r.hlo_lines:,} / {r.compiled_lines:,} | "
          f"{r.init_s:.2f} ({r.init_cpu:.2f}) | "
          f"{med(r, 'steady') / base_steady:.2f}x | {ev_s} | "
          f"{med(r, 'update') / base_update:.2f}x | "
          f"{r.state_bytes / n_params:.2f} |", flush=True)


def _parse_blocks(text: str) -> list[int]:
  try:
    blocks = [int(b) for b in text.split(",")]
  except ValueError:
    raise SystemExit(f"--blocks: expected comma-separated ints, got {text!r}")
  if not blocks or min(blocks) < 1:
    raise SystemExit(f"--blocks: every depth must be >= 1, got {text!r}")
  return blocks


def _parse_methods(text: str) -> list[str]:
  valid = fj.registry.names() + tuple(VARIANTS)
  if text == "all":
    return list(valid)
  names = [n for n in text.split(",") if n]
  unknown = [n for n in names if n not in valid]
  if unknown or not names:
    raise SystemExit(f"--methods: unknown {unknown or text!r}; valid: all or "
                     f"a comma-separated list of {', '.join(valid)}")
  return names


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--blocks", default="4,12,24",
                      help="comma-separated depths (default 4,12,24)")
  parser.add_argument("--methods", default="all",
                      help="'all' or comma-separated fj.registry names")
  parser.add_argument("--repeats", type=int, default=20,
                      help="interleaved timing rounds (default 20)")
  parser.add_argument("--init-only", action="store_true",
                      help="measure only the first tx.init of each method")
  parser.add_argument("--update-only", action="store_true",
                      help="time only the optimizer update (no model), "
                      "bool and packed masks")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    raise SystemExit(f"--repeats: must be >= 1, got {args.repeats}")
  blocks, names = _parse_blocks(args.blocks), _parse_methods(args.methods)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s), {os.cpu_count()} CPU(s); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if args.init_only and args.update_only:
    raise SystemExit("--init-only, --update-only: give at most one")
  for num_layers in blocks:
    if args.update_only:
      bench_update(num_layers, names, args.repeats)
    else:
      bench_depth(num_layers, names, args.repeats, args.init_only)


if __name__ == "__main__":
  main()
