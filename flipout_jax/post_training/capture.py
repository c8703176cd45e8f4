"""The calibration inputs of a weight, found by tracing the model's jaxpr.

A post-training method needs, for a kernel ``W``, the matrix ``X`` of the
inputs it multiplies (all calibration tokens × its input features). No
per-architecture rule is needed for that: the jaxpr of
``apply_fn(variables, x)`` shows the ``dot_general`` or
``conv_general_dilated`` that consumes ``W`` and its other operand. This
module evaluates that jaxpr (inside ``jax.jit``) and, at the equation that
consumes the chosen kernel, reduces its other operand to the statistics a
method needs:

* ``sq``: ``‖X_·j‖²`` per input feature (Wanda), float32 ``[in]``;
* ``gram``: ``XᵀX``, float32 ``[in, in]`` (SparseGPT).

Every kernel is seen as a matrix ``W2 [in, out]`` (:class:`KernelView`): the
contracted axes, flattened, then the rest. A conv kernel's inputs are its
receptive fields (``lax.conv_general_dilated_patches``), ordered spatial
position-major and input channel fastest, so a Flax ``(kh, kw, in, out)``
kernel is ``W.reshape(-1, out)`` and N:M groups of M consecutive inputs are
groups of input channels, as in :func:`flipout_jax.n_m`.

Nested jaxprs (``jit``, ``custom_jvp``/``custom_vjp`` functions, remat) are
followed when the kernel flows into them; a kernel that reaches its matrix
product through another operation (a transpose, a scale) is not found and
is an error naming it. A kernel used twice (weight tying) sums the
statistics of both uses.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
from jax import lax
from jax.extend import core as jcore
import jax.numpy as jnp
import numpy as np

from flipout_jax import trees

PyTree = Any


class KernelView(NamedTuple):
  """How a kernel is a matrix ``[in, out]``: ``W2 = transpose(W, perm)
  .reshape(in, out)``; ``last_in``: the size of the fastest input axis
  (a conv's input channels), along which N:M groups run."""
  perm: tuple[int, ...]
  num_in: int
  num_out: int
  last_in: int

  def to_matrix(self, w: jax.Array) -> jax.Array:
    return jnp.transpose(w, self.perm).reshape(self.num_in, self.num_out)

  def from_matrix(self, w2: jax.Array, shape) -> jax.Array:
    moved = tuple(shape[i] for i in self.perm)
    return jnp.transpose(w2.reshape(moved), np.argsort(self.perm))


class _Found(NamedTuple):
  view: KernelView
  sq: jax.Array  # float32 [in]
  gram: jax.Array | None  # float32 [in, in]


def _closed(value):
  return isinstance(value, jcore.ClosedJaxpr)


def _sub_jaxpr(eqn):
  """The (closed) jaxpr a higher-order equation calls with its own
  operands, or None."""
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(name)
    if _closed(sub):
      return sub.jaxpr, sub.consts
    if isinstance(sub, jcore.Jaxpr):
      return sub, ()
  return None


def _matrix_of(x: jax.Array, contract: tuple[int, ...]) -> jax.Array:
  """``x`` with the ``contract`` axes last (in that order), as ``[-1, in]``."""
  rest = [i for i in range(x.ndim) if i not in contract]
  x = jnp.transpose(x, (*rest, *contract))
  return x.reshape(-1, math.prod(x.shape[len(rest):]) if contract else 1)


def _dot_stats(eqn, invals, side: int):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if lb or rb:
    raise ValueError("batch dimensions in the kernel's dot_general")
  w, x = invals[side], invals[1 - side]
  w_contract, x_contract = (rc, lc) if side == 1 else (lc, rc)
  out_axes = tuple(i for i in range(w.ndim) if i not in w_contract)
  view = KernelView(tuple(w_contract) + out_axes,
                    math.prod(w.shape[i] for i in w_contract),
                    math.prod(w.shape[i] for i in out_axes),
                    w.shape[w_contract[-1]] if w_contract else 1)
  return view, _matrix_of(x, tuple(x_contract))


def _conv_stats(eqn, invals):
  p = eqn.params
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    raise ValueError("a grouped convolution")
  lhs, w = invals
  dn = p["dimension_numbers"]
  out_c, in_c, *spatial = dn.rhs_spec
  patches = lax.conv_general_dilated_patches(
      lhs, [w.shape[d] for d in spatial], p["window_strides"], p["padding"],
      lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
      dimension_numbers=dn)
  # Patch features are channel-major: (C, *spatial) -> (*spatial, C).
  feat = jnp.moveaxis(patches, dn.out_spec[1], -1)
  s = math.prod(w.shape[d] for d in spatial)
  x2 = feat.reshape(-1, w.shape[in_c], s).transpose(0, 2, 1).reshape(
      -1, s * w.shape[in_c])
  view = KernelView((*spatial, in_c, out_c), s * w.shape[in_c],
                    w.shape[out_c], w.shape[in_c])
  return view, x2


def explicit_sharding(x):
  """``x``'s ``NamedSharding`` when its type names mesh axes (a mesh of
  explicit axes, ``jax.sharding.AxisType.Explicit``), else None (one device,
  or GSPMD / auto axes, which never appear in a type)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(axis is None for axis in spec):
    return None
  return sharding


def replicated(x: jax.Array) -> jax.Array:
  """``x`` resharded to every device when its type is explicitly sharded
  (an all-gather), else ``x`` (GSPMD places it itself)."""
  sharding = explicit_sharding(x)
  if sharding is None:
    return x
  return jax.sharding.reshard(
      x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def take(x: jax.Array, start: int, size: int) -> jax.Array:
  """Examples ``start : start + size`` of ``x`` (leading axis). On explicit
  axes a slice keeps the batch sharding when the axes sharding the batch
  divide ``size``, else it is replicated along the batch (the only
  layouts an explicit type can hold); elsewhere a plain slice."""
  sharding = explicit_sharding(x)
  if sharding is None:
    return x[start:start + size]
  spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  shards = math.prod(sharding.mesh.shape[a] for a in axes if a is not None)
  stop = min(start + size, x.shape[0])
  if (stop - start) % shards:
    spec[0] = None
  return x.at[start:stop].get(out_sharding=jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*spec)))


def _gram(x2: jax.Array) -> jax.Array:
  """``XᵀX``. On a mesh of explicit axes a batch-sharded ``X`` makes the
  contraction's output sharding ambiguous, so it is named: replicated (the
  partial sums of the batch shards all-reduced); GSPMD infers its own."""
  sharding = explicit_sharding(x2)
  if sharding is None:
    return x2.T @ x2
  named = lambda *spec: jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*spec))
  # Each example's features gathered once (the batch sharding kept), then
  # the batch shards' partial sums all-reduced.
  x2 = jax.sharding.reshard(x2, named(sharding.spec[0], None))
  return jnp.matmul(x2.T, x2, out_sharding=named())


def _bind(eqn, invals):
  with eqn.ctx.manager:
    return eqn.primitive.bind(*invals,
                              **eqn.primitive.get_bind_params(eqn.params))


def _eval(jaxpr, consts, args, tags, target, gram, found):
  """Evaluates ``jaxpr``; ``tags``: which ``args`` are the target kernel."""
  env, tagged = {}, set()

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a, t in zip(jaxpr.invars, args, tags):
    env[v] = a
    if t:
      tagged.add(v)
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    is_t = [not isinstance(v, jcore.Literal) and v in tagged
            for v in eqn.invars]
    name = eqn.primitive.name
    sub = _sub_jaxpr(eqn) if any(is_t) else None
    if any(is_t) and name in ("dot_general", "conv_general_dilated"):
      try:
        if name == "dot_general" and not all(is_t):
          view, x2 = _dot_stats(eqn, invals, is_t.index(True))
        elif name == "conv_general_dilated" and is_t == [False, True]:
          view, x2 = _conv_stats(eqn, invals)
        else:
          raise ValueError(f"the kernel as the wrong operand of {name}")
      except ValueError as e:
        raise ValueError(f"{target}: used in {e}; not supported by the "
                         "post-training methods") from None
      x2 = x2.astype(jnp.float32)
      found.append(_Found(view, replicated(jnp.sum(x2 * x2, axis=0)),
                          _gram(x2) if gram else None))
      outs = _bind(eqn, invals)
    elif sub is not None:
      outs = _eval(sub[0], sub[1], invals, is_t, target, gram, found)
      if not eqn.primitive.multiple_results:
        outs = outs[0]
    else:
      outs = _bind(eqn, invals)
      if name == "convert_element_type" and is_t[0]:
        tagged.update(eqn.outvars)  # a cast of the kernel is the kernel
    if eqn.primitive.multiple_results:
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    else:
      env[eqn.outvars[0]] = outs
  return [read(v) for v in jaxpr.outvars]


def layer_stats(fn: Callable[..., Any], params: PyTree, target: str,
                paths: list[str], *, gram: bool, batches=None):
  """``(view, sq, gram)`` of the kernel at ``target`` for ``fn(params)``.

  Args:
    fn: ``params -> outputs`` (the calibration inputs closed over), or with
      ``batches``, ``(params, batch) -> outputs``.
    params: the params, flattened in the order of ``paths``.
    target: the path (``fj.trees.path_str``) of the kernel.
    paths: the path of every leaf of ``params``.
    gram: also compute ``XᵀX``.
    batches: None, or a sequence of input batches (pytrees): ``fn`` runs on
      each (one compiled program per batch shape) and ``sq`` / ``gram`` are
      summed over them in float32, so the calibration set never needs to
      fit one forward pass.

  Under ``jax.sharding`` the statistics are computed where the inputs live:
  ``XᵀX`` of a batch-sharded ``X`` is a sum over the batch shards, so XLA
  reduces it across the batch axis (an all-reduce of ``[in, in]``, never a
  gather of ``X``).

  Raises:
    ValueError: the kernel is not the weight operand of any matrix product
      or convolution, or of several with different shapes.
  """
  if batches is None:
    return layer_stats(lambda p, _: fn(p), params, target, paths, gram=gram,
                       batches=[()])
  stats, leaves, view = _stats_fn(fn, params, target, paths, gram)
  compiled = jax.jit(stats)
  sq = g = None
  for batch in batches:
    s, gb = compiled(leaves, batch)
    sq = s if sq is None else sq + s
    if gram:
      g = gb if g is None else g + gb
  return view[0], sq, g


def kernel_view(fn: Callable[[PyTree], Any], params: PyTree, target: str,
                paths: list[str]) -> KernelView:
  """The :class:`KernelView` of ``target`` (as :func:`layer_stats`, ``fn:
  params -> outputs``), found by tracing alone: nothing is compiled or run."""
  stats, leaves, view = _stats_fn(lambda p, _: fn(p), params, target, paths,
                                  False)
  jax.eval_shape(stats, leaves, ())
  return view[0]


def _stats_fn(fn, params, target, paths, gram):
  """``(stats, leaves, view)``: ``stats(leaves, batch) -> (sq, gram)`` of
  ``fn(params, batch)``; tracing it appends the kernel's view to the list
  ``view``."""
  if target not in paths:
    raise ValueError(f"target: {target!r} is not a leaf of params; valid: "
                     f"{', '.join(paths)}")
  leaves, treedef = jax.tree.flatten(params)
  index = paths.index(target)

  def run(leaves, batch):
    closed = jax.make_jaxpr(
        lambda ls, b: fn(jax.tree.unflatten(treedef, ls), b))(leaves, batch)
    args = [*leaves, *jax.tree.leaves(batch)]
    found: list[_Found] = []
    _eval(closed.jaxpr, closed.consts, args,
          [i == index for i in range(len(args))], target, gram, found)
    if not found:
      raise ValueError(
          f"{target}: not used as the weight of a dot_general or "
          "conv_general_dilated (through casts and nested calls only), so "
          "its calibration inputs are unknown; exclude it with filter_fn")
    if len({f.view for f in found}) > 1:
      raise ValueError(f"{target}: used as the weight of products of "
                       "different shapes")
    sq = sum(f.sq for f in found)
    g = sum(f.gram for f in found) if gram else None
    return found[0].view, sq, g

  view = []

  def stats(leaves, batch):
    v, sq, g = run(leaves, batch)
    view.append(v)
    return sq, g

  return stats, leaves, view


def usage_order(fn: Callable[[PyTree], Any], params: PyTree,
                paths: list[str]) -> list[str]:
  """The leaves of ``params`` used as the weight of a matrix product or a
  convolution, in the order the forward pass first uses them."""
  leaves, treedef = jax.tree.flatten(params)
  closed = jax.make_jaxpr(lambda *a: fn(jax.tree.unflatten(treedef, a)))(
      *leaves)
  order: list[int] = []

  def walk(jaxpr, tags):
    tag = {v: t for v, t in zip(jaxpr.invars, tags) if t is not None}
    for eqn in jaxpr.eqns:
      ts = [None if isinstance(v, jcore.Literal) else tag.get(v)
            for v in eqn.invars]
      name = eqn.primitive.name
      if name in ("dot_general", "conv_general_dilated"):
        order.extend(t for t in ts if t is not None and t not in order)
      elif name == "convert_element_type" and ts[0] is not None:
        tag[eqn.outvars[0]] = ts[0]
      elif any(t is not None for t in ts):
        sub = _sub_jaxpr(eqn)
        if sub is not None:
          walk(sub[0], ts)

  walk(closed.jaxpr, list(range(len(leaves))))
  return [paths[i] for i in order]


def prunable_order(fn: Callable[[PyTree], Any], params: PyTree,
                   filter_fn: Callable[[str, Any], bool] | None = None
                   ) -> tuple[list[str], list[str]]:
  """``(order, dense)``: the post-training methods' prunable kernels.

  ``order``: the leaves ``filter_fn`` selects (default
  :func:`flipout_jax.trees.default_filter`: float, ndim >= 2) that a matrix
  product or a convolution of ``fn(params)`` uses as its weight, in the order
  of :func:`usage_order`. ``dense``: the leaves the default filter selects
  that no product uses (embedding tables, gathered rather than multiplied),
  which stay dense. One rule for every post-training method
  (:func:`flipout_jax.post_training.prune` and :func:`flipout_jax.unipts.run`).

  Raises:
    ValueError: a leaf an explicit ``filter_fn`` selects is not used as such
      a weight (its calibration inputs are unknown), naming it.
  """
  flat = trees.leaves_with_paths(params)
  paths = [p for p, _ in flat]
  used = usage_order(fn, params, paths)
  chosen = [p for p, x in flat if (filter_fn or trees.default_filter)(p, x)]
  if filter_fn is not None:
    missing = [p for p in chosen if p not in used]
    if missing:
      raise ValueError(f"filter_fn: {', '.join(missing)} not used as the "
                       "weight of a matrix product or convolution.")
  dense = [p for p, x in flat if trees.default_filter(p, x) and p not in used]
  return [p for p in used if p in chosen], dense
