"""Inference of compacted models (``fj.compact``) vs dense vs BCOO, same sparsity.

    python -m benchmarks.compact [--models lenet300100,lenet5,vgg11]
        [--fractions 50,75,90] [--batches 1,128] [--repeats 15]
        [--vgg_width 0.25]

For each model (LeNet-300-100, LeNet-5 at width 1, VGG-11 with BatchNorm at
``--vgg_width``, 28x28x1 inputs, random weights: speed does not depend on
the values) and each fraction of units removed, the masks are
``fj.post_training.prune(..., method="magnitude", structure=fj.coupled(
groups, reduce="l2"))`` (uniform: every traced group removes that fraction
of its units, so ~75 / 94 / 99 % of the kernel weights at 50 / 75 / 90 %
of the units), and three jitted forwards (eval mode) compute the same
function:

* **dense**: the Flax model on the masked variables (zeros multiplied);
* **compact**: the model rebuilt at ``fj.compact(...).widths`` on the
  compacted variables;
* **bcoo**: the Flax model with every Dense / Conv kernel replaced by a
  ``jax.experimental.sparse.BCOO`` of its kept weights (a Flax method
  interceptor): ``x @ W`` for Dense, im2col patches
  (``lax.conv_general_dilated_patches``) ``@ W`` for Conv, as in
  ``benchmarks/export.py``.

Timing: every candidate compiled and warmed first, then ``--repeats``
rounds, each calling the three once in turn (interleaved, so machine load
hits them alike); the median per call of the process's CPU time (all
threads: a loaded machine does not inflate it) and of wall time. Speed-up
= dense / candidate (> 1: faster). Also the max |difference| of each
candidate's outputs from dense's, and the kernel weights each stores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import flipout_jax as fj
from flipout_jax import models
from flipout_jax import sparse_export
from flipout_jax import trees


def _bcoo_kernels(params, masks) -> dict:
  """``{layer path: BCOO [in, out]}`` of every masked kernel (a conv's
  ``(kh, kw, cin, cout)`` as the ``(cin·kh·kw, cout)`` matrix of its
  patches)."""
  flat_m = dict(trees.leaves_with_paths(masks, is_leaf=lambda x: x is None))
  out = {}
  for path, k in trees.leaves_with_paths(params):
    m = flat_m.get(path)
    if m is None or not path.endswith("kernel"):
      continue
    k, m = np.asarray(k), np.asarray(m)
    if k.ndim == 4:  # (kh, kw, cin, cout) -> (cin, kh, kw, cout)
      k, m = (np.transpose(a, (2, 0, 1, 3)).reshape(-1, a.shape[-1])
              for a in (k, m))
    out[path.rsplit("/", 1)[0]] = sparse_export.bcoo_from_mask(k, m)
  return out


def _bcoo_apply(model):
  """``(variables, kernels, x) -> logits``: the model with its Dense / Conv
  products done on the BCOO ``kernels``."""

  def apply(variables, kernels, x):
    def intercept(next_fun, args, kwargs, context):
      mod = context.module
      if context.method_name != "__call__" or not isinstance(
          mod, (nn.Dense, nn.Conv)):
        return next_fun(*args, **kwargs)
      (h,) = args
      if isinstance(mod, nn.Conv):
        h = lax.conv_general_dilated_patches(
            h, mod.kernel_size, (1, 1), mod.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return sparse_export.sparse_dense_apply(
          h, kernels["/".join(mod.path)], mod.variables["params"]["bias"])

    with nn.intercept_methods(intercept):
      return model.apply(variables, x, train=False)

  return apply


def _cases(name, width, fraction, x):
  model = models.get_model(name, width=width)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  if "batch_stats" in v:  # non-trivial eval-mode statistics (outputs that
    # still depend on the input: the max diff below checks something)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    v = {**v, "batch_stats": {n: {
        "mean": jax.random.uniform(k1, d["mean"].shape, minval=-0.05,
                                   maxval=0.05),
        "var": jax.random.uniform(k2, d["var"].shape, minval=0.5, maxval=1.5)}
                              for n, d in v["batch_stats"].items()}}
  fn = lambda w, xb: model.apply(w, xb, train=False)  # pylint: disable=unnecessary-lambda-assignment
  groups = fj.dependency_groups(fn, v, x)
  r = fj.post_training.prune(fn, v, x, sparsity=fraction, method="magnitude",
                             structure=fj.coupled(groups, reduce="l2"))
  small = fj.compact(fn, r.variables, x, masks=r.masks)
  rebuilt = type(model)(num_classes=10, width=width, layer_widths=small.widths)
  kernels = _bcoo_kernels(r.variables["params"], r.masks)
  counts = {
      "dense": sum(a.size for p, a in trees.leaves_with_paths(v["params"])
                   if p.endswith("kernel")),
      "compact": sum(int(np.prod(s)) for p, s in small.shapes.items()
                     if p.endswith("kernel")),
      "bcoo": sum(int(k.nse) for k in kernels.values())}
  return ({"dense": (jax.jit(fn), (r.variables,)),
           "compact": (jax.jit(lambda w, xb: rebuilt.apply(w, xb, train=False)),
                       (small.variables,)),
           "bcoo": (jax.jit(_bcoo_apply(model)), (r.variables, kernels))},
          counts, small.widths)


def _measure(fns, x, repeats):
  """Median CPU and wall seconds per call of each candidate, interleaved."""
  outs = {}
  for k, (f, args) in fns.items():
    outs[k] = np.asarray(jax.block_until_ready(f(*args, x)))  # compile
    jax.block_until_ready(f(*args, x))  # warm
  cpu = {k: [] for k in fns}
  wall = {k: [] for k in fns}
  for _ in range(repeats):
    for k, (f, args) in fns.items():
      c, w = time.process_time(), time.perf_counter()
      jax.block_until_ready(f(*args, x))
      cpu[k].append(time.process_time() - c)
      wall[k].append(time.perf_counter() - w)
  diff = {k: float(np.max(np.abs(o - outs["dense"]))) for k, o in outs.items()}
  return ({k: statistics.median(v) for k, v in cpu.items()},
          {k: statistics.median(v) for k, v in wall.items()}, diff)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="lenet300100,lenet5,vgg11")
  parser.add_argument("--fractions", default="50,75,90",
                      help="percent of units removed")
  parser.add_argument("--batches", default="1,128")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--vgg_width", type=float, default=0.25)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPU(s), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
        f"; load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}; "
        f"median of {args.repeats} interleaved calls; speed-up = dense / "
        "candidate, CPU time (wall in brackets)")
  print("| model | units removed | weights left | batch | dense ms | compact "
        "ms | bcoo ms | compact speed-up | bcoo speed-up | max diff "
        "(compact, bcoo) |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for name in args.models.split(","):
    width = args.vgg_width if name.startswith("vgg") else 1.0
    label = f"{name} (width {width:g})" if width != 1 else name
    for frac in (float(f) / 100 for f in args.fractions.split(",")):
      fns, counts, _ = _cases(name, width, frac,
                              jnp.zeros((1, 28, 28, 1), jnp.float32))
      for batch in (int(b) for b in args.batches.split(",")):
        x = jax.random.normal(jax.random.PRNGKey(batch), (batch, 28, 28, 1))
        cpu, wall, diff = _measure(fns, x, args.repeats)
        ms = lambda k: f"{cpu[k] * 1e3:.3f} ({wall[k] * 1e3:.3f})"  # pylint: disable=unnecessary-lambda-assignment,cell-var-from-loop
        print(f"| {label} | {frac:.0%} | {counts['compact'] / counts['dense']:.2%}"
              f" | {batch} | {ms('dense')} | {ms('compact')} | {ms('bcoo')} | "
              f"{cpu['dense'] / cpu['compact']:.2f}x "
              f"({wall['dense'] / wall['compact']:.2f}x) | "
              f"{cpu['dense'] / cpu['bcoo']:.2f}x "
              f"({wall['dense'] / wall['bcoo']:.2f}x) | "
              f"{diff['compact']:.1e}, {diff['bcoo']:.1e} |", flush=True)
      assert counts["compact"] == counts["bcoo"], counts


if __name__ == "__main__":
  main()
