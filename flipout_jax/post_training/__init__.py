"""Post-training (one-shot, calibration-data) sparsity: one entry point.

    from flipout_jax import post_training
    result = post_training.prune(
        lambda v, x: model.apply(v, x, train=False), variables, calib_x,
        sparsity=0.5, method="sparsegpt")            # or "wanda", "magnitude"
    result.variables     # the sparse variables (pruned weights exactly 0.0)
    result.sparsities    # {"fc1/kernel": 0.5, ...}
    result.report        # per layer: count, relative reconstruction error

Layers are pruned **sequentially** in the order the forward pass uses them:
the calibration inputs of each layer are computed through the layers pruned
before it (:mod:`.capture` finds them in the model's jaxpr: Dense-like
``dot_general`` kernels and convolutions, any model library). The methods
(:mod:`.solvers`) are magnitude, Wanda and SparseGPT; ``structure=
fj.n_m(n, m)`` gives N:M (groups along each kernel's input features).

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

BatchNorm statistics are not recalibrated here
(:func:`flipout_jax.unipts.recalibrate_batch_stats` does it). Leaves the
default filter selects but no product uses as a weight (embedding tables)
are left dense and listed in ``report["dense"]``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

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
METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "global", "owl")


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


def owl_sparsities(outlier_ratios, sizes, sparsity: float,
                   lam: float = 0.08) -> np.ndarray:
  """OWL's layer sparsities (module docstring), before integer counts."""
  d = np.asarray(outlier_ratios, np.float64)
  n = np.asarray(sizes, np.float64)
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
  """
  sizes = np.asarray(sizes, np.int64)
  cap = np.maximum(sizes - 1, 0)
  want = np.clip(np.asarray(sparsities, np.float64) * sizes, 0, cap)
  total = int(min(max(int(total), 0), cap.sum()))
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
  n_m = None
  if structure.kind == "n_m":
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
    raise ValueError(f"structure: {structure.name} is not supported by the "
                     "post-training methods (unstructured or fj.n_m).")
  return method, allocation, n_m, validate.sparsity(sparsity)


def prune(apply_fn: Callable[..., Any], variables: PyTree,
          calibration_x: Any, *, sparsity: float | None,
          method: str = "wanda", structure=None, allocation: str = "uniform",
          filter_fn: Callable | None = None, block_size: int = 128,
          dampening: float = 0.01, owl_threshold: float = 5.0,
          owl_lambda: float = 0.08) -> PostTrainingResult:
  """Prunes ``variables["params"]`` once, layer by layer (module docstring).

  Args:
    apply_fn: ``(variables, x) -> outputs`` in evaluation mode.
    variables: ``{"params": ..., other collections}``.
    calibration_x: the calibration inputs (one batch).
    sparsity: the target ``S`` in [0, 1) (None with ``fj.n_m``: 1 − n/m).
    method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
    structure: None / ``fj.unstructured()`` or ``fj.n_m(n, m)``.
    allocation: ``"uniform"``, ``"global"`` (magnitude) or ``"owl"``.
    filter_fn: ``(path, leaf) -> bool``, which leaves to prune (default:
      float kernels with ndim >= 2 that a product uses as its weight).
    block_size: SparseGPT's column block ``B``.
    dampening: SparseGPT's ``λ`` (of the mean of diag H).
    owl_threshold, owl_lambda: OWL's ``M`` and ``λ``.

  Returns:
    A :class:`PostTrainingResult`.

  Raises:
    ValueError: naming the argument, for bad values; for a layer the
      structure cannot hold; for a ``filter_fn`` leaf no product uses.
  """
  method, allocation, n_m, sparsity = check_arguments(
      method, allocation, structure, sparsity)
  block_size = validate.integer(block_size, "block_size", low=1)
  dampening = validate.number(dampening, "dampening", low=0)
  owl_threshold = validate.number(owl_threshold, "owl_threshold", low=0,
                                  low_open=True)
  owl_lambda = validate.number(owl_lambda, "owl_lambda", low=0)
  params = variables["params"]
  flat = dict(trees.leaves_with_paths(params))
  paths = list(flat)

  def fn(p):
    return apply_fn({**variables, "params": p}, calibration_x)

  used = capture.usage_order(fn, params, paths)
  chosen = [p for p, x in flat.items()
            if (filter_fn or trees.default_filter)(p, x)]
  if filter_fn is not None:
    missing = [p for p in chosen if p not in used]
    if missing:
      raise ValueError(f"filter_fn: {', '.join(missing)} not used as the "
                       "weight of a matrix product or convolution.")
  order = [p for p in used if p in chosen]
  skipped = []
  if n_m is not None:
    ok = []
    for p in order:
      last = capture.kernel_view(fn, params, p, paths).last_in
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
    for p in order:
      view, sq, _ = capture.layer_stats(fn, params, p, paths, gram=False)
      s = jnp.abs(view.to_matrix(flat[p]).astype(jnp.float32)) * jnp.sqrt(
          sq)[:, None]
      ratios.append(float(jnp.mean(s > owl_threshold * jnp.mean(s))))
    layer_s = owl_sparsities(ratios, sizes, sparsity, owl_lambda)
    counts = split_count(int(round(sparsity * sizes.sum())), layer_s, sizes)
  else:
    ratios = None
    counts = np.round(sparsity * sizes).astype(np.int64)

  new = dict(flat)
  masks = {}
  layers = {}
  if allocation == "global":
    scores = [jnp.abs(flat[p].astype(jnp.float32)) for p in order]
    keep = selection.top_k_masks(
        scores, [list(range(len(order)))],
        jnp.asarray([int(sizes.sum() - round(sparsity * sizes.sum()))]))
    for p, m in zip(order, keep):
      masks[p], new[p] = m, jnp.where(m, flat[p], 0).astype(flat[p].dtype)
  for i, p in enumerate(order if allocation != "global" else []):
    current = trees_unflatten(params, paths, new)
    view, sq, gram = capture.layer_stats(fn, current, p, paths, gram=True)
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
            "dense": [p for p in paths if trees.default_filter(p, flat[p])
                      and p not in used],
            "outlier_ratios": None if ratios is None else dict(zip(order, ratios))}
  out_vars = {**variables, "params": trees_unflatten(params, paths, new)}
  mask_tree = trees_unflatten(params, paths, {p: masks.get(p) for p in paths})
  return PostTrainingResult(out_vars, mask_tree, sparsities, report)


def trees_unflatten(template: PyTree, paths: list[str], values: dict):
  """``template`` with the leaf at each path replaced by ``values[path]``."""
  leaves, treedef = jax.tree.flatten(template)
  del leaves
  return jax.tree.unflatten(treedef, [values[p] for p in paths])
