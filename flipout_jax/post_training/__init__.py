"""Post-training (one-shot, calibration-data) sparsity: one entry point.

    from flipout_jax import post_training
    result = post_training.prune(
        lambda v, x: model.apply(v, x, train=False), variables, calib_x,
        sparsity=0.5, method="sparsegpt")  # "wanda", "magnitude", "unipts"
    result.variables     # the sparse variables (pruned weights exactly 0.0)
    result.sparsities    # {"fc1/kernel": 0.5, ...}
    result.report        # per layer: count, relative reconstruction error

Layers are pruned **sequentially** in the order the forward pass uses them:
the calibration inputs of each layer are computed through the layers pruned
before it (:mod:`.capture` finds them in the model's jaxpr: Dense-like
``dot_general`` kernels and convolutions, any model library). The methods
(:mod:`.solvers`) are magnitude, Wanda and SparseGPT; ``structure=
fj.n_m(n, m)`` gives N:M (groups along each kernel's input features).

``structure=fj.coupled(groups)`` (magnitude and Wanda) prunes whole
dependency groups (:func:`flipout_jax.dependency_groups`), all layers at
once: a unit's score is the structure's ``reduce`` (``"l2"``: the L2 norm)
of ``|W|`` (magnitude) or of Wanda's ``|W_ij|·‖X_i‖`` (the dense model's
calibration activations) over its entries in every prunable member (a
layer's output column *and* the next layer's input row); ``allocation``
``"uniform"`` keeps ``n − round(S·n)`` units of every group, ``"global"``
(magnitude) ranks all groups' units together; every group keeps at least
``min_per_layer``. :func:`flipout_jax.compact` then removes exactly the
pruned units. SparseGPT's per-column error compensation updates the kept
weights of one layer; it is not defined for units that span layers (a
ValueError naming ``structure``), nor is OWL's per-layer allocation.

Allocation of the per-layer sparsities ``S_l``:

* ``"uniform"``: ``S_l = S``, each layer prunes ``round(S·n_l)``;
* ``"global"`` (magnitude only): one ranking of every prunable ``|W|``;
* ``"owl"`` (Yin et al. 2023): ``D_l``, the fraction of layer l's Wanda
  scores (on the dense model) above ``owl_threshold`` × their mean, sets
  ``S_l = S − κ·(t_l − t̄)``, ``t_l = (D_l − min D)/(max D − min D)`` and
  ``t̄`` its mean weighted by the layer sizes ``n_l``, ``κ = min(2λ,
  λ / max|t_l − t̄|)`` (the reference's spread ``2λ``, shrunk only when
  needed to stay in ``[S − λ, S + λ]``), ``λ = owl_lambda``; then the
  global count ``round(S·N)`` is split over the layers (:func:`split_count`:
  largest remainders, a layer capped at ``n_l − 1`` pruned, what it cannot
  take going to the others), so it is exact.

``method="unipts"`` runs :func:`flipout_jax.unipts.run` behind the same
entry point (``allocation="search"``: its genetic search; ``"uniform"``: P
in every layer; ``unipts_kw``: its other arguments; ``structure=fj.n_m``:
``1 − n/m`` in every layer, no search, N:M masks through the sparse
training) and returns the same :class:`PostTrainingResult` fields.

**Batches and sharding.** ``batch_size=b`` sums each layer's statistics
over batches of ``b`` examples. Under ``jax.sharding`` (GSPMD / auto mesh
axes; tested on a 2 × 2 ("data", "model") CPU mesh with the calibration
batch over "data" and the kernels over their outputs) nothing is gathered
by this code; what XLA exchanges (``tests/post_training_sharding_worker.py``
records it): the statistics gather the features of each device's own batch
shard and all-reduce ``‖X_i‖²`` and ``XᵀX`` over the batch; SparseGPT
gathers the ``in × in`` Gram matrix (its Cholesky factor needs all of it)
and solves each device's output columns there, the kernel staying sharded;
Wanda gathers the ``[in]`` norms only; per-layer magnitude all-reduces the
top-k's integer histogram. On meshes of explicit axes
(``AxisType.Explicit``; call inside ``jax.set_mesh``) every method, N:M and
``batch_size`` run (tested equal to one device): the statistics reshard
``X`` to ``[batch@data, in]`` (each example's features gathered once) and
return ``XᵀX`` and ``‖X_i‖²`` replicated (all-reduced over the batch, the
norms gathered), so the solves exchange nothing (per-layer magnitude: its
histogram); a batch the batch axes do not divide is replicated along them.

BatchNorm statistics are not recalibrated here
(:func:`flipout_jax.unipts.recalibrate_batch_stats` does it). Leaves the
default filter selects but no product uses as a weight (embedding tables)
are left dense and listed in ``report["dense"]``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flipout_jax import selection
from flipout_jax import structure as structure_lib
from flipout_jax import trees
from flipout_jax import validate
from flipout_jax.post_training import capture
from flipout_jax.post_training import solvers

PyTree = Any
METHODS = ("magnitude", "wanda", "sparsegpt", "unipts")
ALLOCATIONS = ("uniform", "global", "owl", "search")


class PostTrainingResult(NamedTuple):
  """What :func:`prune` returns.

  Attributes:
    variables: ``variables`` with the pruned kernels (exact zeros; SparseGPT
      also updates the kept weights).
    masks: bool, params-shaped, True = kept; None at leaves not pruned.
    sparsities: ``{path: achieved sparsity}`` of every pruned layer.
    report: ``{"layers": {path: {...}}, "order": [...], "dense": [...]}``.
  """
  variables: PyTree
  masks: PyTree
  sparsities: dict[str, float]
  report: dict[str, Any]


def _vector(value, name: str, length: int | None = None) -> np.ndarray:
  """``value`` as a finite 1-D float64 array (of ``length`` if given)."""
  try:
    a = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: must be a 1-D sequence of numbers, got "
                     f"{value!r}.") from None
  if a.ndim != 1 or not np.all(np.isfinite(a)):
    raise ValueError(f"{name}: must be a 1-D sequence of finite numbers, got "
                     f"{value!r}.")
  if length is not None and a.size != length:
    raise ValueError(f"{name}: must have one entry per layer ({length}, as "
                     f"sizes), got {a.size}.")
  return a


def _sizes(sizes, name: str = "sizes", low: int = 0) -> np.ndarray:
  """Layer sizes: a non-empty 1-D sequence of ints >= ``low``."""
  a = _vector(sizes, name)
  if a.size == 0 or np.any(a != np.round(a)) or np.any(a < low):
    raise ValueError(f"{name}: must be a non-empty 1-D sequence of ints >= "
                     f"{low} (weights per layer), got {sizes!r}.")
  return a.astype(np.int64)


def owl_sparsities(outlier_ratios, sizes, sparsity: float,
                   lam: float = 0.08) -> np.ndarray:
  """OWL's layer sparsities (module docstring), before integer counts.

  Args:
    outlier_ratios: ``D_l`` per layer, numbers in [0, 1].
    sizes: ``n_l`` per layer, ints >= 1.
    sparsity: the target ``S`` in [0, 1).
    lam: ``λ`` in [0, 1).
  """
  n = _sizes(sizes, low=1)
  d = _vector(outlier_ratios, "outlier_ratios", len(n))
  if np.any((d < 0) | (d > 1)):
    raise ValueError("outlier_ratios: must be fractions in [0, 1], got "
                     f"{outlier_ratios!r}.")
  sparsity = validate.sparsity(sparsity)
  lam = validate.number(lam, "lam", low=0, high=1, high_open=True)
  span = d.max() - d.min()
  if span <= 0:
    return np.full(len(d), float(sparsity))
  t = (d - d.min()) / span
  centred = t - np.sum(n * t) / np.sum(n)
  kappa = min(2 * lam, lam / np.max(np.abs(centred)))
  return sparsity - kappa * centred


def split_count(total: int, sparsities, sizes) -> np.ndarray:
  """Integer counts ``k_l`` near ``S_l·n_l`` summing to ``total`` exactly.

  Each layer prunes at most ``n_l − 1`` (one weight stays) and at least 0:
  what a layer cannot take (``S_l`` near 1, e.g. OWL's ``S + λ`` at a high
  ``S``) goes to the others in proportion to their room; the last units by
  largest remainders (ties: the earlier layer).

  Args:
    total: the global count, an int in ``[0, Σ (n_l − 1)]``.
    sparsities: ``S_l`` per layer (finite; clipped to what a layer holds).
    sizes: ``n_l`` per layer, ints >= 0.
  """
  sizes = _sizes(sizes)
  want = _vector(sparsities, "sparsities", len(sizes))
  cap = np.maximum(sizes - 1, 0)
  total = validate.integer(total, "total", low=0, high=int(cap.sum()))
  want = np.clip(want * sizes, 0, cap)
  excess = total - want.sum()
  if excess > 0:  # room left in the layers below their cap
    want = want + excess * (cap - want) / max((cap - want).sum(), 1e-300)
  elif excess < 0:
    want = want + excess * want / max(want.sum(), 1e-300)
  k = np.minimum(np.floor(want + 1e-9).astype(np.int64), cap)
  rest = total - int(k.sum())
  order = [i for i in np.argsort(-(want - k), kind="stable") if k[i] < cap[i]]
  for i in order[:max(rest, 0)]:
    k[i] += 1
  return k


def check_arguments(method, allocation, structure, sparsity):
  """``(method, allocation, n_m, sparsity)`` checked (:func:`prune`'s)."""
  method = validate.choice(method, "method", METHODS)
  allocation = validate.choice(allocation, "allocation", ALLOCATIONS)
  structure = structure_lib.check(structure)
  if allocation == "global" and method != "magnitude":
    raise ValueError("allocation: 'global' ranks weights across layers, "
                     "which only 'magnitude' does; use 'uniform' or 'owl'.")
  if method == "unipts" and allocation not in ("uniform", "search"):
    raise ValueError(f"allocation: 'unipts' takes 'uniform' (P in every "
                     "layer) or 'search' (its genetic search of the layer "
                     f"sparsities), got {allocation!r}.")
  if allocation == "search" and method != "unipts":
    raise ValueError("allocation: 'search' is UniPTS's genetic search "
                     "(method='unipts'); use 'uniform', 'owl' or, for "
                     "magnitude, 'global'.")
  n_m = None
  if structure.kind == "coupled":
    if method not in ("magnitude", "wanda"):
      raise ValueError(
          f"structure: fj.coupled (whole dependency groups) is defined for "
          f"method 'magnitude' and 'wanda', not {method!r}" + (
              ": SparseGPT's per-column error compensation updates the kept "
              "weights of one layer and is not defined for units that span "
              "several layers." if method == "sparsegpt" else "."))
    if allocation not in ("uniform", "global"):
      raise ValueError(f"allocation: fj.coupled counts units; use 'uniform' "
                       f"or (magnitude) 'global', got {allocation!r}.")
  elif structure.kind == "n_m":
    o = structure.options
    if o["axis"] != -2:
      raise ValueError("structure: post-training N:M groups run along the "
                       "kernel's input features (fj.n_m(..., axis=-2)).")
    n_m = (o["n"], o["m"])
    if allocation != "uniform":
      raise ValueError("allocation: N:M fixes every layer's sparsity; use "
                       "'uniform'.")
    if sparsity is None:
      sparsity = 1 - o["n"] / o["m"]
    elif abs(sparsity - (1 - o["n"] / o["m"])) > 1e-9:
      raise ValueError(f"sparsity: {structure.name} is {1 - o['n'] / o['m']:g}"
                       f" sparse; got {sparsity}.")
  elif structure.kind != "unstructured":
    raise ValueError(f"structure: {structure.name} is not supported by "
                     f"method {method!r} (unstructured" +
                     (", fj.n_m)." if method == "unipts" else ", fj.n_m or "
                      "fj.coupled)."))
  return method, allocation, n_m, validate.sparsity(sparsity)


def _calibration(calibration_x, batch_size):
  """The calibration set as a list of batches (pytrees) of ``batch_size``
  examples along the leading axis (the last one shorter)."""
  leaves = jax.tree.leaves(calibration_x)
  shapes = [np.shape(a) for a in leaves]
  if not leaves or any(len(s) < 1 for s in shapes) or len(
      {s[0] for s in shapes}) != 1 or shapes[0][0] == 0:
    raise ValueError(
        "calibration_x: must be an array (or a pytree of arrays) with the "
        f"examples along a shared, non-empty leading axis; got shapes "
        f"{shapes}.")
  n = shapes[0][0]
  if batch_size is None:
    return [calibration_x]
  b = validate.integer(batch_size, "batch_size", low=1)
  return [jax.tree.map(lambda a, i=i: capture.take(a, i, b), calibration_x)
          for i in range(0, n, b)]


def _check_common(apply_fn, variables, filter_fn, seed, unipts_kw):
  if not callable(apply_fn):
    raise ValueError("apply_fn: must be a callable (variables, x) -> "
                     f"outputs, got {type(apply_fn).__name__}.")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables: must be a mapping with a 'params' "
                     f"collection, got {type(variables).__name__}" + (
                         f" with keys {list(variables)}"
                         if isinstance(variables, Mapping) else "") + ".")
  validate.optional_callable(filter_fn, "filter_fn")
  validate.integer(seed, "seed", low=0, high=validate.SEED_MAX)
  if unipts_kw is not None and not isinstance(unipts_kw, Mapping):
    raise ValueError("unipts_kw: must be None or a dict of fj.unipts.run "
                     f"arguments, got {type(unipts_kw).__name__}.")
  own = sorted(set(unipts_kw or {}) & {"sparsity", "seed", "search",
                                        "filter_fn", "structure"})
  if own:
    raise ValueError(f"unipts_kw: {own[0]!r} is an argument of prune itself "
                     "(search: allocation='search').")


