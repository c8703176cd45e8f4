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

:class:`Model` traces ``fn`` once per input type; its :meth:`Model.statistics`
is one jitted program for every layer (the layer an argument), so pruning
layer after layer with new kernels neither re-traces nor recompiles.
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
  if not contract:
    return x.reshape(-1, 1)
  return _rows(x, len(contract))


def _rows(x: jax.Array, features: int) -> jax.Array:
  """``x [*rows, *feat]`` as ``[Π rows, Π feat]`` (``features`` trailing
  axes). On explicit mesh axes each merged axis is named sharded by the
  mesh axes of the axes it merges, in order (``[16@data, 8, 9]`` ->
  ``[128@data, 9]``): JAX infers no sharding for such a reshape."""
  shape = (math.prod(x.shape[:x.ndim - features]),
           math.prod(x.shape[x.ndim - features:]))
  sharding = explicit_sharding(x)
  if sharding is None:
    return x.reshape(shape)
  spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))

  def merged(entries):
    axes = [a for e in entries if e is not None
            for a in (e if isinstance(e, tuple) else (e,))]
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)

  cut = x.ndim - features
  return jnp.reshape(x, shape, out_sharding=jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(merged(spec[:cut]),
                                                merged(spec[cut:]))))


def _dot_use(eqn, side: int):
  """``(view, inputs)`` of operand ``side`` of a ``dot_general``: its
  :class:`KernelView` (from the equation's shapes) and ``inputs(invals) ->
  X [tokens, in]``, the other operand as a matrix."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if lb or rb:
    raise ValueError("batch dimensions in the kernel's dot_general")
  shape = eqn.invars[side].aval.shape
  w_contract, x_contract = (rc, lc) if side == 1 else (lc, rc)
  out_axes = tuple(i for i in range(len(shape)) if i not in w_contract)
  view = KernelView(tuple(w_contract) + out_axes,
                    math.prod(shape[i] for i in w_contract),
                    math.prod(shape[i] for i in out_axes),
                    shape[w_contract[-1]] if w_contract else 1)
  return view, lambda invals: _matrix_of(invals[1 - side], tuple(x_contract))


def _conv_use(eqn):
  """``(view, inputs)`` of a convolution's kernel (as :func:`_dot_use`):
  the inputs are the receptive fields."""
  p = eqn.params
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    raise ValueError("a grouped convolution")
  shape = eqn.invars[1].aval.shape
  dn = p["dimension_numbers"]
  out_c, in_c, *spatial = dn.rhs_spec
  s = math.prod(shape[d] for d in spatial)

  def inputs(invals):
    patches = lax.conv_general_dilated_patches(
        invals[0], [shape[d] for d in spatial], p["window_strides"],
        p["padding"], lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"], dimension_numbers=dn)
    # Patch features are channel-major: (C, *spatial) -> (*spatial, C).
    feat = jnp.moveaxis(patches, dn.out_spec[1], -1)
    # Split, swap, then merge (one reshape that merges and splits has no
    # sharding rule on explicit axes).
    feat = feat.reshape(*feat.shape[:-1], shape[in_c], s)
    return _rows(jnp.swapaxes(feat, -1, -2), 2)

  view = KernelView((*spatial, in_c, out_c), s * shape[in_c], shape[out_c],
                    shape[in_c])
  return view, inputs


_PRODUCTS = ("dot_general", "conv_general_dilated")


def _uses(eqn, tags):
  """``[(tag, view, inputs)]``: the tagged kernels a ``dot_general`` /
  convolution uses as its weight (``tags``: each operand's tag or None).

  Raises:
    ValueError: the reason, for a tagged operand that is not a weight.
  """
  name = eqn.primitive.name
  if name == "dot_general" and tags[0] is not None and tags[0] == tags[1]:
    raise ValueError(f"the kernel as the wrong operand of {name}")
  if name == "conv_general_dilated":
    if tags[0] is not None:
      raise ValueError(f"the kernel as the wrong operand of {name}")
    return [] if tags[1] is None else [(tags[1], *_conv_use(eqn))]
  return [(tags[s], *_dot_use(eqn, s)) for s in (0, 1) if tags[s] is not None]


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


def _walk(jaxpr, tags, visit, args=None, consts=()):
  """Follows tagged values (a leaf's index; casts of it keep the tag, nested
  jaxprs are entered) through ``jaxpr`` and calls ``visit(eqn, tags,
  invals)`` at each matrix product or convolution with a tagged operand.
  With ``args`` (values), evaluates the jaxpr too (``invals`` are values,
  else None) and returns its outputs."""
  env, tag = {}, {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env.get(v)

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for i, (v, t) in enumerate(zip(jaxpr.invars, tags)):
    env[v] = None if args is None else args[i]
    if t is not None:
      tag[v] = t
  for eqn in jaxpr.eqns:
    invals = None if args is None else [read(v) for v in eqn.invars]
    ts = [None if isinstance(v, jcore.Literal) else tag.get(v)
          for v in eqn.invars]
    name = eqn.primitive.name
    sub = _sub_jaxpr(eqn) if any(t is not None for t in ts) else None
    if name in _PRODUCTS and any(t is not None for t in ts):
      visit(eqn, ts, invals)
      outs = None if args is None else _bind(eqn, invals)
    elif sub is not None:
      outs = _walk(sub[0], ts, visit, invals, sub[1])
      if args is not None and not eqn.primitive.multiple_results:
        outs = outs[0]
    else:
      outs = None if args is None else _bind(eqn, invals)
      if name == "convert_element_type" and ts[0] is not None:
        tag[eqn.outvars[0]] = ts[0]  # a cast of the kernel is the kernel
    if args is not None:
      if eqn.primitive.multiple_results:
        env.update(zip(eqn.outvars, outs))
      else:
        env[eqn.outvars[0]] = outs
  return None if args is None else [read(v) for v in jaxpr.outvars]


class Model:
  """``fn(params, batch)`` traced once per input type, for the kernels'
  uses, views and statistics.

  The jaxpr is made once per (params, batch) type and kept: the layers'
  statistics (:meth:`statistics`) are one jitted interpreter of it, its
  argument ``which`` choosing the kernel, so pruning layer after layer
  (new kernels, same types) neither re-traces the model nor recompiles.

  Args:
    fn: ``(params, batch) -> outputs``.
    params: the params (their types; values are passed to each call).
    paths: the path of every leaf of ``params``.
  """

  def __init__(self, fn: Callable[..., Any], params: PyTree,
               paths: list[str]):
    self.fn, self.paths = fn, list(paths)
    self.treedef = jax.tree.structure(params)
    self._jaxprs = {}

  def jaxpr(self, leaves, batch) -> jcore.ClosedJaxpr:
    """The closed jaxpr of ``fn`` on (params leaves, batch): its invars are
    the leaves, then the batch's leaves."""
    key = (jax.tree.structure(batch),
           tuple(jax.typeof(a) for a in [*leaves, *jax.tree.leaves(batch)]))
    if key not in self._jaxprs:
      self._jaxprs[key] = jax.make_jaxpr(lambda ls, b: self.fn(
          jax.tree.unflatten(self.treedef, ls), b))(list(leaves), batch)
    return self._jaxprs[key]

  def _index(self, target: str) -> int:
    if target not in self.paths:
      raise ValueError(f"target: {target!r} is not a leaf of params; valid: "
                       f"{', '.join(self.paths)}")
    return self.paths.index(target)

  def usage_order(self, params, batch) -> list[str]:
    """The leaves used as the weight of a matrix product or a convolution,
    in the order the forward pass first uses them."""
    closed = self.jaxpr(jax.tree.leaves(params), batch)
    order: list[int] = []

    def visit(eqn, ts, invals):
      del eqn, invals
      order.extend(t for t in ts if t is not None and t not in order)

    _walk(closed.jaxpr, list(range(len(self.paths))), visit)
    return [self.paths[i] for i in order]

  def views(self, params, batch, targets) -> dict[str, KernelView]:
    """Each target's :class:`KernelView`, from the jaxpr alone.

    Raises:
      ValueError: a target not used as the weight of a ``dot_general`` or
        convolution, or used as products of different shapes.
    """
    index = [self._index(t) for t in targets]
    closed = self.jaxpr(jax.tree.leaves(params), batch)
    tags = [None] * len(closed.jaxpr.invars)
    for n, i in enumerate(index):
      tags[i] = n
    found: dict[int, list[KernelView]] = {n: [] for n in range(len(index))}

    def visit(eqn, ts, invals):
      del invals
      try:
        uses = _uses(eqn, ts)
      except ValueError as e:
        t = targets[next(t for t in ts if t is not None)]
        raise ValueError(f"{t}: used in {e}; not supported by the "
                         "post-training methods") from None
      for n, view, _ in uses:
        found[n].append(view)

    _walk(closed.jaxpr, tags, visit)
    for n, t in enumerate(targets):
      if not found[n]:
        raise ValueError(
            f"{t}: not used as the weight of a dot_general or "
            "conv_general_dilated (through casts and nested calls only), so "
            "its calibration inputs are unknown; exclude it with filter_fn")
      if len(set(found[n])) > 1:
        raise ValueError(f"{t}: used as the weight of products of "
                         "different shapes")
    return {t: found[n][0] for n, t in enumerate(targets)}

  def statistics(self, targets: list[str], *, gram: bool) -> "Statistics":
    """The :class:`Statistics` of ``targets`` (one compiled program per
    batch type for all of them)."""
    return Statistics(self, list(targets), gram)


class Statistics:
  """``sq`` (and ``XᵀX``) of one of several kernels, by one program.

  ``program(leaves, batch, which)`` (jitted) evaluates the model's jaxpr
  and, at each use of ``targets[which]`` (a traced int), adds its inputs'
  statistics into accumulators sized for the widest target (``lax.cond``:
  the other targets' statistics are not computed); :meth:`__call__` cuts
  them to the target's ``in``. Adding into zeros is exact, so the values
  are those of a program made for that kernel alone.
  """

  def __init__(self, model: Model, targets: list[str], gram: bool):
    self.model, self.targets, self.gram = model, targets, gram
    for t in targets:
      model._index(t)  # pylint: disable=protected-access
    self.program = jax.jit(self._program)
    self._views = None

  def _program(self, leaves, batch, which):
    model = self.model
    closed = model.jaxpr(leaves, batch)
    views = model.views(jax.tree.unflatten(model.treedef, leaves), batch,
                        self.targets)
    width = max(v.num_in for v in views.values())
    acc = [jnp.zeros((width,), jnp.float32),
           jnp.zeros((width, width), jnp.float32) if self.gram else None]
    tags = [None] * len(closed.jaxpr.invars)
    for n, t in enumerate(self.targets):
      tags[model.paths.index(t)] = n

    def visit(eqn, ts, invals):
      for n, view, inputs in _uses(eqn, ts):
        def add(acc, invals, inputs=inputs, k=view.num_in):
          x2 = inputs(invals).astype(jnp.float32)
          sq = acc[0].at[:k].add(replicated(jnp.sum(x2 * x2, axis=0)))
          return [sq, None if acc[1] is None else
                  acc[1].at[:k, :k].add(_gram(x2))]
        acc[:] = lax.cond(which == n, add, lambda acc, _: acc, acc, invals)

    _walk(closed.jaxpr, tags, visit,
          [*leaves, *jax.tree.leaves(batch)], closed.consts)
    return acc[0], acc[1]

  def views(self, params, batch) -> dict[str, KernelView]:
    if self._views is None:
      self._views = self.model.views(params, batch, self.targets)
    return self._views

  def __call__(self, params: PyTree, batches, target: str):
    """``(view, sq, gram)`` of ``target``, summed over ``batches`` in
    float32 (``gram`` None unless made with ``gram=True``)."""
    leaves = jax.tree.leaves(params)
    view = self.views(params, batches[0])[target]
    which = self.targets.index(target)
    sq = g = None
    for batch in batches:
      s, gb = self.program(leaves, batch, which)
      s = s[:view.num_in]
      sq = s if sq is None else sq + s
      if self.gram:
        gb = gb[:view.num_in, :view.num_in]
        g = gb if g is None else g + gb
    return view, sq, g


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
  gather of ``X``). Several layers: :meth:`Model.statistics`.

  Raises:
    ValueError: the kernel is not the weight operand of any matrix product
      or convolution, or of several with different shapes.
  """
  if batches is None:
    return layer_stats(lambda p, _: fn(p), params, target, paths, gram=gram,
                       batches=[()])
  return Model(fn, params, paths).statistics([target], gram=gram)(
      params, batches, target)


def kernel_view(fn: Callable[[PyTree], Any], params: PyTree, target: str,
                paths: list[str]) -> KernelView:
  """The :class:`KernelView` of ``target`` (as :func:`layer_stats`, ``fn:
  params -> outputs``), found by tracing alone: nothing is compiled or run."""
  return Model(lambda p, _: fn(p), params, paths).views(
      params, (), [target])[target]


def usage_order(fn: Callable[[PyTree], Any], params: PyTree,
                paths: list[str]) -> list[str]:
  """The leaves of ``params`` used as the weight of a matrix product or a
  convolution, in the order the forward pass first uses them."""
  return Model(lambda p, _: fn(p), params, paths).usage_order(params, ())


def prunable_order(fn: Callable[[PyTree], Any] | None, params: PyTree,
                   filter_fn: Callable[[str, Any], bool] | None = None, *,
                   used: list[str] | None = None
                   ) -> tuple[list[str], list[str]]:
  """``(order, dense)``: the post-training methods' prunable kernels.

  ``order``: the leaves ``filter_fn`` selects (default
  :func:`flipout_jax.trees.default_filter`: float, ndim >= 2) that a matrix
  product or a convolution of ``fn(params)`` uses as its weight, in the order
  of :func:`usage_order`. ``dense``: the leaves the default filter selects
  that no product uses (embedding tables, gathered rather than multiplied),
  which stay dense. One rule for every post-training method
  (:func:`flipout_jax.post_training.prune` and :func:`flipout_jax.unipts.run`).
  ``used``: the :func:`usage_order` already found (then ``fn`` is unused).

  Raises:
    ValueError: a leaf an explicit ``filter_fn`` selects is not used as such
      a weight (its calibration inputs are unknown), naming it.
  """
  flat = trees.leaves_with_paths(params)
  if used is None:
    used = usage_order(fn, params, [p for p, _ in flat])
  chosen = [p for p, x in flat if (filter_fn or trees.default_filter)(p, x)]
  if filter_fn is not None:
    missing = [p for p in chosen if p not in used]
    if missing:
      raise ValueError(f"filter_fn: {', '.join(missing)} not used as the "
                       "weight of a matrix product or convolution.")
  dense = [p for p, x in flat if trees.default_filter(p, x) and p not in used]
  return [p for p in used if p in chosen], dense
