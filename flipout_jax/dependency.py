"""Coupled parameter axes found by tracing, and compaction of removed units.

Removing a unit (a neuron, a filter, an attention head) from a model means
deleting a slice of *every* tensor axis that carries it: a Dense layer's
output column, its bias entry and the next layer's input row; a conv
filter, its BatchNorm scale, offset, mean and variance and the next conv's
input channel; and, through a residual add, the same channel of every block
the add joins. :func:`dependency_groups` finds these sets without
per-architecture rules, by tracing ``apply_fn(variables, x)`` to a jaxpr and
propagating axis identities through its equations; :func:`compact` then
deletes the units whose slices are zero and returns smaller variables.

    groups = fj.dependency_groups(model.apply, variables, x)
    small = fj.compact(model.apply, variables, x, masks=masks)
    model.apply(small.variables, x)   # a pure function runs as it is
    LeNet5(layer_widths=small.widths).apply(small.variables, x)  # Flax

**How axes are tied.** Every axis of every value in the jaxpr is a node of a
union-find; an equation ties the nodes that must keep the same index set:

* elementwise ops (``add``, ``mul``, ``select_n``, ``max``, ...) tie their
  operands' and result's axes position by position (residual adds,
  BatchNorm's scale/offset/mean/var, bias adds, activations);
  ``broadcast_in_dim``, ``transpose``, ``squeeze``, ``convert_element_type``
  map axes by position (a broadcast size-1 axis ties nothing);
* ``dot_general`` ties each contracting axis of one operand to the other's
  and maps batch and free axes to the result's;
* ``conv_general_dilated`` (via its dimension numbers) ties the input's
  feature axis to the kernel's in-feature axis and the kernel's out-feature
  axis to the output's; with ``feature_group_count`` > 1 the feature axes are
  split into (group, per-group) factors and the groups tied (depthwise
  convs);
* ``reshape`` splits or merges axes: a merged axis of length ``H·D`` is
  viewed as factors ``(H, D)``; each factor is an *atom* of the axis with a
  stride (``D`` for the heads, 1 for the per-head dimension), and atoms,
  not whole axes, form the groups. A flatten ``(h, w, c) -> h·w·c`` gives
  the channel atom stride 1 and makes the spatial atoms non-removable;
* ``pjit``, ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint`` (remat)
  are entered; ``scan``, ``while`` and ``cond`` bodies are entered with their
  carries tied in and out (the scanned axis is non-removable).

**What is non-removable** (``Group.removable`` False, with the first reason
found in ``Group.reason``): axes tied to the inputs ``example_x`` (input
features), to the outputs (e.g. the classes), to a constant captured by the
function or an ``iota``; axes that are reduced (``reduce_sum`` over a channel
axis, e.g. LayerNorm's statistics, so a transformer's residual stream is
non-removable; the spatial axes of a global pool), sliced, padded, gathered
along, windowed (pools, conv spatial axes), sorted, reversed or
concatenated along (a concatenation's axis is marked as a whole rather than
split into its operands' segments); an axis whose reshape factors do not
nest; and every axis of an equation of any other primitive (the safe
default: nothing is guessed).

**Which units :func:`compact` removes.** A group's *readers* are its members
that are contracted with the group's activation (``dot_general`` or conv
operands that are parameters: the next layer's input rows, the attention
output projection's rows of a head). Every path by which a unit of a
removable group reaches the output passes through a reader (the other paths
are positional ties within the group or are marked non-removable), so a unit
whose reader slices are all zero contributes exactly nothing (for finite
activations) and is deleted from every member. A group whose units also meet
another activation in a contraction (the per-head dimension that
``q·k`` contracts) has no readers and is kept whole. Zeroing only a
layer's *output* units (``fj.units``) is not enough: the bias and BatchNorm
offsets still send a constant to the next layer, so zero the next layer's
input rows too (the whole group).

This module depends only on jax, numpy and :mod:`flipout_jax.trees`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

from flipout_jax import trees

PyTree = Any


class Member(NamedTuple):
  """One parameter axis (or a factor of one) in a group.

  The axis of length ``L`` is read as ``(L // (size·stride), size,
  stride)`` with ``size`` the group's unit count: unit ``j`` is the slice
  ``[:, j, :]``. ``stride`` 1 with ``L == size`` is the axis itself; a
  head of ``D`` dims in a merged ``H·D`` axis has stride ``D``; a channel of
  a flattened ``(h, w, c)`` map has stride 1 and ``h·w`` blocks before it.

  Attributes:
    path: the leaf's path in ``variables`` (``"params/fc1/kernel"``).
    axis: the axis of that leaf.
    stride: elements per unit step along the axis (see above).
  """
  path: str
  axis: int
  stride: int


class Group(NamedTuple):
  """A set of coupled parameter axes whose units are removed together.

  Attributes:
    members: the coupled (leaf, axis, stride) triples, in leaf order.
    size: the number of units (every member holds ``size`` of them).
    removable: False when the units reach an input, an output or an
      operation that fixes them (see the module docstring).
    reason: why not removable ("" when removable).
    readers: the members through which the units reach the output (see
      :func:`compact`); empty when zeros in the parameters cannot prove a
      unit inert.
  """
  members: tuple[Member, ...]
  size: int
  removable: bool
  reason: str
  readers: tuple[Member, ...]


class Compacted(NamedTuple):
  """The result of :func:`compact`.

  Attributes:
    variables: the smaller variables (same tree, smaller leaves).
    widths: ``{layer: output units}`` for every leaf named ``kernel`` (Dense,
      Conv) or ``embedding``, ``layer`` its path without the collection and
      the leaf name (``"conv1"``, ``"block0/attn/query"``): what the models
      of :mod:`flipout_jax.models` take as ``layer_widths``.
    shapes: ``{path: shape}`` of every leaf after compaction.
    groups: the groups (:func:`dependency_groups`).
    kept: per group, the kept unit indices (int arrays, ascending).
  """
  variables: PyTree
  widths: dict
  shapes: dict
  groups: tuple[Group, ...]
  kept: tuple[np.ndarray, ...]


# Primitives that act entry by entry on operands of the result's rank
# (rank-0 operands and size-1 axes broadcast).
_ELEMENTWISE = frozenset("""
abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp
conj copy copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt
imag integer_pow is_finite le log log1p logistic lt max min mul ne neg
nextafter not or pow real reduce_precision rem round rsqrt select_n sign sin
sinh sqrt square sub tan tanh xor shift_left shift_right_logical
shift_right_arithmetic population_count clz convert_element_type
stop_gradient sharding_constraint
""".split())
# Positional one-to-one maps whose result keeps a parameter's identity.
_SAME_VALUE = frozenset(
    "convert_element_type copy copy_p reduce_precision sharding_constraint"
    .split())
_REDUCE = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or "
    "reduce_xor argmax argmin".split())
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
# Calls whose jaxpr takes the equation's operands and gives its results.
_CALLS = frozenset(
    "pjit jit closed_call core_call named_call remat remat2 checkpoint "
    "custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr".split())
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class _Trace:
  """Union-find over the axes of a jaxpr's values, filled by its equations."""

  def __init__(self):
    self.parent: list[int] = []
    self.length: list[int] = []
    self.reason: list[str] = []   # non-empty: fixed (at roots after union)
    self.base: list[int] = []     # value id -> its first node
    self.shapes: list[tuple] = []  # value id -> shape
    self.origin: dict[int, tuple[int, tuple]] = {}  # value -> (leaf, axes)
    self.factors: list[tuple[int, list[int]]] = []  # whole node, factors
    self.readers: set[tuple[int, int]] = set()      # (leaf, leaf axis)
    self.act_contracted: list[int] = []             # nodes

  # -- values and nodes ---------------------------------------------------
  def new(self, shape) -> int:
    self.base.append(len(self.parent))
    self.shapes.append(tuple(int(n) for n in shape))
    for n in shape:
      self.parent.append(len(self.parent))
      self.length.append(int(n))
      self.reason.append("")
    return len(self.base) - 1

  def node(self, v: int, axis: int) -> int:
    return self.base[v] + axis

  def find(self, n: int) -> int:
    while self.parent[n] != n:
      self.parent[n] = self.parent[self.parent[n]]
      n = self.parent[n]
    return n

  def union(self, a: int, b: int) -> None:
    a, b = self.find(a), self.find(b)
    if a == b:
      return
    if b < a:
      a, b = b, a
    self.parent[b] = a
    self.reason[a] = self.reason[a] or self.reason[b]

  def fix(self, n: int, why: str) -> None:
    r = self.find(n)
    if not self.reason[r]:
      self.reason[r] = why

  def factor(self, whole: int, parts: list[int]) -> None:
    """Axis ``whole`` is the row-major merge of axes ``parts`` (size-1
    parts dropped; a single remaining part is the axis itself)."""
    parts = [p for p in parts if self.length[p] != 1]
    if len(parts) == 1:
      self.tie(whole, parts[0])
    elif parts:
      self.factors.append((whole, parts))

  def tie(self, a: int, b: int) -> None:
    """Same index set on both axes (a broadcast size-1 axis ties nothing)."""
    la, lb = self.length[a], self.length[b]
    if la == lb:
      self.union(a, b)
    elif la != 1 and lb != 1:
      self.fix(a, "axes of different lengths tied")
      self.fix(b, "axes of different lengths tied")


