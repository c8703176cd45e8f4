"""The multi-device half of tests/test_post_training.py's sharding test.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python tests/post_training_sharding_worker.py OUT.npz

Runs ``fj.post_training.prune`` on a small MLP twice, on one device and on a
2 x 2 ("data", "model") mesh: the calibration batch sharded over "data",
every kernel over its output units ("model", bias too), and writes the
masks and kernels of both, the shardings of the results, and the
collectives of the compiled layer statistics and solves; then the same runs
and collectives on a mesh of explicit axes (``AxisType.Explicit``, the
shardings in the types), to ``OUT.npz`` (arrays plus a JSON report); the
test asserts.
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import flipout_jax as fj  # pylint: disable=g-import-not-at-top,wrong-import-position
from flipout_jax.post_training import capture  # pylint: disable=g-import-not-at-top,wrong-import-position
from flipout_jax.post_training import solvers  # pylint: disable=g-import-not-at-top,wrong-import-position

# name -> prune keywords
RUNS = {
    "magnitude": dict(method="magnitude", sparsity=0.6),
    "magnitude_2_4": dict(method="magnitude", sparsity=None,
                          structure=fj.n_m(2, 4)),
    "wanda": dict(method="wanda", sparsity=0.6),
    "wanda_2_4": dict(method="wanda", sparsity=None, structure=fj.n_m(2, 4)),
    "wanda_owl": dict(method="wanda", sparsity=0.6, allocation="owl"),
    # 64 = 25 + 25 + 14: on explicit axes the 25s are replicated along the
    # batch (2 does not divide them), the 14 stays sharded.
    "wanda_owl_batched": dict(method="wanda", sparsity=0.6, allocation="owl",
                              batch_size=25),
    "sparsegpt": dict(method="sparsegpt", sparsity=0.6, block_size=8),
    "sparsegpt_batched": dict(method="sparsegpt", sparsity=0.6, block_size=8,
                              batch_size=16),
    "sparsegpt_2_4": dict(method="sparsegpt", sparsity=None,
                          structure=fj.n_m(2, 4), block_size=8),
}
# Explicit-axes meshes: every run above.
EXPLICIT = tuple(RUNS)
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute",
               "reduce-scatter")


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="a")(x))
    x = nn.relu(nn.Dense(24, name="b")(x))
    return nn.Dense(8, name="c")(x)


class Seq(nn.Module):
  """Dense layers on ``[batch, seq, features]`` after a 1-D conv: inputs
  whose rows merge a sharded batch with other axes."""
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3,), name="conv")(x))
    x = nn.relu(nn.Dense(16, name="a")(x))
    return nn.Dense(8, name="b")(x)


def collectives(hlo: str) -> list[str]:
  """``"op shape"`` of each collective of a compiled module."""
  out = []
  for line in hlo.splitlines():
    for op in COLLECTIVES:
      m = re.search(rf"= (.+?) {op}(-start)?\(", line)
      if m:
        out.append(f"{op} {m.group(1)}")
  return out


def main(out):
  report = {"device_count": jax.device_count()}
  auto = jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(auto, auto))
  r = np.random.default_rng(0)
  x = (r.normal(size=(64, 16)) * np.exp(r.normal(size=16))).astype(np.float32)
  net = MLP()
  v = net.init(jax.random.PRNGKey(0), x[:1])
  spec = lambda path, leaf: P(None, "model") if leaf.ndim == 2 else P("model")
  sharded_v = {"params": jax.tree_util.tree_map_with_path(
      lambda p, a: jax.device_put(a, NamedSharding(mesh, spec(p, a))),
      v["params"])}
  sharded_x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  arrays = {}
  report["result_specs"] = {}
  for name, kw in RUNS.items():
    for where, (vv, xx) in (("single", (v, x)),
                            ("sharded", (sharded_v, sharded_x))):
      res = fj.post_training.prune(net.apply, vv, xx, **kw)
      for path, leaf in fj.trees.leaves_with_paths(res.variables["params"]):
        arrays[f"{name}/{where}/params/{path}"] = np.asarray(leaf)
        if where == "sharded" and path.endswith("kernel"):
          report["result_specs"][f"{name}/{path}"] = str(leaf.sharding.spec)
      for path, m in fj.trees.leaves_with_paths(res.masks):
        if m is not None:
          arrays[f"{name}/{where}/masks/{path}"] = np.asarray(m)

  # Explicit mesh axes (shardings in the types): the methods that run there.
  explicit = jax.sharding.AxisType.Explicit
  emesh = jax.make_mesh((2, 2), ("data", "model"),
                        axis_types=(explicit, explicit))
  ev = {"params": jax.tree.map(
      lambda a: jax.device_put(a, NamedSharding(emesh, spec(None, a))),
      v["params"])}
  ex = jax.device_put(x, NamedSharding(emesh, P("data", None)))
  for name in EXPLICIT:
    with jax.set_mesh(emesh):
      res = fj.post_training.prune(net.apply, ev, ex, **RUNS[name])
    for path, leaf in fj.trees.leaves_with_paths(res.variables["params"]):
      arrays[f"{name}/explicit/params/{path}"] = np.asarray(leaf)
      if path.endswith("kernel"):
        report["result_specs"][f"{name}/explicit/{path}"] = str(
            leaf.sharding.spec)
    for path, m in fj.trees.leaves_with_paths(res.masks):
      if m is not None:
        arrays[f"{name}/explicit/masks/{path}"] = np.asarray(m)

  # A sequence model on explicit axes, 2:4 Wanda in batches of 8: the
  # conv kernel replicated (Flax's conv takes no output-sharded kernel on
  # explicit axes), the Dense kernels over "model".
  xs = r.normal(size=(16, 6, 8)).astype(np.float32)
  seq = Seq()
  sv = seq.init(jax.random.PRNGKey(1), xs[:1])
  esv = {"params": jax.tree.map(lambda a: jax.device_put(a, NamedSharding(
      emesh, P(None, "model") if a.ndim == 2 else P())), sv["params"])}
  kw = dict(method="wanda", sparsity=None, structure=fj.n_m(2, 4),
            batch_size=8)
  for where, (vv, xx) in (("single", (sv, xs)), ("explicit", (
      esv, jax.device_put(xs, NamedSharding(emesh, P("data")))))):
    with jax.set_mesh(emesh):
      res = fj.post_training.prune(seq.apply, vv, xx, **kw)
    for path, leaf in fj.trees.leaves_with_paths(res.variables["params"]):
      arrays[f"seq/{where}/params/{path}"] = np.asarray(leaf)
      if where == "explicit":
        report["result_specs"][f"seq/{path}"] = str(jax.typeof(leaf))
    for path, m in fj.trees.leaves_with_paths(res.masks):
      if m is not None:
        arrays[f"seq/{where}/masks/{path}"] = np.asarray(m)

  # The statistics of layer b (input 32 = a's outputs, sharded over "model"
  # as they come out of a) and the SparseGPT solve of its kernel.
  params = sharded_v["params"]
  paths = [p for p, _ in fj.trees.leaves_with_paths(params)]
  fn = lambda p, xb: net.apply({"params": p}, xb)
  stats = capture.Model(fn, params, paths).statistics(["b/kernel"], gram=True)
  compiled = stats.program.lower(jax.tree.leaves(params), sharded_x,
                                 0).compile()
  report["stats_collectives"] = collectives(compiled.as_text())
  _, sq, gram = stats(params, [sharded_x], "b/kernel")
  report["gram_spec"] = str(gram.sharding.spec)
  report["gram_replicated"] = bool(gram.sharding.is_fully_replicated)
  report["sq_replicated"] = bool(sq.sharding.is_fully_replicated)
  w = params["b"]["kernel"]
  counts = tuple(int(c) for c in solvers.output_counts(round(0.6 * w.size),
                                                       *w.shape))
  solve = solvers._sparsegpt.lower(w, gram, counts, None, 8, 0.01).compile()  # pylint: disable=protected-access
  report["sparsegpt_collectives"] = collectives(solve.as_text())
  k = round(0.6 * w.size)
  report["wanda_collectives"] = collectives(jax.jit(
      lambda w, sq: solvers.wanda(w, sq, k)).lower(w, sq).compile().as_text())
  report["magnitude_collectives"] = collectives(jax.jit(
      lambda w: solvers.magnitude(w, k)).lower(w).compile().as_text())
  report["kernel_shape"] = list(w.shape)

  # The same on explicit axes (the statistics name their shardings).
  eparams = ev["params"]
  with jax.set_mesh(emesh):
    stats = capture.Model(fn, eparams, paths).statistics(["b/kernel"],
                                                         gram=True)
    report["explicit_stats_collectives"] = collectives(stats.program.lower(
        jax.tree.leaves(eparams), ex, 0).compile().as_text())
    _, sq, gram = stats(eparams, [ex], "b/kernel")
    report["explicit_stat_types"] = [str(jax.typeof(sq)), str(jax.typeof(gram))]
    w = eparams["b"]["kernel"]
    report["explicit_solve_collectives"] = {
        "sparsegpt": collectives(solvers._sparsegpt.lower(  # pylint: disable=protected-access
            w, gram, counts, None, 8, 0.01).compile().as_text()),
        "sparsegpt_2_4": collectives(solvers._sparsegpt.lower(  # pylint: disable=protected-access
            w, gram, None, (2, 4), 8, 0.01).compile().as_text()),
        "wanda": collectives(jax.jit(lambda w, sq: solvers.wanda(
            w, sq, k)).lower(w, sq).compile().as_text()),
        "wanda_2_4": collectives(jax.jit(lambda w, sq: solvers.wanda(
            w, sq, n_m=(2, 4))).lower(w, sq).compile().as_text()),
        "magnitude": collectives(jax.jit(lambda w: solvers.magnitude(
            w, k)).lower(w).compile().as_text())}
  np.savez(out, report=json.dumps(report), **arrays)


if __name__ == "__main__":
  main(sys.argv[1])