def _unipts(apply_fn, variables, calibration_x, sparsity, allocation,
            structure, filter_fn, seed, unipts_kw) -> PostTrainingResult:
  """``method="unipts"``: :func:`flipout_jax.unipts.run`, same result shape."""
  from flipout_jax import unipts  # pylint: disable=g-import-not-at-top
  r = unipts.run(apply_fn, variables, calibration_x, sparsity=sparsity,
                 seed=seed, search=allocation == "search",
                 filter_fn=filter_fn, structure=structure,
                 **dict(unipts_kw or {}))
  report = dict(r.report, method="unipts", allocation=allocation)
  return PostTrainingResult(r.variables, r.masks, dict(r.sparsities), report)


def prune(apply_fn: Callable[..., Any], variables: PyTree,
          calibration_x: Any, *, sparsity: float | None,
          method: str = "wanda", structure=None, allocation: str = "uniform",
          seed: int = 0, batch_size: int | None = None,
          filter_fn: Callable | None = None, block_size: int = 128,
          dampening: float = 0.01, owl_threshold: float = 5.0,
          owl_lambda: float = 0.08,
          unipts_kw: Mapping[str, Any] | None = None) -> PostTrainingResult:
  """Prunes ``variables["params"]`` once, layer by layer (module docstring).

  Args:
    apply_fn: ``(variables, x) -> outputs`` in evaluation mode. For
      ``"unipts"`` it is passed to :func:`flipout_jax.unipts.run` as is: a
      Linen ``model.apply`` (called with ``train=``), which a model with
      BatchNorm needs; a ``(variables, x)`` function serves a BN-free one.
    variables: ``{"params": ..., other collections}``.
    calibration_x: the calibration inputs, examples along the leading axis
      (an array or a pytree of arrays); may be sharded (module docstring).
    sparsity: the target ``S`` in [0, 1) (None with ``fj.n_m``: 1 − n/m).
    method: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"`` or ``"unipts"``.
    structure: None / ``fj.unstructured()``, ``fj.n_m(n, m)`` (with
      ``"unipts"``: allocation ``"uniform"``, the pattern kept through its
      sparse training) or ``fj.coupled(groups)`` (``"magnitude"``,
      ``"wanda"``; allocation ``"uniform"`` or ``"global"``; ``sparsity``
      is then the fraction of units removed).
    allocation: ``"uniform"``, ``"global"`` (magnitude), ``"owl"``
      (magnitude, wanda, sparsegpt) or ``"search"`` (unipts: its genetic
      search; ``"uniform"`` there is its search-free baseline, P in every
      layer, sparse training still run).
    seed: an int >= 0; seeds UniPTS (the one-shot methods are
      deterministic and ignore it).
    batch_size: None (the whole calibration set in one forward pass) or
      an int >= 1: the layer statistics (Wanda's ``‖X_i‖²``, SparseGPT's
      ``XᵀX``) are summed over batches of that many examples; the same
      result up to float32 summation order. Not with ``"unipts"`` (its
      batch sizes are ``unipts_kw`` fields).
    filter_fn: ``(path, leaf) -> bool``, which leaves to prune (default:
      float kernels with ndim >= 2 that a product uses as its weight).
    block_size: SparseGPT's column block ``B``, an int >= 1.
    dampening: SparseGPT's ``λ`` (of the mean of diag H), >= 0.
    owl_threshold: OWL's ``M``, > 0.
    owl_lambda: OWL's ``λ``, in [0, 1).
    unipts_kw: ``"unipts"`` only: further :func:`flipout_jax.unipts.run`
      arguments (``calibration_y``, ``config``, ``log_fn``, any
      ``UniPTSConfig`` field such as ``epochs``).

  Returns:
    A :class:`PostTrainingResult`.

  Raises:
    ValueError: naming the argument, for bad values; for a layer the
      structure cannot hold; for a ``filter_fn`` leaf no product uses.
  """
  method, allocation, n_m, sparsity = check_arguments(
      method, allocation, structure, sparsity)
  structure = structure_lib.check(structure)
  _check_common(apply_fn, variables, filter_fn, seed, unipts_kw)
  batches = _calibration(calibration_x, batch_size)
  block_size = validate.integer(block_size, "block_size", low=1)
  dampening = validate.number(dampening, "dampening", low=0)
  owl_threshold = validate.number(owl_threshold, "owl_threshold", low=0,
                                  low_open=True)
  owl_lambda = validate.number(owl_lambda, "owl_lambda", low=0, high=1,
                               high_open=True)
  if method == "unipts":
    if batch_size is not None:
      raise ValueError("batch_size: not used by 'unipts'; set its "
                       "eval_batch_size / bn_batch_size / batch_size in "
                       "unipts_kw.")
    return _unipts(apply_fn, variables, calibration_x, sparsity, allocation,
                   structure, filter_fn, seed, unipts_kw)
  if unipts_kw is not None:
    raise ValueError(f"unipts_kw: only for method='unipts', not {method!r}.")
  if n_m is not None and method == "sparsegpt" and block_size % n_m[1]:
    raise ValueError(f"block_size: must be a multiple of m={n_m[1]} "
                     f"({structure.name}), got {block_size}.")
  params = variables["params"]
  flat = dict(trees.leaves_with_paths(params))
  paths = list(flat)

  def fn(p, xb):
    return apply_fn({**variables, "params": p}, xb)

  model = capture.Model(fn, params, paths)  # traced once per batch type
  used = model.usage_order(params, batches[0])
  order, dense = capture.prunable_order(None, params, filter_fn, used=used)
  skipped = []
  if n_m is not None:
    ok = []
    views = model.views(params, batches[0], order)
    for p in order:
      last = views[p].last_in
      if last % n_m[1]:
        if not structure.options["skip_incompatible"]:
          raise ValueError(
              f"structure: layer {p!r} has {last} input features (channels)"
              f", not divisible by m={n_m[1]}; pass fj.n_m(..., "
              "skip_incompatible=True) to leave it dense.")
        skipped.append(p)
      else:
        ok.append(p)
    order = ok
  sizes = np.array([flat[p].size for p in order], np.int64)

  if allocation == "owl":
    ratios = []
    dense_stats = model.statistics(order, gram=False)
    for p in order:
      view, sq, _ = dense_stats(params, batches, p)
      s = jnp.abs(view.to_matrix(flat[p]).astype(jnp.float32)) * jnp.sqrt(
          sq)[:, None]
      ratios.append(float(jnp.mean(s > owl_threshold * jnp.mean(s))))
    layer_s = owl_sparsities(ratios, sizes, sparsity, owl_lambda)
    total = int(round(sparsity * sizes.sum()))
    counts = split_count(min(total, int(np.maximum(sizes - 1, 0).sum())),
                         layer_s, sizes)
  else:
    ratios = None
    counts = np.round(sparsity * sizes).astype(np.int64)

  new = dict(flat)
  masks = {}
  layers = {}
  if structure.kind == "coupled":
    masks = _coupled_masks(structure, method, allocation, model, params, flat,
                           order, batches, sparsity)
  elif allocation == "global":
    scores = [jnp.abs(flat[p].astype(jnp.float32)) for p in order]
    masks = dict(zip(order, selection.top_k_masks(
        scores, [list(range(len(order)))],
        jnp.asarray([int(sizes.sum() - round(sparsity * sizes.sum()))]))))
  for p, m in masks.items():
    new[p] = jnp.where(m, flat[p], 0).astype(flat[p].dtype)
  stats = model.statistics(order, gram=True)
  for i, p in enumerate([] if masks else order):
    current = trees_unflatten(params, paths, new)
    view, sq, gram = stats(current, batches, p)
    w2 = view.to_matrix(new[p])
    k = int(counts[i])
    if method == "magnitude":
      m2, w2_new = (solvers.magnitude(w2, k) if n_m is None else
                    solvers.wanda(w2, jnp.ones_like(sq), n_m=n_m))
    elif method == "wanda":
      m2, w2_new = solvers.wanda(w2, sq, k, n_m=n_m)
    else:
      m2, w2_new = solvers.sparsegpt(w2, gram, k, n_m=n_m, block=block_size,
                                     dampening=dampening)
    diff = (w2.astype(jnp.float32) - w2_new.astype(jnp.float32))
    err = float(jnp.sum(diff * (gram @ diff)) /
                jnp.maximum(jnp.sum(w2 * (gram @ w2.astype(jnp.float32))),
                            1e-30))
    shape = flat[p].shape
    masks[p] = view.from_matrix(m2, shape)
    new[p] = view.from_matrix(w2_new, shape).astype(flat[p].dtype)
    layers[p] = {"pruned": int(m2.size - jnp.sum(m2)), "size": int(m2.size),
                 "relative_error": err}
  sparsities = {p: 1.0 - float(jnp.mean(masks[p])) for p in order}
  for p in order:
    layers.setdefault(p, {"pruned": int(masks[p].size - jnp.sum(masks[p])),
                          "size": int(masks[p].size)})
    layers[p]["sparsity"] = sparsities[p]
  report = {"method": method, "allocation": allocation, "order": order,
            "layers": layers, "skipped": skipped,
            "dense": dense,
            "outlier_ratios": None if ratios is None else dict(zip(order, ratios))}
  out_vars = {**variables, "params": trees_unflatten(params, paths, new)}
  mask_tree = trees_unflatten(params, paths, {p: masks.get(p) for p in paths})
  return PostTrainingResult(out_vars, mask_tree, sparsities, report)