class _Visitor:
  """Walks a jaxpr's equations, tying the nodes of a :class:`_Trace`."""

  def __init__(self, trace: _Trace):
    self.t = trace

  def fix_value(self, v, why):
    if v is None:
      return
    for a in range(self.ndim(v)):
      self.t.fix(self.t.node(v, a), why)

  def ndim(self, v):
    return len(self.t.shapes[v])

  def shape(self, v):
    return self.t.shapes[v]

  def tie_axes(self, u, a, v, b):
    if u is not None and v is not None:
      self.t.tie(self.t.node(u, a), self.t.node(v, b))

  def tie_all(self, u, v):
    for a in range(min(self.ndim(u), self.ndim(v))):
      self.tie_axes(u, a, v, a)

  # -- jaxprs -------------------------------------------------------------
  def run(self, jaxpr, consts, args):
    """Visits ``jaxpr`` with value ids ``args`` for its invars (None for a
    literal); ``consts`` for its constvars. Returns its outvars' ids."""
    env = {}
    for var, val in zip(jaxpr.constvars, consts):
      env[var] = val
    for var, val in zip(jaxpr.invars, args):
      env[var] = self.t.new(var.aval.shape) if val is None else val

    def read(x):
      if isinstance(x, jax_core.Literal):
        return None
      return env[x]

    for eqn in jaxpr.eqns:
      ins = [read(x) for x in eqn.invars]
      outs = self.equation(eqn, ins)
      for var, val in zip(eqn.outvars, outs):
        env[var] = val
    out = []
    for x in jaxpr.outvars:
      val = read(x)
      out.append(self.t.new(x.aval.shape) if val is None else val)
    return out

  def run_closed(self, closed, args):
    if isinstance(closed, jax_core.ClosedJaxpr):
      consts = []
      for var in closed.jaxpr.constvars:
        c = self.t.new(var.aval.shape)
        self.fix_value(c, "a constant of the function")
        consts.append(c)
      return self.run(closed.jaxpr, consts, args)
    return self.run(closed, [], args)

  def fresh_outs(self, eqn):
    return [self.t.new(getattr(v.aval, "shape", ())) for v in eqn.outvars]

  # -- equations ----------------------------------------------------------
  def equation(self, eqn, ins):
    name = eqn.primitive.name
    p = eqn.params
    if name in ("scan", "while", "cond"):
      return getattr(self, "_" + name)(eqn, ins)
    if name in _CALLS:
      sub = next((p[k] for k in _CALL_PARAMS if k in p), None)
      n_in = (len(sub.in_avals) if isinstance(sub, jax_core.ClosedJaxpr)
              else len(sub.invars) if isinstance(sub, jax_core.Jaxpr) else -1)
      if n_in == len(ins):
        return self.run_closed(sub, ins)
    outs = self.fresh_outs(eqn)
    handler = getattr(self, "_" + name, None)
    if name in _ELEMENTWISE:
      self._elementwise(eqn, ins, outs)
    elif name in _REDUCE or name == "reduce":
      self._reduce(eqn, ins, outs, p["axes" if "axes" in p else "dimensions"])
    elif name in _CUMULATIVE:
      self._keep_but(ins[0], outs[0], (p["axis"],), name)
    elif name.startswith("reduce_window"):
      self._window(eqn, ins, outs)
    elif handler is not None and name not in _CALLS:
      handler(eqn, ins, outs)
    else:
      for v in ins + outs:
        self.fix_value(v, f"primitive {name!r} is not traced through")
    return outs

  def _elementwise(self, eqn, ins, outs):
    out = outs[0]
    shape = self.shape(out)
    for v in ins:
      if v is None or not self.ndim(v):
        continue
      if self.ndim(v) == len(shape):
        self.tie_all(v, out)  # a size-1 axis broadcasts: tie() skips it
      else:
        self.fix_value(v, f"{eqn.primitive.name} of mismatched shapes")
        self.fix_value(out, f"{eqn.primitive.name} of mismatched shapes")
    for o in outs[1:]:
      self.tie_all(out, o)
    if eqn.primitive.name in _SAME_VALUE and ins[0] in self.t.origin:
      self.t.origin[out] = self.t.origin[ins[0]]

  def _keep_but(self, v, out, axes, why):
    for a in range(self.ndim(v)):
      if a in axes:
        self.t.fix(self.t.node(v, a), why)
        self.t.fix(self.t.node(out, a), why)
      else:
        self.tie_axes(v, a, out, a)

  def _reduce(self, eqn, ins, outs, axes):
    v = ins[0]
    kept = [a for a in range(self.ndim(v)) if a not in axes]
    for a in axes:
      self.t.fix(self.t.node(v, a), f"reduced by {eqn.primitive.name}")
    for o in outs:
      for i, a in enumerate(kept):
        self.tie_axes(v, a, o, i)

  def _window(self, eqn, ins, outs):
    p = eqn.params
    n = len(p["window_dimensions"])
    ones = (1,) * n
    pads = p.get("padding", ((0, 0),) * n)
    for v in ins:
      if v is None:
        continue
      for a in range(self.ndim(v)):
        plain = (p["window_dimensions"][a] == 1
                 and p["window_strides"][a] == 1
                 and tuple(pads[a]) == (0, 0)
                 and p.get("base_dilation", ones)[a] == 1
                 and p.get("window_dilation", ones)[a] == 1)
        for o in outs:
          if plain:
            self.tie_axes(v, a, o, a)
          else:
            self.t.fix(self.t.node(v, a), "windowed (pooling)")
            self.t.fix(self.t.node(o, a), "windowed (pooling)")

  def _dot_general(self, eqn, ins, outs):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    out = outs[0]
    for a, b in zip(lc, rc):
      self.tie_axes(lhs, a, rhs, b)
      self._contracted(lhs, a, rhs, b)
    k = 0
    for a, b in zip(lb, rb):
      self.tie_axes(lhs, a, rhs, b)
      self.tie_axes(lhs, a, out, k)
      k += 1
    for v, skip in ((lhs, set(lc) | set(lb)), (rhs, set(rc) | set(rb))):
      if v is None:
        continue
      for a in range(self.ndim(v)):
        if a not in skip:
          self.tie_axes(v, a, out, k)
          k += 1

  def _contracted(self, lhs, a, rhs, b):
    """Records which parameter axes read an activation through a
    contraction, or that two activations were contracted."""
    params = [(v, x) for v, x in ((lhs, a), (rhs, b))
              if v is not None and v in self.t.origin]
    for v, x in params:
      leaf, axes = self.t.origin[v]
      self.t.readers.add((leaf, axes[x]))
    if not params and lhs is not None:
      self.t.act_contracted.append(self.t.node(lhs, a))

  def _conv_general_dilated(self, eqn, ins, outs):
    p = eqn.params
    lhs, rhs = ins
    out = outs[0]
    dn = p["dimension_numbers"]
    groups, batch_groups = p["feature_group_count"], p["batch_group_count"]
    if batch_groups != 1 or lhs is None or rhs is None:
      for v in ins + outs:
        self.fix_value(v, "conv with batch_group_count > 1")
      return
    lb, lf, *ls = dn.lhs_spec
    ro, ri, *rs = dn.rhs_spec
    ob, of, *os_ = dn.out_spec
    self.tie_axes(lhs, lb, out, ob)
    for a in ls:
      self.t.fix(self.t.node(lhs, a), "conv spatial axis")
    for a in rs:
      self.t.fix(self.t.node(rhs, a), "conv kernel spatial axis")
    for a in os_:
      self.t.fix(self.t.node(out, a), "conv spatial axis")
    self.tie_axes(rhs, ro, out, of)
    if groups == 1:
      self.tie_axes(lhs, lf, rhs, ri)
      self._contracted(lhs, lf, rhs, ri)
      return
    # Grouped: input features (G, cin/G), output features (G, cout/G); the
    # group factors are tied, the per-group input factor is contracted with
    # the kernel's in-feature axis.
    t = self.t
    cin, cout = t.length[t.node(lhs, lf)], t.length[t.node(out, of)]
    g_in = t.new((groups, cin // groups))
    g_out = t.new((groups, cout // groups))
    t.factor(t.node(lhs, lf), [t.node(g_in, 0), t.node(g_in, 1)])
    t.factor(t.node(out, of), [t.node(g_out, 0), t.node(g_out, 1)])
    self.tie_axes(g_in, 0, g_out, 0)
    self.tie_axes(g_in, 1, rhs, ri)
    self._contracted(g_in, 1, rhs, ri)

  def _transpose(self, eqn, ins, outs):
    perm = eqn.params["permutation"]
    for i, a in enumerate(perm):
      self.tie_axes(ins[0], a, outs[0], i)
    if ins[0] in self.t.origin:
      leaf, axes = self.t.origin[ins[0]]
      self.t.origin[outs[0]] = (leaf, tuple(axes[a] for a in perm))

  def _broadcast_in_dim(self, eqn, ins, outs):
    if ins[0] is None:
      return
    for i, a in enumerate(eqn.params["broadcast_dimensions"]):
      self.tie_axes(ins[0], i, outs[0], a)

  def _squeeze(self, eqn, ins, outs):
    dims = set(a % self.ndim(ins[0]) for a in eqn.params["dimensions"])
    kept = [a for a in range(self.ndim(ins[0])) if a not in dims]
    for i, a in enumerate(kept):
      self.tie_axes(ins[0], a, outs[0], i)

  def _reshape(self, eqn, ins, outs):
    v, out = ins[0], outs[0]
    if eqn.params.get("dimensions") is not None or v is None:
      self.fix_value(v, "reshape with dimensions")
      self.fix_value(out, "reshape with dimensions")
      return
    src = [a for a in range(self.ndim(v)) if self.shape(v)[a] != 1]
    dst = [a for a in range(self.ndim(out)) if self.shape(out)[a] != 1]
    sv, so = self.shape(v), self.shape(out)
    i = j = 0
    while i < len(src) and j < len(dst):
      bi, bj = [src[i]], [dst[j]]
      pi, pj = sv[src[i]], so[dst[j]]
      while pi != pj:
        if pi < pj:
          i += 1
          bi.append(src[i])
          pi *= sv[src[i]]
        else:
          j += 1
          bj.append(dst[j])
          pj *= so[dst[j]]
      i += 1
      j += 1
      if len(bi) == 1 and len(bj) == 1:
        self.tie_axes(v, bi[0], out, bj[0])
      elif len(bi) == 1:
        self.t.factor(self.t.node(v, bi[0]), [self.t.node(out, b) for b in bj])
      elif len(bj) == 1:
        self.t.factor(self.t.node(out, bj[0]), [self.t.node(v, b) for b in bi])
      else:
        for a in bi:
          self.t.fix(self.t.node(v, a), "reshape mixing several axes")
        for b in bj:
          self.t.fix(self.t.node(out, b), "reshape mixing several axes")

  def _iota(self, eqn, ins, outs):
    self.fix_value(outs[0], "iota")

  def _gather(self, eqn, ins, outs):
    p = eqn.params
    dn = p["dimension_numbers"]
    op, idx = ins
    out = outs[0]
    excluded = set(dn.collapsed_slice_dims) | set(
        getattr(dn, "operand_batching_dims", ()))
    sliced = [a for a in range(self.ndim(op)) if a not in excluded]
    for a, o in zip(sliced, sorted(dn.offset_dims)):
      if a in dn.start_index_map or p["slice_sizes"][a] != self.shape(op)[a]:
        self.t.fix(self.t.node(op, a), "indexed by gather")
        self.t.fix(self.t.node(out, o), "indexed by gather")
      else:
        self.tie_axes(op, a, out, o)
    for a in excluded:
      self.t.fix(self.t.node(op, a), "indexed by gather")
    for o in range(self.ndim(out)):
      if o not in dn.offset_dims:
        self.t.fix(self.t.node(out, o), "gathered positions")
    self.fix_value(idx, "gather indices")

  def _full_or_fixed(self, v, out, full, why):
    for a in range(self.ndim(v)):
      if full[a]:
        self.tie_axes(v, a, out, a)
      else:
        self.t.fix(self.t.node(v, a), why)
        self.t.fix(self.t.node(out, a), why)

  def _slice(self, eqn, ins, outs):
    self._full_or_fixed(ins[0], outs[0], [
        a == b for a, b in zip(self.shape(ins[0]), self.shape(outs[0]))],
                        "sliced")

  def _dynamic_slice(self, eqn, ins, outs):
    self._slice(eqn, ins, outs)
    for v in ins[1:]:
      self.fix_value(v, "slice index")

  def _dynamic_update_slice(self, eqn, ins, outs):
    op, upd = ins[0], ins[1]
    full = [a == b for a, b in zip(self.shape(op), self.shape(upd))]
    self._full_or_fixed(op, outs[0], full, "updated in part")
    if upd is not None:
      self._full_or_fixed(upd, outs[0], full, "updated in part")
    for v in ins[2:]:
      self.fix_value(v, "slice index")

  def _pad(self, eqn, ins, outs):
    cfg = eqn.params["padding_config"]
    self._full_or_fixed(ins[0], outs[0], [tuple(c) == (0, 0, 0) for c in cfg],
                        "padded")

  def _rev(self, eqn, ins, outs):
    self._keep_but(ins[0], outs[0], tuple(eqn.params["dimensions"]),
                   "reversed")

  def _concatenate(self, eqn, ins, outs):
    d = eqn.params["dimension"]
    for v in ins:
      if v is not None:
        self._keep_but(v, outs[0], (d,), "concatenated along")

  def _split(self, eqn, ins, outs):
    d = eqn.params["axis"]
    for o in outs:
      self._keep_but(ins[0], o, (d,), "split along")

  def _sort(self, eqn, ins, outs):
    d = eqn.params["dimension"]
    for v, o in zip(ins, outs):
      self._keep_but(v, o, (d,), "sorted along")
      self.tie_all(ins[0], v)

  def _device_put(self, eqn, ins, outs):
    for v, o in zip(ins, outs):
      if v is not None:
        self.tie_all(v, o)
        if v in self.t.origin:
          self.t.origin[o] = self.t.origin[v]

  _optimization_barrier = _device_put

  # -- control flow -------------------------------------------------------
  def _tied_copy(self, v, like_var, shift=0):
    """A new value for an inner invar, tied to outer value ``v`` (its axes
    shifted by ``shift``: the scanned axis of a scan's xs)."""
    w = self.t.new(like_var.aval.shape)
    if v is not None:
      for a in range(self.ndim(w)):
        self.tie_axes(v, a + shift, w, a)
    return w

  def _scan(self, eqn, ins):
    p = eqn.params
    body = p["jaxpr"]
    nc, nk = p["num_consts"], p["num_carry"]
    inner = body.jaxpr.invars
    args = [self._tied_copy(v, var) for v, var in zip(ins[:nc + nk],
                                                      inner[:nc + nk])]
    for v, var in zip(ins[nc + nk:], inner[nc + nk:]):
      if v is not None:
        self.t.fix(self.t.node(v, 0), "scanned over")
      args.append(self._tied_copy(v, var, shift=1))
    res = self.run_closed(body, args)
    outs = self.fresh_outs(eqn)
    for k in range(nk):
      self.tie_all(res[k], args[nc + k])
      self.tie_all(res[k], outs[k])
    for r, o in zip(res[nk:], outs[nk:]):
      self.t.fix(self.t.node(o, 0), "scanned over")
      for a in range(self.ndim(r)):
        self.tie_axes(r, a, o, a + 1)
    return outs

  def _while(self, eqn, ins):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    carry = ins[cn + bn:]
    outs = self.fresh_outs(eqn)
    cvars = p["cond_jaxpr"].jaxpr.invars
    bvars = p["body_jaxpr"].jaxpr.invars
    cargs = [self._tied_copy(v, var) for v, var in zip(ins[:cn] + carry,
                                                       cvars)]
    for r in self.run_closed(p["cond_jaxpr"], cargs):
      self.fix_value(r, "while condition")
    bargs = [self._tied_copy(v, var) for v, var in
             zip(ins[cn:cn + bn] + carry, bvars)]
    res = self.run_closed(p["body_jaxpr"], bargs)
    for k, (r, o) in enumerate(zip(res, outs)):
      self.tie_all(r, bargs[bn + k])
      self.tie_all(r, o)
      self.tie_all(cargs[cn + k], o)
    return outs

  def _cond(self, eqn, ins):
    outs = self.fresh_outs(eqn)
    self.fix_value(ins[0], "cond index")
    for branch in eqn.params["branches"]:
      args = [self._tied_copy(v, var) for v, var in
              zip(ins[1:], branch.jaxpr.invars)]
      for r, o in zip(self.run_closed(branch, args), outs):
        self.tie_all(r, o)
    return outs


def _cuts(trace: _Trace) -> dict[int, list[int]]:
  """The atoms of every axis class: sorted strides ``[1, c1, ..., L]``
  where the class is split by reshapes (fixed point over the factor
  records); a class whose cuts do not nest is fixed with a single atom."""
  t = trace
  cuts: dict[int, set[int]] = {}

  def get(r):
    return cuts.setdefault(r, {1, t.length[r]})

  records = []
  for whole, parts in t.factors:
    sizes = [t.length[n] for n in parts]
    strides = [math.prod(sizes[k + 1:]) for k in range(len(sizes))]
    records.append((whole, list(zip(parts, strides, sizes))))
  changed = True
  while changed:
    changed = False
    for whole, parts in records:
      a = t.find(whole)
      ca = get(a)
      for part, s, f in parts:
        b = t.find(part)
        if a == b:  # an axis tied to a factor of itself
          t.fix(a, "reshapes whose factors do not nest")
          continue
        cb = get(b)
        new_a = {s * c for c in cb if s * c <= t.length[a]}
        new_b = {c // s for c in ca if s <= c <= s * f and c % s == 0}
        if not new_a <= ca or not new_b <= cb:
          ca |= new_a
          cb |= new_b
          changed = True
  out = {}
  for r, c in cuts.items():
    chain = sorted(c)
    if any(y % x for x, y in zip(chain, chain[1:])):
      t.fix(r, "reshapes whose factors do not nest")
      chain = [1, t.length[r]]
    out[r] = chain
  return out


def _atoms(chain):
  """``[(stride, size)]`` of a class from its sorted cut chain."""
  if len(chain) == 1 or chain == [1, 1]:
    return [(1, chain[-1])]
  return [(x, y // x) for x, y in zip(chain, chain[1:])]


def dependency_groups(apply_fn: Callable[..., Any], variables: PyTree,
                      example_x: Any) -> tuple[Group, ...]:
  """The groups of coupled parameter axes of ``apply_fn(variables, x)``.

  Traces ``apply_fn`` to a jaxpr (no computation runs) and ties axes as
  described in the module docstring.

  Args:
    apply_fn: ``apply_fn(variables, x) -> outputs`` (e.g. ``model.apply``
      of a Flax Linen module in eval mode, or a pure function).
    variables: the pytree passed as the first argument; every leaf (Flax
      ``params`` and ``batch_stats``) is a candidate member.
    example_x: an example input (any pytree; its values are not used).

  Returns:
    A tuple of :class:`Group`, one per set of coupled parameter axes, every
    axis of every leaf in exactly one group (a leaf axis split by a reshape,
    like a merged heads axis, is in one group per factor), ordered by the
    first leaf they touch.
  """
  leaves = trees.leaves_with_paths(variables)
  closed = jax.make_jaxpr(lambda v, x: apply_fn(v, x))(variables, example_x)
  jaxpr = closed.jaxpr
  t = _Trace()
  vis = _Visitor(t)
  n = len(leaves)
  args = []
  for i, var in enumerate(jaxpr.invars):
    v = t.new(var.aval.shape)
    if i < n:
      t.origin[v] = (i, tuple(range(len(var.aval.shape))))
    else:
      vis.fix_value(v, "tied to the input")
    args.append(v)
  leaf_values = args[:n]
  for out in vis.run_closed(closed, args):
    vis.fix_value(out, "tied to the output")
  chains = _cuts(t)

  # Level 2: atoms (class root, stride) joined through the factor records.
  atom_id: dict[tuple[int, int], int] = {}
  atom_len: list[int] = []
  atom_parent: list[int] = []

  def atoms_of(root):
    chain = chains.get(root, [1, t.length[root]])
    res = []
    for stride, size in _atoms(chain):
      key = (root, stride)
      if key not in atom_id:
        atom_id[key] = len(atom_parent)
        atom_parent.append(len(atom_parent))
        atom_len.append(size)
      res.append((stride, atom_id[key]))
    return res

  def afind(k):
    while atom_parent[k] != k:
      atom_parent[k] = atom_parent[atom_parent[k]]
      k = atom_parent[k]
    return k

  for whole, parts in t.factors:
    a = t.find(whole)
    sizes = [t.length[p] for p in parts]
    whole_atoms = dict(atoms_of(a))
    for k, part in enumerate(parts):
      s = math.prod(sizes[k + 1:])
      b = t.find(part)
      for stride, aid in atoms_of(b):
        other = whole_atoms.get(stride * s)
        if other is None or atom_len[other] != atom_len[aid]:
          t.fix(a, "reshapes whose factors do not nest")
          t.fix(b, "reshapes whose factors do not nest")
          continue
        x, y = afind(other), afind(aid)
        if x != y:
          atom_parent[max(x, y)] = min(x, y)

  # Per atom group: members, readers, contracted activations, reason.
  contracted = set()
  for node in t.act_contracted:
    for _, aid in atoms_of(t.find(node)):
      contracted.add(afind(aid))
  members: dict[int, list] = {}
  readers: dict[int, list] = {}
  for i, (path, _) in enumerate(leaves):
    v = leaf_values[i]
    for axis in range(vis.ndim(v)):
      root = t.find(t.node(v, axis))
      for stride, aid in atoms_of(root):
        g = afind(aid)
        m = Member(path, axis, stride)
        members.setdefault(g, []).append((i, axis, -stride, m))
        if (i, axis) in t.readers:
          readers.setdefault(g, []).append(m)
  atom_reason: dict[int, str] = {}
  for (root, _), aid in atom_id.items():
    why = t.reason[t.find(root)]
    if why:
      atom_reason.setdefault(afind(aid), why)
  groups = []
  for g, ms in members.items():
    ms.sort(key=lambda x: x[:3])
    why = atom_reason.get(g, "")
    groups.append((ms[0][:3], Group(
        members=tuple(m for *_, m in ms), size=atom_len[g],
        removable=not why, reason=why,
        readers=() if g in contracted else tuple(readers.get(g, ())))))
  groups.sort(key=lambda x: x[0])
  return tuple(g for _, g in groups)


def _unit_view(shape, member: Member, size: int):
  """``(before, outer, size, stride, after)``: the member's axis viewed
  as ``(outer, size, stride)``."""
  length = shape[member.axis]
  outer = length // (size * member.stride)
  return (math.prod(shape[:member.axis]), outer, size, member.stride,
          math.prod(shape[member.axis + 1:]))


def _alive_units(array, member: Member, size: int) -> np.ndarray:
  x = np.asarray(array).reshape(_unit_view(np.shape(array), member, size))
  return np.any(x != 0, axis=(0, 1, 3, 4))


def _full_masks(variables, masks):
  """``masks`` in the layout of ``variables`` (None where unmasked); masks
  over ``variables["params"]`` (what ``fj.get_masks`` gives for a Flax
  model trained on its params) are accepted too."""
  is_none = lambda x: x is None  # pylint: disable=unnecessary-lambda-assignment
  target = jax.tree.structure(variables)
  got = jax.tree.structure(masks, is_leaf=is_none)
  if got == target:
    return masks
  if (isinstance(variables, dict) and "params" in variables
      and got == jax.tree.structure(variables["params"])):
    full = {k: jax.tree.map(lambda _: None, v) for k, v in variables.items()}
    full["params"] = masks
    return full
  raise ValueError(
      f"masks: has structure {got}, which is neither that of variables "
      f"({target}) nor that of variables['params']; pass a mask tree with "
      "None at the unmasked leaves (e.g. fj.get_masks(state)).")


def compact(apply_fn: Callable[..., Any], variables: PyTree, example_x: Any,
            masks: PyTree | None = None) -> Compacted:
  """Deletes the removable units that contribute nothing; a smaller model.

  For every removable group of :func:`dependency_groups` with readers, unit
  ``j`` is deleted when its slice is zero in every reader (in the masked
  variables: ``variables`` with the False entries of ``masks`` set to 0, or
  ``variables`` themselves when ``masks`` is None); it is then deleted from
  every member of the group (kernels, biases, BatchNorm scale, offset,
  mean and variance, the next layer's input rows). A group keeps at least
  one unit, so no leaf becomes empty. The result computes what the masked
  model computes (up to float rounding of the shorter sums):

      apply_fn(compact(...).variables, x) ≈ apply_fn(masked variables, x)

  A pure function runs on the compacted variables as it is; a Flax module
  must be rebuilt at the new widths: the models of :mod:`flipout_jax.models`
  take ``layer_widths=result.widths``; for your own Linen or NNX module,
  build it with the feature counts read from ``result.widths`` (or
  ``result.shapes``) and load ``result.variables`` into it.

  Args:
    apply_fn: ``apply_fn(variables, x) -> outputs``, as for
      :func:`dependency_groups`.
    variables: the model's variables.
    example_x: an example input.
    masks: optional mask tree (True = alive) over ``variables`` or, for a
      Flax ``{"params": ...}`` dict, over ``variables["params"]``; None at
      unmasked leaves.

  Returns:
    :class:`Compacted` (variables, widths, shapes, groups, kept units).

  Raises:
    ValueError: if ``masks`` fits neither ``variables`` nor its params.
  """
  groups = dependency_groups(apply_fn, variables, example_x)
  if masks is not None:
    variables = trees.apply_masks(variables, _full_masks(variables, masks))
  flat = dict(trees.leaves_with_paths(variables))
  kept = []
  for g in groups:
    alive = np.ones(g.size, bool)
    if g.removable and g.readers:
      alive = np.zeros(g.size, bool)
      for m in g.readers:
        alive |= _alive_units(flat[m.path], m, g.size)
      if not alive.any():
        alive[0] = True
    kept.append(np.flatnonzero(alive))
  # Every (leaf, axis): its atoms outer to inner, each with its kept units.
  axes: dict[tuple[str, int], list] = {}
  for g, keep in zip(groups, kept):
    for m in g.members:
      axes.setdefault((m.path, m.axis), []).append((m.stride, g.size, keep))

  def shrink(path, x):
    x = np.asarray(x)
    for axis in range(x.ndim):
      atoms = sorted(axes.get((path, axis), []), key=lambda a: -a[0])
      if all(len(k) == n for _, n, k in atoms):
        continue
      shape = x.shape
      y = x.reshape(shape[:axis] + tuple(n for _, n, _ in atoms)
                    + shape[axis + 1:])
      for k, (_, _, keep) in enumerate(atoms):
        y = np.take(y, keep, axis=axis + k)
      x = y.reshape(shape[:axis] + (-1,) + shape[axis + 1:])
    return jnp.asarray(x)

  paths_leaves = trees.leaves_with_paths(variables)
  new_leaves = [shrink(path, x) for path, x in paths_leaves]
  new_vars = jax.tree.unflatten(jax.tree.structure(variables), new_leaves)
  # Flax Linen variables: the first segment is the collection.
  linen = isinstance(variables, Mapping) and "params" in variables
  shapes, widths = {}, {}
  for (path, _), x in zip(paths_leaves, new_leaves):
    shapes[path] = tuple(x.shape)
    parts = path.split("/")[1:] if linen else path.split("/")
    if len(parts) >= 2 and parts[-1] in ("kernel", "embedding"):
      widths["/".join(parts[:-1])] = int(x.shape[-1])
  return Compacted(new_vars, widths, shapes, tuple(groups), tuple(kept))
