"""Data- and model-parallel pruning with ``jax.sharding``, on one host or many.

The transformations of flipout_jax are plain optax transformations, so they
run under JAX's own SPMD partitioner: shard the params and the batch with
``NamedSharding`` over a device mesh, call ``tx.init`` on the sharded params
and ``jax.jit`` the train step. Masks, flip counts, coverage counts and the
inner optimizer's moments are sharded like the params; the global top-k of a
pruning event counts on each device's shards and all-reduces only counts.

One process, 8 simulated CPU devices (a 2 x 4 "data" x "model" mesh)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m examples.sharded_train --method flipout

Two processes ("hosts") with 4 CPU devices each, joined by
``jax.distributed.initialize`` (what runs on every host of a TPU pod or GPU
cluster; there the device count comes from the hardware)::

    for i in 0 1; do
      XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
          python -m examples.sharded_train --method flipout \\
          --coordinator 127.0.0.1:12345 --num_processes 2 --process_id $i &
    done; wait

``tests/test_sharding.py`` runs this module in subprocesses and checks that
the sharded runs reach the same masks and params as a single-device run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import flipout_jax as fj

SIZES = (16, 32, 24, 8)  # a tiny MLP; every width divides by the model axis
BATCH = 40  # 20 rows per data shard: no activation has a kernel's shape
STEPS = 30
METHODS = ("flipout", "dst_ee")


# ---------------------------------------------------------------------------
# Model, data and optimizer: plain JAX, identical on every process.


def init_params(seed: int = 0) -> dict[str, Any]:
  """Host (NumPy) params, so every process builds the same values."""
  rng = np.random.default_rng(seed)
  return {f"dense{i}": {
      "kernel": (rng.standard_normal((a, b)) / math.sqrt(a)).astype(np.float32),
      "bias": np.zeros((b,), np.float32)}
          for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))}


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
  """The global batch of a step (host NumPy; a learnable teacher's labels)."""
  teacher = np.random.default_rng(1234).standard_normal((SIZES[0], SIZES[-1]))
  x = np.random.default_rng(step).standard_normal((BATCH, SIZES[0]))
  y = np.argmax(x @ teacher, axis=-1)
  return x.astype(np.float32), y.astype(np.int32)


def loss_fn(params, x, y):
  h = x
  for i in range(len(params)):
    h = h @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def make_tx(method: str, **kwargs):
  """The method's transformation; ``kwargs`` (e.g. ``packed_masks=True``)
  go to its constructor."""
  if method == "flipout":  # gradient noise on; events at steps 5, 10, ...
    return fj.flipout(optax.sgd(0.05, momentum=0.9), sparsity=0.9,
                      every=5, noise_scale=1.0, seed=3, **kwargs)
  if method == "dst_ee":  # random sparse start, drop-and-grow every 5 steps
    return fj.dst_ee(optax.adam(1e-2), sparsity=0.8, every=5,
                     end_step=25, exploration=1e-3, seed=3, **kwargs)
  raise ValueError(f"method: unknown value {method!r}; valid: {METHODS}.")


def train_step(tx, params, state, x, y):
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


# ---------------------------------------------------------------------------
# Sharding: which axis of which array goes where.


def param_spec(leaf):
  """Kernels ``(in, out)`` split on ``out`` over "model"; biases likewise."""
  return P(None, "model") if np.ndim(leaf) == 2 else P("model")


def fsdp_param_spec(leaf):
  """FSDP + tensor parallelism: kernels split on ``in`` over "data" (each
  data-parallel replica holds a slice of every weight) and on ``out`` over
  "model"; biases on "model"."""
  return P("data", "model") if np.ndim(leaf) == 2 else P("model")


def make_mesh(data: int, model: int, explicit: bool = False):
  """A ("data", "model") mesh over all devices of all processes."""
  axis_type = (jax.sharding.AxisType.Explicit if explicit
               else jax.sharding.AxisType.Auto)  # Auto: classic GSPMD
  return jax.make_mesh((data, model), ("data", "model"),
                       axis_types=(axis_type, axis_type))


def to_global(tree, mesh, spec_fn):
  """Host arrays -> global ``jax.Array``s sharded over ``mesh``.

  ``make_array_from_callback`` asks each process only for the shards of its
  own devices, so this is also how each host feeds its part of the batch.
  """

  def put(a):
    sharding = NamedSharding(mesh, spec_fn(a))
    return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

  return jax.tree.map(put, tree)


def batch_spec(a):
  return P("data", *([None] * (np.ndim(a) - 1)))


def host_batch(global_batch, mesh):
  """Global batch arrays from this host's rows only.

  A real input pipeline loads just this host's rows (``global batch /
  hosts`` of them); here every host slices them from the same global batch.
  ``make_array_from_process_local_data`` assembles the global array.
  """

  def put(a):
    sharding = NamedSharding(mesh, batch_spec(a))
    rows = [idx[0].indices(a.shape[0]) for idx in
            sharding.addressable_devices_indices_map(a.shape).values()]
    lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
    return jax.make_array_from_process_local_data(sharding, a[lo:hi], a.shape)

  return jax.tree.map(put, global_batch)


def train(method: str, mesh=None, steps: int = STEPS, jit_init: bool = False,
          spec_fn=param_spec):
  """Runs ``steps`` steps; sharded over ``mesh`` if given, else one device.

  ``spec_fn(leaf) -> PartitionSpec`` places the params on ``mesh``.

  Returns:
    ``(params, state, losses, step_fn, args)`` with ``step_fn`` the jitted
    step and ``args`` a valid argument tuple for lowering it.
  """
  tx = make_tx(method)
  step_fn = jax.jit(functools.partial(train_step, tx))
  if mesh is None:
    params = jax.tree.map(jnp.asarray, init_params())
    shard_batch = lambda b: jax.tree.map(jnp.asarray, b)
  else:
    params = to_global(init_params(), mesh, spec_fn)
    shard_batch = lambda b: host_batch(b, mesh)
  # On sharded params, init gives every per-weight buffer (masks, counts,
  # moments) the sharding of its weight, eagerly or under jit.
  state = jax.jit(tx.init)(params) if jit_init else tx.init(params)
  losses = []
  args = None
  for t in range(steps):
    x, y = shard_batch(batch(t))
    if args is None:
      args = (params, state, x, y)
    params, state, loss = step_fn(params, state, x, y)
    losses.append(loss)
  return params, state, losses, step_fn, args


# ---------------------------------------------------------------------------
# Inspection helpers (used by tests/test_sharding.py).


def spec_of(leaf) -> str:
  sharding = leaf.sharding
  spec = getattr(sharding, "spec", None)
  if spec is None:
    return "replicated" if sharding.is_fully_replicated else repr(sharding)
  # Normalise trailing Nones: P(None, None) and P() are the same placement.
  parts = list(spec) + [None] * (np.ndim(leaf) - len(spec))
  return str(tuple(parts))


def state_shardings(params, state) -> dict[str, Any]:
  """Path -> sharding spec of every state and param leaf (for reports)."""
  out = {}
  for name, tree in (("params", params), ("state", state)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[name + jax.tree_util.keystr(path)] = spec_of(leaf)
  return out


def collectives(hlo: str) -> list[dict[str, Any]]:
  """The collective ops of a compiled HLO module, with their result shapes."""
  found = []
  pattern = re.compile(
      r"=\s*(\(?[a-z0-9]+\[[^\]]*\][^=]*?)\s+"
      r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
      r"(-start)?\(")
  for line in hlo.splitlines():
    line = re.sub(r"/\*.*?\*/", "", line)  # e.g. /*index=5*/ in tuples
    m = pattern.search(line)
    if m:
      shapes = re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", m.group(1))
      dims = [[int(d) for d in s.split(",") if d] for _, s in shapes]
      op_name = re.search(r'op_name="([^"]*)"', line)
      groups = re.search(r"replica_groups=(\S+)", line)
      found.append({"op": m.group(2), "types": [t for t, _ in shapes],
                    "shapes": dims,
                    "replica_groups": groups.group(1) if groups else "",
                    "op_name": op_name.group(1) if op_name else ""})
  return found


def to_host(tree):
  """Global arrays -> NumPy on every process (gathers across hosts)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return jax.tree.map(
      lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)),
      tree)


def flat_arrays(prefix: str, tree) -> dict[str, np.ndarray]:
  return {prefix + jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------
# Command line: one process of a (possibly multi-process) sharded run.


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", choices=METHODS, action="append")
  parser.add_argument("--data", type=int, default=2, help="data-axis size")
  parser.add_argument("--model", type=int, default=4, help="model-axis size")
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--coordinator", default=None,
                      help="host:port of process 0 (multi-process runs)")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--jit_init", action="store_true",
                      help="build the state with jax.jit(tx.init)")
  parser.add_argument("--hlo", action="store_true",
                      help="report the collectives of the compiled step")
  parser.add_argument("--out", default=None,
                      help="write masks/params/shardings here (.npz)")
  args = parser.parse_args(argv)

  if args.coordinator:
    # CPU collectives across processes go through gloo (TCP); on GPUs and
    # TPUs the platform's own collectives are used and this is not needed.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id,
                               initialization_timeout=60)

  mesh = make_mesh(args.data, args.model)
  arrays, report = {}, {"process_index": jax.process_index(),
                        "process_count": jax.process_count(),
                        "device_count": jax.device_count(),
                        "local_device_count": jax.local_device_count(),
                        # which process owns each device of the mesh
                        "mesh_processes": [[d.process_index for d in row]
                                           for row in mesh.devices],
                        "methods": {}}
  for method in args.method or ["flipout"]:
    start = time.perf_counter()
    with jax.set_mesh(mesh):
      params, state, losses, step_fn, step_args = train(
          method, mesh, args.steps, jit_init=args.jit_init)
    info = {"shardings": state_shardings(params, state),
            "loss_first": float(to_host(losses[0])),
            "loss_last": float(to_host(losses[-1]))}
    if args.hlo:
      with jax.set_mesh(mesh):
        hlo = step_fn.lower(*step_args).compile().as_text()
      info["collectives"] = collectives(hlo)
    masks = fj.get_masks(state)
    arrays.update(flat_arrays(f"{method}/masks", to_host(masks)))
    arrays.update(flat_arrays(f"{method}/params", to_host(params)))
    arrays.update(flat_arrays(f"{method}/method_state",
                              to_host(state.method_state)))
    info["seconds"] = time.perf_counter() - start
    report["methods"][method] = info
    alive = sum(int(m.sum()) for m in jax.tree.leaves(to_host(masks)))
    if jax.process_index() == 0:
      print(f"{method}: {args.steps} steps on {jax.device_count()} devices "
            f"({jax.process_count()} processes), loss "
            f"{info['loss_first']:.3f} -> {info['loss_last']:.3f}, "
            f"{alive} weights alive, {info['seconds']:.1f}s", flush=True)
  if args.out and jax.process_index() == 0:
    np.savez(args.out, report=json.dumps(report), **arrays)
  if args.coordinator:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