def _coupled_masks(structure, method, allocation, model, params, flat, order,
                   batches, sparsity) -> dict:
  """``{path: mask}`` of whole dependency groups (``structure=fj.coupled``).

  A group spans several layers, so every layer is selected at once (not
  sequentially): the per-weight score ``|W_ij|`` (magnitude) or Wanda's
  ``|W_ij|·‖X_i‖`` (``X_i`` the layer's input feature ``i`` on the dense
  model's calibration activations) is reduced (the structure's ``reduce``)
  over every prunable entry of a unit, and the structure keeps ``n −
  round(S·n)`` units of each group (``"uniform"``) or of all groups ranked
  together (``"global"``), at least ``min_per_layer`` per group.
  """
  lay = structure.layout(order, [flat[p].shape for p in order])
  scores = []
  stats = model.statistics(order, gram=False) if method == "wanda" else None
  for p in order:
    s = jnp.abs(flat[p].astype(jnp.float32))
    if stats is not None:
      view, sq, _ = stats(params, batches, p)
      s = view.from_matrix(view.to_matrix(s) * jnp.sqrt(sq)[:, None],
                           s.shape)
    scores.append(s)
  groups, table = structure.budget(allocation, lay, (sparsity,), sparsity)
  # One program (eager, the selection compiles ~200 small ones).
  kept = jax.jit(lambda sc, keep: structure.shrink(
      lay, [jnp.ones(x.shape, jnp.bool_) for x in sc], sc, groups, keep))(
          scores, table[0])
  return dict(zip(order, kept))


def trees_unflatten(template: PyTree, paths: list[str], values: dict):
  """``template`` with the leaf at each path replaced by ``values[path]``."""
  leaves, treedef = jax.tree.flatten(template)
  del leaves
  return jax.tree.unflatten(treedef, [values[p] for p in paths])
