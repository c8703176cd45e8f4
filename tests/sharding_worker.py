"""The 8-device half of tests/test_sharding.py, run in its own process.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tests/sharding_worker.py OUT.npz

The device count of a JAX process is fixed when its backend starts, so the
test runs this script in a subprocess. It only *measures*: it trains the
example of ``examples/sharded_train.py`` on one device and sharded over a
2 x 4 ("data", "model") mesh, inspects shardings and the compiled HLO, and
writes everything to ``OUT.npz`` (arrays plus a JSON report); the test makes
the assertions, so a failure shows there with the numbers.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from examples import sharded_train as st  # pylint: disable=g-import-not-at-top,wrong-import-position
import flipout_jax as fj  # pylint: disable=g-import-not-at-top,wrong-import-position

MESH = (2, 4)
# Elementwise-gradient runs: DST-EE, and FlipOut without gradient noise (the
# noise's std is a float sum over each tensor, hence over shards).
SYNTHETIC = ("dst_ee", "flipout_no_noise")


def synthetic_targets(t):
  """Per-step targets of a loss with elementwise gradients (see below)."""
  rng = np.random.default_rng(100 + t)
  return jax.tree.map(
      lambda p: rng.standard_normal(np.shape(p)).astype(np.float32),
      st.init_params())


def synthetic_loss(params, targets):
  # ∂/∂θ = θ − target: every gradient entry is computed from its own entry,
  # so no floating-point sum crosses shards and the gradients are bitwise the
  # same sharded or not. What remains is the transformation itself.
  return sum(0.5 * jnp.sum((p - t) ** 2) for p, t in
             zip(jax.tree.leaves(params), jax.tree.leaves(targets)))


def synthetic_step(tx, params, state, targets):
  grads = jax.grad(synthetic_loss)(params, targets)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def synthetic_train(tx, mesh=None, steps=st.STEPS, spec_fn=st.param_spec,
                    step=None):
  """``steps`` jitted steps of ``tx`` (``step``: that jitted step, if the
  caller lowers it afterwards: the same jit object reuses its executable)."""
  step = step or jax.jit(functools.partial(synthetic_step, tx))
  if mesh is None:
    put = lambda tree: jax.tree.map(jnp.asarray, tree)
  else:
    put = lambda tree: st.to_global(tree, mesh, spec_fn)
  params = put(st.init_params())
  state = tx.init(params)
  for t in range(steps):
    params, state = step(params, state, put(synthetic_targets(t)))
  return params, state


def every_method_tx():
  """Every transformation of the library, with events inside 12 steps."""
  sgd = optax.sgd(0.05, momentum=0.9)
  layer_sparsity = {f"dense{i}/kernel": s for i, s in enumerate((0.5, 0.7, 0.9))}
  return {
      "global_magnitude": fj.global_magnitude(sgd, sparsity=0.9, every=4),
      "random_pruning": fj.random_pruning(sgd, sparsity=0.9, every=4, seed=2),
      "snip": fj.snip(sgd, sparsity=0.9, start_step=2),
      "gradient_flow": fj.gradient_flow(sgd, measure="loss_preservation",
                                        sparsity=0.9, rounds=2,
                                        every=4),
      "st3": fj.st3(sgd, sparsity=0.9, start_step=0, end_step=8),
      "st3_sigma": fj.st3(sgd, sparsity=0.9, start_step=0, end_step=8,
                          sigma_normalized=True, freeze_step=10),
      "rigl": fj.rigl(sgd, sparsity=0.8, every=4, end_step=10, seed=2),
      "set": fj.set_(sgd, sparsity=0.8, every=4, end_step=10, seed=2),
      "nm_magnitude": fj.global_magnitude(
          sgd, sparsity=0.5, start_step=2, end_step=6,
          structure=fj.n_m(2, 4)),
      "nm_flipout": fj.flipout(sgd, sparsity=0.5, start_step=2, end_step=6,
                               noise_scale=0.0, structure=fj.n_m(2, 4)),
      "nm_st3": fj.st3(sgd, sparsity=0.5, start_step=0, end_step=8,
                       structure=fj.n_m(2, 4)),
      "nm_dst": fj.rigl(sgd, sparsity=0.5, every=4, end_step=10,
                        structure=fj.n_m(2, 4), seed=2),
      "unipts": fj.unipts.sparse_training(sgd, sparsities=layer_sparsity),
  }


def synthetic_tx(name, **kwargs):
  if name == "flipout_no_noise":
    return fj.flipout(optax.sgd(0.05, momentum=0.9), sparsity=0.9,
                      every=5, noise_scale=0.0, seed=3, **kwargs)
  return st.make_tx(name, **kwargs)


def save_run(arrays, prefix, params, state):
  arrays.update(st.flat_arrays(f"{prefix}/params", st.to_host(params)))
  arrays.update(st.flat_arrays(f"{prefix}/masks",
                               st.to_host(fj.get_masks(state))))
  arrays.update(st.flat_arrays(f"{prefix}/method_state",
                               st.to_host(state.method_state)))
  arrays.update(st.flat_arrays(f"{prefix}/inner_state",
                               st.to_host(state.inner_state)))


def u32_sizes(hlo):
  return [int(np.prod([int(d) for d in dims.split(",") if d]))
          for dims in re.findall(r"\bu32\[([0-9,]*)\]", hlo)]


def main(out):
  report = {"device_count": jax.device_count(),
            "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
            "jax": jax.__version__, "timings": {}}
  arrays = {}
  mesh = st.make_mesh(*MESH)

  def timed(name, start):
    report["timings"][name] = round(time.perf_counter() - start, 2)
    report["timings"][name + " (cpu)"] = round(time.process_time(), 2)

  # 1. The MLP example: single device vs data- and model-parallel. The
  #    sharded state comes from jax.jit(tx.init) (the eager path is the one
  #    the multi-host processes take).
  for method in st.METHODS:
    start = time.perf_counter()
    params, state, losses, _, _ = st.train(method, jit_init=True)
    save_run(arrays, f"mlp/{method}/single", params, state)
    with jax.set_mesh(mesh):
      params, state, losses, step_fn, args = st.train(method, mesh,
                                                      jit_init=True)
      hlo = step_fn.lower(*args).compile().as_text()  # cached, no recompile
    save_run(arrays, f"mlp/{method}/sharded", params, state)
    report[f"mlp/{method}"] = {
        "shardings": st.state_shardings(params, state),
        "init_shardings": st.state_shardings(args[0], args[1]),
        "collectives": st.collectives(hlo),
        "loss_first": float(losses[0]), "loss_last": float(losses[-1])}
    timed(f"mlp/{method}", start)

  # 2. Elementwise-gradient runs: is the transformation bitwise invariant?
  start = time.perf_counter()
  for name in SYNTHETIC:
    tx = synthetic_tx(name)
    params, state = synthetic_train(tx)
    save_run(arrays, f"synthetic/{name}/single", params, state)
    with jax.set_mesh(mesh):
      params, state = synthetic_train(tx, mesh)
    save_run(arrays, f"synthetic/{name}/sharded", params, state)
  timed("synthetic", start)

  # 3. Random bits do not depend on the sharding (threefry partitionable),
  #    and each device draws only its shard's words.
  start = time.perf_counter()
  key = jax.random.PRNGKey(11)
  shape = (16, 32)
  draws = {
      "normal16": lambda k: fj.noise.normal16(k, shape),
      "normal16 hash": lambda k: fj.noise.normal16(k, shape, "hash"),
      "random.normal": lambda k: jax.random.normal(k, shape),
      "random.uniform": lambda k: jax.random.uniform(k, shape),
  }
  rng_report = {}
  for name, fn in draws.items():
    single = np.asarray(jax.jit(fn)(key))
    for spec in (P("data", "model"), P("model", None)):
      sharding = NamedSharding(mesh, spec)
      compiled = jax.jit(fn, out_shardings=sharding).lower(key).compile()
      sharded = np.asarray(compiled(key))
      entry = {"bit_equal": bool(np.array_equal(single.view(np.uint32),
                                                sharded.view(np.uint32)))}
      if name.startswith("normal16"):
        entry["max_u32_elements"] = max(u32_sizes(compiled.as_text()) or [0])
        entry["shard_elements"] = int(np.prod(sharding.shard_shape(shape)))
      rng_report[f"{name} {spec}"] = entry
  report["rng"] = rng_report
  timed("rng", start)

  # 4. Explicit-axes mesh (jax.make_mesh's default; sharding in the types).
  start = time.perf_counter()
  emesh = st.make_mesh(*MESH, explicit=True)
  explicit = {}
  with jax.set_mesh(emesh):
    params = st.to_global(st.init_params(), emesh, st.param_spec)
    tx = st.make_tx("dst_ee")
    state = jax.jit(tx.init)(params)
    explicit["jit_init/dst_ee"] = st.state_shardings(params, state)
    try:
      step = jax.jit(functools.partial(synthetic_step, tx))
      for t in range(st.STEPS):
        params, state = step(params, state,
                             st.to_global(synthetic_targets(t), emesh,
                                          st.param_spec))
      save_run(arrays, "explicit/dst_ee/sharded", params, state)
      explicit["update_error"] = None
    except Exception as e:  # pylint: disable=broad-except
      frames = [f for f in traceback.extract_tb(e.__traceback__)
                if "flipout_jax" in f.filename]
      explicit["update_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
      explicit["update_error_at"] = [
          f"{os.path.relpath(f.filename)}:{f.lineno}: {f.line}" for f in frames]
  report["explicit"] = explicit
  timed("explicit", start)

  # 5. FSDP + tensor parallelism: kernels sharded on both axes, with blocks
  #    so small that the selection streams every kernel in strided blocks
  #    (each device scans its own shards; nothing may be gathered).
  start = time.perf_counter()
  fj.selection._CHUNK = 16  # pylint: disable=protected-access
  for method in st.METHODS:
    with jax.set_mesh(mesh):
      params, state, losses, step_fn, args = st.train(
          method, mesh, jit_init=True, spec_fn=st.fsdp_param_spec)
      hlo = step_fn.lower(*args).compile().as_text()
    save_run(arrays, f"fsdp/{method}/sharded", params, state)
    report[f"fsdp/{method}"] = {
        "shardings": st.state_shardings(params, state),
        "collectives": st.collectives(hlo),
        "blocking": list(fj.selection._blocking()),  # pylint: disable=protected-access
        "loss_first": float(losses[0]), "loss_last": float(losses[-1])}
  # The same on an explicit-axes mesh (elementwise gradients: bitwise).
  with jax.set_mesh(emesh):
    params, state = synthetic_train(synthetic_tx("dst_ee"), emesh,
                                    spec_fn=st.fsdp_param_spec)
  save_run(arrays, "fsdp_explicit/dst_ee/sharded", params, state)
  report["fsdp_explicit/dst_ee"] = {
      "shardings": st.state_shardings(params, state)}
  timed("fsdp", start)

  # 6. Every transformation, FSDP + tensor-parallel, still streamed: with
  #    elementwise gradients the sharded run is bitwise the single-device one.
  start = time.perf_counter()
  every = {}
  for name, tx in every_method_tx().items():
    single = synthetic_train(tx, steps=12)
    with jax.set_mesh(mesh):
      sharded = synthetic_train(tx, mesh, steps=12, spec_fn=st.fsdp_param_spec)
    a = jax.tree.leaves(st.to_host(single))
    b = jax.tree.leaves(st.to_host(sharded))
    masks = [jax.tree.leaves(st.to_host(fj.get_masks(run[1])))
             for run in (single, sharded)]
    every[name] = {
        "bit_equal": len(a) == len(b) and all(
            x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b)),
        "masks_equal": all(np.array_equal(x, y) for x, y in zip(*masks)),
        "max_abs_diff": max(float(np.max(np.abs(x.astype(np.float64) - y)))
                            for x, y in zip(a, b) if x.size),
        "sparsity": 1.0 - sum(int(np.sum(m)) for m in masks[1]) / sum(
            m.size for m in masks[1]),
        "shardings": st.state_shardings(*sharded)}
  report["every_method"] = every
  timed("every_method", start)

  # 7. Packed masks: the bits keep their param's sharding (they pack along
  #    an unsharded axis), nothing is gathered, and the run is the bool-mask
  #    run's bit for bit (elementwise gradients).
  start = time.perf_counter()
  packed = {}
  for name in SYNTHETIC:
    tx = synthetic_tx(name, packed_masks=True)
    step = jax.jit(functools.partial(synthetic_step, tx))
    with jax.set_mesh(mesh):
      params, state = synthetic_train(tx, mesh, step=step)
      hlo = step.lower(  # the loop's steady-state program: cached
          params, state, st.to_global(synthetic_targets(0), mesh,
                                      st.param_spec)).compile().as_text()
    save_run(arrays, f"packed/{name}/sharded", params, state)
    bits = [(fj.trees.path_str(p), leaf) for p, leaf in
            jax.tree_util.tree_flatten_with_path(state.masks)[0]]
    packed[name] = {
        "bits": {path: {"spec": st.spec_of(leaf), "dtype": str(leaf.dtype),
                        "shape": list(leaf.shape)} for path, leaf in bits},
        "collectives": st.collectives(hlo)}
  report["packed"] = packed
  timed("packed", start)

  np.savez(out, report=json.dumps(report), **arrays)


if __name__ == "__main__":
  main(sys.argv[1])
