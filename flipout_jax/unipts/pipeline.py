"""UniPTS end to end: dense model + calibration set -> sparse model.

:func:`run` runs the three stages of Xie et al. (CVPR 2024) on a Linen-style
model (SPEC §4):

1. **search** (:mod:`.search`): the reducing-regrowing genetic search of the
   per-layer sparsities ``p_l``; a candidate's fitness is the top-1 accuracy
   of the dense weights under per-layer magnitude masks (exactly
   ``round(p_l·n_l)`` zeros per layer) after BatchNorm recalibration on the
   calibration subset (:mod:`.batchnorm`; skipped for models without BN);
2. **masks**: the best ``p_l``, applied to the dense weights, BN recalibrated;
3. **sparse training** (:mod:`.dst`): dynamic sparse training on
   the calibration set with masks recomputed every step, straight-through
   gradients plus ``λ(1 − m)⊙w``, trained with the base-decayed
   distillation loss (:mod:`.loss`) from the dense model; SGD with momentum,
   weight decay, cosine learning rate per step with linear warm-up; finally
   BN recalibration on the whole calibration set.

**Labels.** Post-training calibration sets often have no labels, so by
default the fitness and the reported accuracies use the dense teacher's
argmax as labels (accuracy = agreement with the dense model). Pass
``calibration_y`` to use true labels, as the paper does. Either way the
training loss is the distillation loss alone.

**Fitness ties.** Top-1 on a small calibration set ties often; the fitness
is ``(top-1, mean log-likelihood of the labels)``, compared
lexicographically: the paper's top-1 first, a continuous tie-breaker second.

**Teacher mode.** The teacher's logits are computed once, in evaluation
mode (the dense model's stored statistics). The authors' code runs the
teacher in training mode (batch statistics); evaluation mode makes the
teacher the dense model users deploy, and deterministic.

**Other choices.** The student's BatchNorm starts sparse training from the
statistics recalibrated in stage 2 and runs in training mode (batch
statistics, running averages updated), as in the reference. τ_e uses the
0-based epoch of the calibration set. The per-step learning rate is
``lr·(t + 1)/W`` for the ``W`` warm-up steps, then a cosine to 0 at the last
step. Masks use ``round(p_l·n_l)`` computed in float64 in every stage, so the
searched, the trained and the returned models prune the same counts.

**Sequence models.** Logits may be ``[n, ..., C]`` (a decoder's ``[n, T,
V]`` over integer token windows ``[n, T]``): every leading position is an
example of the fitness, the labels (``[n, T]``) and the distillation loss,
which is averaged over all ``n·T`` positions. Only kernels a matrix product
or convolution uses as its weight are pruned (the one-shot methods' rule,
:func:`flipout_jax.post_training.capture.prunable_order`): embedding tables
stay dense.

Defaults are scaled for CPU (:class:`UniPTSConfig`); the paper's are
:data:`PAPER_CONFIG`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flipout_jax import core
from flipout_jax import structure as structure_lib
from flipout_jax import trees
from flipout_jax import validate
from flipout_jax.post_training import capture
from flipout_jax.unipts import batchnorm
from flipout_jax.unipts import dst as dst_lib
from flipout_jax.unipts import loss as loss_lib
from flipout_jax.unipts import search as search_lib

PyTree = Any
ApplyFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class UniPTSConfig:
  """Hyper-parameters of :func:`run`. Defaults: a CPU-sized run.

  The paper's values are in :data:`PAPER_CONFIG` (where they differ: the
  search's ``population_size=25, generations=25, num_parents=10,
  crossover_children=12, mutation_children=12`` and ``epochs=100``): 650
  genomes scored and 100 epochs. The CPU default scores 12 + 8·12 = 108
  genomes (identical sparsities are evaluated once) and trains 20 epochs;
  LeNet-300-100 with 512 calibration images takes ~10-15 s on 2 CPU cores.

  Attributes:
    temperature: T of the teacher's softmax (4).
    tau0, tau_decay: ``τ_e = tau0·tau_decay^e`` (8, 0.99).
    regrow: over-pruning / regrowth fraction r of the genome decoding (0.05).
    redistribute: give the regrowth of layers clamped at sparsity 0 to the
      others, so the global sparsity is P (default False, the paper's: small
      layers then end dense and the model sparser than P; see
      :func:`flipout_jax.unipts.search.decode_genome`).
    population_size, generations, num_parents, crossover_children,
      mutation_children, mutation_prob, crossover_prob: the genetic search
      (:func:`flipout_jax.unipts.search.evolutionary_search`).
    fitness_samples: calibration examples used by the fitness (the first of
      a seeded permutation); None: all.
    bn_batch_size: batch size of BatchNorm recalibration (64).
    eval_batch_size: batch size of evaluation-mode forward passes.
    epochs: sparse-training epochs over the calibration set (paper: 100);
      0 skips the stage (the searched masks on the dense weights).
    batch_size: sparse-training batch size (64); the last incomplete batch
      of an epoch is dropped (the whole set is one batch if it is smaller).
    learning_rate, momentum, weight_decay: SGD (0.01, 0.9, 1e-4); weight
      decay acts on the raw weights and on every other parameter.
    warmup_epochs: linear warm-up length (1 epoch): step t < W uses
      ``lr·(t + 1)/W``, then a cosine from lr to 0 at the last step.
    decay: λ of the pruned weights' decay (5e-5).
    recalibrate_final: recalibrate BN on the calibration set after training.
  """
  temperature: float = loss_lib.DEFAULT_TEMPERATURE
  tau0: float = loss_lib.DEFAULT_TAU0
  tau_decay: float = loss_lib.DEFAULT_TAU_DECAY
  regrow: float = 0.05
  redistribute: bool = False
  population_size: int = 12
  generations: int = 8
  num_parents: int = 5
  crossover_children: int = 6
  mutation_children: int = 6
  mutation_prob: float = 0.1
  crossover_prob: float = 1.0
  fitness_samples: int | None = None
  bn_batch_size: int = 64
  eval_batch_size: int = 512
  epochs: int = 20
  batch_size: int = 64
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 1e-4
  warmup_epochs: float = 1.0
  decay: float = dst_lib.DEFAULT_DECAY
  recalibrate_final: bool = True

  def __post_init__(self):
    def integer(name, low):
      validate.integer(getattr(self, name), name, low=low)

    def real(name, low, high=None, low_open=False, high_open=False):
      validate.number(getattr(self, name), name, low=low, high=high,
                      low_open=low_open, high_open=high_open)

    real("temperature", 0.0, low_open=True)
    real("tau0", 0.0, low_open=True)
    real("tau_decay", 0.0, low_open=True)
    real("regrow", 0.0, 1.0, high_open=True)
    integer("population_size", 2)
    integer("generations", 0)
    integer("num_parents", 2)
    integer("crossover_children", 1)
    integer("mutation_children", 0)
    if self.num_parents > self.population_size:
      raise ValueError(f"num_parents: {self.num_parents} exceeds "
                       f"population_size {self.population_size}.")
    real("mutation_prob", 0.0, 1.0)
    real("crossover_prob", 0.0, 1.0)
    if self.fitness_samples is not None:
      integer("fitness_samples", 1)
    integer("bn_batch_size", 1)
    integer("eval_batch_size", 1)
    integer("epochs", 0)
    integer("batch_size", 1)
    real("learning_rate", 0.0)
    real("momentum", 0.0, 1.0, high_open=True)
    real("weight_decay", 0.0)
    real("warmup_epochs", 0.0)
    real("decay", 0.0)


PAPER_CONFIG = UniPTSConfig(population_size=25, generations=25, num_parents=10,
                            crossover_children=12, mutation_children=12,
                            epochs=100)


class UniPTSResult(NamedTuple):
  """What :func:`run` returns.

  Attributes:
    variables: the sparse model's variables (``params`` with exactly
      ``round(p_l·n_l)`` zeros per prunable layer, recalibrated ``batch_stats``
      if the model has BatchNorm, other collections unchanged).
    sparsities: ``{path: pruned_l / n_l}`` per prunable layer (paths as in
      :func:`flipout_jax.trees.leaves_with_paths` of ``params``).
    masks: the final mask tree (params layout; None at non-prunable leaves).
    report: a dict (JSON-friendly): ``sparsity`` (target) and
      ``achieved_sparsity``; ``layers`` (per path: size, target p_l,
      pruned); ``dense`` (kernels no product uses, e.g. embedding tables,
      left unpruned); ``labels`` (``"teacher"`` or ``"calibration_y"``);
      ``accuracy`` on the calibration set (``dense``, ``uniform`` = the same
      P in every layer with BN recalibration, ``searched`` = stage 2,
      ``final`` = after sparse training); ``search`` (history, best and
      uniform-genome fitness, genome, evaluations; None without search);
      ``train`` (steps, per-epoch mean loss, τ of the last epoch); ``time``
      (seconds: ``setup`` = teacher, BN probe, uniform baseline and the
      first compilation; ``search``; ``train``; ``total``); ``config``.
  """
  variables: dict
  sparsities: dict
  masks: PyTree
  report: dict


# ----------------------------------------------------------------- helpers


def _chunked_logits(apply_fn: ApplyFn, variables, x, batch_size: int):
  """Evaluation-mode logits of ``x`` in chunks (results independent of it)."""
  n = x.shape[0]
  full, rest = divmod(n, batch_size)
  out = []
  if full:
    xs = x[:full * batch_size].reshape((full, batch_size) + x.shape[1:])
    logits = jax.lax.map(lambda xb: apply_fn(variables, xb, train=False), xs)
    out.append(logits.reshape((full * batch_size,) + logits.shape[2:]))
  if rest:
    out.append(apply_fn(variables, x[full * batch_size:], train=False))
  return jnp.concatenate(out, axis=0) if len(out) > 1 else out[0]


def _with_train_keyword(apply_fn: ApplyFn, variables, x) -> ApplyFn:
  """``apply_fn``, or a wrapper dropping ``train=`` for a model whose
  ``__call__(self, x)`` has no such argument (checked by tracing one input).

  Raises:
    ValueError: if such a model has BatchNorm statistics, which UniPTS
      recalibrates by calling ``apply_fn(..., train=True, mutable=...)``.
  """
  try:
    jax.eval_shape(lambda v, xb: apply_fn(v, xb, train=False), variables,
                   x[:1])
    return apply_fn
  except TypeError as e:
    if "train" not in str(e):
      raise
  if "batch_stats" in variables:
    raise ValueError(
        "apply_fn: the model has BatchNorm statistics (a 'batch_stats' "
        "collection) but its __call__ takes no `train` argument; UniPTS "
        "recalibrates them with apply_fn(variables, x, train=True, "
        "mutable=['batch_stats']).")

  def apply_without_train(v, xb, *, train=False, **kwargs):
    del train
    return apply_fn(v, xb, **kwargs)

  return apply_without_train


def _scores(logits, labels):
  """``(top-1 accuracy, mean log-likelihood of the labels)`` over every
  leading position (logits ``[..., C]``, labels ``[...]``)."""
  acc = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ll = jnp.mean(jnp.take_along_axis(log_p, labels[..., None], axis=-1))
  return acc, ll


def _cosine_warmup(lr: float, warmup: int, total: int):
  def schedule(t):
    t = jnp.asarray(t, jnp.float32)
    warm = lr * (t + 1.0) / max(warmup, 1)
    frac = jnp.clip((t - warmup) / max(total - warmup, 1), 0.0, 1.0)
    cos = 0.5 * lr * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(t < warmup, warm, cos)
  return schedule


def _check_inputs(apply_fn, variables, calibration_x, calibration_y, sparsity,
                  seed):
  if not callable(apply_fn):
    raise ValueError(
        f"apply_fn: must be callable (a Linen model.apply), got "
        f"{type(apply_fn).__name__}.")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError(
        "variables: must be a mapping with a 'params' collection (and "
        "'batch_stats' for BatchNorm models), e.g. model.init(...); got "
        f"{type(variables).__name__}"
        + (f" with keys {list(variables)}" if isinstance(variables, Mapping)
           else "") + ".")
  sparsity = validate.sparsity(sparsity)
  validate.seed(seed)
  if calibration_x is None:
    raise ValueError("calibration_x: is None; pass the calibration inputs.")
  x = jnp.asarray(calibration_x)
  if x.ndim < 1 or x.shape[0] == 0:
    raise ValueError(
        f"calibration_x: is empty (shape {x.shape}); UniPTS needs at least one "
        "calibration example.")
  # Integer inputs (token ids) stay integers; booleans become float32.
  if not (jnp.issubdtype(x.dtype, jnp.floating)
          or jnp.issubdtype(x.dtype, jnp.integer)):
    x = x.astype(jnp.float32)
  y = None
  if calibration_y is not None:
    y = np.asarray(calibration_y)
    if (y.ndim < 1 or y.shape[0] != x.shape[0]
        or not np.issubdtype(y.dtype, np.integer)):
      raise ValueError(
          f"calibration_y: must be integer labels of shape ({x.shape[0]},) "
          f"(or ({x.shape[0]}, ...) for a sequence model, the logits' "
          f"leading shape), got {y.dtype} {y.shape}.")
    y = jnp.asarray(y, jnp.int32)
  return x, y, float(sparsity)


def _prunable_filter(apply_fn, variables, x, filter_fn):
  """The post-training methods' prunable set as a filter: the kernels
  ``filter_fn`` selects that a product uses as its weight
  (:func:`flipout_jax.post_training.capture.prunable_order`; embedding
  tables stay dense). Returns ``(filter, dense paths)``."""
  validate.optional_callable(filter_fn, "filter_fn")
  order, dense = capture.prunable_order(
      lambda p: apply_fn({**variables, "params": p}, x[:1], train=False),
      variables["params"], filter_fn)
  chosen = frozenset(order)
  return (lambda path, leaf: path in chosen), dense


def _layout(params, filter_fn):
  try:
    prunable = trees.prunable_tree(params, filter_fn)
  except ValueError as e:
    raise ValueError(
        f"variables: the model has no prunable layer (Dense/Conv kernel) under "
        f"this filter, so there is nothing to prune. ({e})") from None
  return trees.mask_like(params, prunable)


# --------------------------------------------------------------------- run


def run(apply_fn: ApplyFn,
          variables: Mapping[str, Any],
          calibration_x,
          *,
          sparsity: float,
          seed: int = 0,
          search: bool = True,
          calibration_y=None,
          layer_sparsities: Mapping[str, float] | None = None,
          config: UniPTSConfig | None = None,
          filter_fn: trees.FilterFn | None = None,
          structure=None,
          log_fn: Callable[[str], None] | None = None,
          **overrides) -> UniPTSResult:
  """UniPTS post-training sparsity (module docstring for the stages).

  Args:
    apply_fn: a Linen-style ``model.apply``, called as ``apply_fn(variables,
      x, train=False)`` and, for models with BatchNorm (detected by a
      ``"batch_stats"`` collection), ``apply_fn(variables, x, train=True,
      mutable=["batch_stats"])``; it must be deterministic (no dropout). A
      model without BatchNorm whose ``__call__`` takes no ``train``
      argument is called as ``apply_fn(variables, x)``.
    variables: the dense model's variables (``params``, and ``batch_stats``
      if any), e.g. a checkpoint's.
    calibration_x: calibration inputs ``[n, ...]`` (paper: 10,240 ImageNet
      images), ``n >= 1``; float inputs as they are, integer ones (token
      ids ``[n, T]``) kept integer, booleans cast to float32.
    sparsity: the global target P in [0, 1) over the prunable weights.
    seed: seeds the search, the fitness subset and the batch order.
    search: run the genetic search. If False, the per-layer sparsities are
      ``layer_sparsities`` or, if None, P in every layer (the "uniform"
      baseline; the DST stage still runs).
    calibration_y: optional int labels of the logits' leading shape (``[n]``;
      ``[n, T]`` for a sequence model); default: the dense model's argmax
      (module docstring).
    layer_sparsities: ``{path: p_l}`` used when ``search=False`` (e.g. a
      previous run's ``result.sparsities``); unnamed layers stay dense.
    config: a :class:`UniPTSConfig` (default: the CPU-sized one).
    filter_fn: ``(path, leaf) -> bool`` over ``params`` selecting the
      prunable leaves (default: float leaves with ndim >= 2); either way
      only kernels a matrix product or convolution uses as its weight, the
      one-shot methods' set (embedding tables stay dense, listed in
      ``report["dense"]``); a selected leaf no product uses is an error.
    structure: None / ``fj.unstructured()`` (default) or ``fj.n_m(n, m)``
      (groups of ``m`` along each kernel's input features, axis -2). N:M
      fixes every layer's sparsity at ``1 − n/m`` (``sparsity`` must be
      that, ``search`` False, no ``layer_sparsities``): every stage's masks
      keep the ``n`` largest ``|w|`` of each group, and the sparse training
      (:func:`flipout_jax.unipts.sparse_training` with this structure)
      keeps the pattern exactly at every step. A layer whose input features
      are not divisible by ``m`` is a ValueError naming ``structure``, or
      stays dense with ``fj.n_m(..., skip_incompatible=True)``.
    log_fn: optional ``str -> None`` progress printer (e.g. ``print``).
    **overrides: :class:`UniPTSConfig` fields replacing ``config``'s, e.g.
      ``epochs=5`` (so a CLI can pass its flags through).

  Returns:
    A :class:`UniPTSResult`.

  Raises:
    ValueError: naming the argument, for an empty ``calibration_x``, a
      ``sparsity`` outside [0, 1), ``variables`` without ``params`` or
      without prunable layer, bad labels, unknown or invalid config fields,
      a ``structure`` other than unstructured / N:M (along axis -2), or N:M
      with ``search``, ``layer_sparsities``, another ``sparsity`` or a
      layer it cannot hold (without ``skip_incompatible``).
  """
  t_start = time.perf_counter()
  x, y, sparsity = _check_inputs(apply_fn, variables, calibration_x,
                                 calibration_y, sparsity, seed)
  apply_fn = _with_train_keyword(apply_fn, variables, x)
  config = UniPTSConfig() if config is None else config
  if not isinstance(config, UniPTSConfig):
    raise ValueError(f"config: must be a UniPTSConfig, got {type(config).__name__}.")
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(config)})
  if unknown:
    raise ValueError(f"{unknown[0]}: unknown argument (not a UniPTSConfig field).")
  config = dataclasses.replace(config, **overrides)
  log = log_fn or (lambda msg: None)
  structure = structure_lib.check(structure)
  nm = structure.options if structure.kind == "n_m" else None
  if structure.kind not in ("unstructured", "n_m") or (nm and nm["axis"] != -2):
    raise ValueError(f"structure: UniPTS takes fj.unstructured() or fj.n_m(n, "
                     f"m) along the input features (axis -2), got "
                     f"{structure.name} {structure.options}.")
  if nm:
    for arg, bad in (("search", search), ("layer_sparsities",
                                          layer_sparsities is not None)):
      if bad:
        raise ValueError(f"{arg}: {structure.name} fixes every layer's "
                         f"sparsity at 1 - n/m; pass search=False and no "
                         "layer_sparsities.")
    if abs(sparsity - (1 - nm["n"] / nm["m"])) > 1e-9:
      raise ValueError(f"sparsity: {structure.name} is "
                       f"{1 - nm['n'] / nm['m']:g} sparse; got {sparsity}.")

  params = variables["params"]
  filter_fn, dense_paths = _prunable_filter(apply_fn, variables, x, filter_fn)
  layout = _layout(params, filter_fn)
  paths = [p for p, _ in trees.leaves_with_paths(layout)]
  sizes = np.array([m.size for m in trees.prunable_leaves(layout, layout)],
                   np.int64)
  # N:M: the layers it holds (the others, with skip_incompatible, stay dense).
  active = np.array(structure.layout(paths, [m.shape for m in trees.prunable_leaves(
      layout, layout)]).active)
  if layer_sparsities is not None:
    if search:
      raise ValueError("layer_sparsities: only used with search=False (the "
                       "search finds its own).")
    layer_sparsities = dst_lib.check_sparsities(layer_sparsities)
    unknown = sorted(set(layer_sparsities) - set(paths))
    if unknown:
      raise ValueError(f"layer_sparsities: {unknown} are not prunable layers; "
                       f"prunable: {paths}.")
  bn = batchnorm.has_batch_stats(variables)
  others = {k: v for k, v in variables.items()
            if k not in ("params", "batch_stats")}
  n = x.shape[0]
  eval_bs = min(config.eval_batch_size, n)
  bn_bs = min(config.bn_batch_size, n)

  def with_(p, stats):
    v = dict(others)
    v["params"] = p
    if bn:
      v["batch_stats"] = stats
    return v

  # Everything below runs jitted: eager op-by-op dispatch compiles every
  # small op on first use, which costs seconds per call on a CPU.
  logits_fn = jax.jit(lambda v, x: _chunked_logits(apply_fn, v, x, eval_bs))
  scores_fn = jax.jit(_scores)

  # ---- teacher, labels
  teacher_logits = logits_fn(dict(variables), x)
  if y is not None and y.shape != teacher_logits.shape[:-1]:
    raise ValueError(
        f"calibration_y: shape {tuple(y.shape)} must be the logits' leading "
        f"shape {tuple(teacher_logits.shape[:-1])}.")
  labels = y if y is not None else jnp.argmax(teacher_logits, axis=-1).astype(jnp.int32)
  dense_acc, _ = scores_fn(teacher_logits, labels)
  momentum = (jax.jit(lambda v, xb: batchnorm.batch_stats_momentum(
      apply_fn, v, xb))(dict(variables), x[:bn_bs]) if bn else None)

  # ---- masks, then BN recalibration + accuracy. The masks come from the
  # module-level jitted selection (compiled once per shapes, shared with the
  # sparse-training init), so sparse_eval itself compiles no selection.
  def magnitude_masks(params, p_layers):
    leaves = trees.prunable_leaves(layout, params)
    if nm:  # the n largest |w| of every group (the sparse training's init)
      leaves = [structure_lib.nm_masks(jnp.abs(w), nm["n"], nm["m"]) if a
                else jnp.ones(w.shape, jnp.bool_) for w, a in zip(leaves, active)]
    else:
      leaves = dst_lib.layer_magnitude_masks(
          leaves, search_lib.num_pruned(p_layers, sizes))
    return trees.unflatten_prunable(layout, leaves)

  @jax.jit
  def sparse_eval(params, masks, stats, momentum, xs, ys):
    sparse = trees.apply_masks(params, masks)
    v = with_(sparse, stats)
    if bn:
      v = batchnorm.recalibrate(apply_fn, v, xs, momentum,
                                batch_size=min(bn_bs, xs.shape[0]))
    acc, ll = _scores(_chunked_logits(apply_fn, v, xs,
                                      min(eval_bs, xs.shape[0])), ys)
    return acc, ll, v

  stats0 = variables.get("batch_stats") if bn else None
  report: dict[str, Any] = {
      "sparsity": sparsity, "num_prunable": int(sizes.sum()),
      "labels": "calibration_y" if y is not None else "teacher",
      "accuracy": {"dense": float(dense_acc)}, "time": {},
      "dense": dense_paths, "structure": structure.name,
      "config": dataclasses.asdict(config), "seed": int(seed)}

  def evaluate(p_layers, xs, ys):
    """``(top-1, log-likelihood, masks, recalibrated variables)``."""
    masks = magnitude_masks(params, p_layers)
    acc, ll, v = sparse_eval(params, masks, stats0, momentum, xs, ys)
    return acc, ll, masks, v

  uniform = np.where(active, sparsity, 0.0)
  report["accuracy"]["uniform"] = float(evaluate(uniform, x, labels)[0])
  report["time"]["setup"] = time.perf_counter() - t_start
  log(f"dense {report['accuracy']['dense']:.4f}, uniform magnitude "
      f"{report['accuracy']['uniform']:.4f} (calibration set, "
      f"{report['labels']} labels)")

  # ---- stage 1: search
  t0 = time.perf_counter()
  if search:
    if config.fitness_samples is not None and config.fitness_samples < n:
      idx = np.sort(np.random.default_rng([seed, 0]).permutation(n)[
          :config.fitness_samples])
      fx, fy = x[idx], labels[idx]
    else:
      fx, fy = x, labels

    def fitness(p_layers):
      acc, ll, _, _ = evaluate(p_layers, fx, fy)
      return (float(acc), float(ll))

    found = search_lib.evolutionary_search(
        fitness, sizes, sparsity,
        population_size=config.population_size,
        generations=config.generations, num_parents=config.num_parents,
        crossover_children=config.crossover_children,
        mutation_children=config.mutation_children,
        mutation_prob=config.mutation_prob,
        crossover_prob=config.crossover_prob, regrow=config.regrow,
        redistribute=config.redistribute,
        seed=int(seed), log_fn=log)
    layer_p = found.sparsities
    report["search"] = {
        "history": found.history, "best_fitness": found.fitness,
        "uniform_genome_fitness": found.uniform_fitness,
        "genome": found.genome.tolist(), "evaluations": found.evaluations,
        "genomes_seen": found.genomes_seen,
        "fitness_samples": int(fx.shape[0])}
  elif layer_sparsities is not None:
    layer_p = np.array([layer_sparsities.get(p, 0.0) for p in paths])
    report["search"] = None
  else:
    layer_p = uniform
    report["search"] = None
  report["time"]["search"] = time.perf_counter() - t0

  # ---- stage 2: the searched masks on the dense weights
  acc, _, masks, v = evaluate(layer_p, x, labels)
  report["accuracy"]["searched"] = float(acc)
  log(f"searched sparsities {np.round(layer_p, 4).tolist()}: calibration "
      f"accuracy {float(acc):.4f}")
  sparse_params, stats = v["params"], v.get("batch_stats")

  # ---- stage 3: dynamic sparse training with distillation
  t0 = time.perf_counter()
  train_report = {"steps": 0, "epoch_loss": []}
  if config.epochs > 0:
    bs = min(config.batch_size, n)
    steps_per_epoch = n // bs
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    inner = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(_cosine_warmup(config.learning_rate, warmup, total),
                  momentum=config.momentum))
    tx = dst_lib.sparse_training(
        inner, sparsities={p: float(s) for p, s, a in zip(paths, layer_p, active)
                           if a},
        decay=config.decay, filter_fn=filter_fn, structure=structure)
    # Eager: its selection is the jitted one magnitude_masks compiled.
    opt_state = tx.init(params)
    train_params = jax.jit(core.sparse_params)(params, opt_state)
    x_host, teacher_host = np.asarray(x), np.asarray(teacher_logits)

    @jax.jit
    def train_step(p, stats, opt_state, xb, tb, tau):
      def loss_fn(p):
        if bn:
          logits, upd = apply_fn(with_(p, stats), xb, train=True,
                                 mutable=["batch_stats"])
          new_stats = upd["batch_stats"]
        else:
          logits, new_stats = apply_fn(with_(p, stats), xb, train=False), stats
        return loss_lib.distillation_loss(
            logits, tb, tau, temperature=config.temperature), new_stats
      (value, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), new_stats, opt_state, value

    tau = config.tau0
    for epoch in range(config.epochs):
      tau = loss_lib.tau_schedule(epoch, tau0=config.tau0,
                                  decay=config.tau_decay)
      order = np.random.default_rng([seed, 1, epoch]).permutation(n)
      losses = []
      for i in range(steps_per_epoch):
        idx = order[i * bs:(i + 1) * bs]
        train_params, stats, opt_state, value = train_step(
            train_params, stats, opt_state, x_host[idx], teacher_host[idx],
            np.float32(tau))
        losses.append(value)
      train_report["epoch_loss"].append(float(np.mean(jax.device_get(losses))))
      log(f"epoch {epoch + 1}/{config.epochs}: τ {tau:.3f}, distillation "
          f"loss {train_report['epoch_loss'][-1]:.4f}")
    train_report.update(steps=total, last_tau=float(tau),
                        steps_per_epoch=steps_per_epoch, batch_size=bs)
    # The raw weights under their masks are the exact sparse weights (the
    # params may differ from them by one rounding, see flipout_jax.unipts.dst).
    sparse_params, masks = jax.jit(lambda s, p: (
        dst_lib.effective_params(s, p), core.get_masks(s)))(opt_state, train_params)
    v = with_(sparse_params, stats)
    if bn and config.recalibrate_final:
      v = jax.jit(lambda v, x, m: batchnorm.recalibrate(
          apply_fn, v, x, m, batch_size=bn_bs))(v, x, momentum)
    sparse_params, stats = v["params"], v.get("batch_stats")
  report["train"] = train_report
  report["time"]["train"] = time.perf_counter() - t0

  final = with_(sparse_params, stats)
  report["accuracy"]["final"] = float(scores_fn(logits_fn(final, x), labels)[0])

  pruned = [int(m.size - np.count_nonzero(np.asarray(m)))
            for m in trees.prunable_leaves(layout, masks)]
  sparsities = {p: k / int(s) for p, k, s in zip(paths, pruned, sizes)}
  report["layers"] = {
      p: {"size": int(s), "target": float(t), "pruned": k}
      for p, s, t, k in zip(paths, sizes, layer_p, pruned)}
  report["achieved_sparsity"] = sum(pruned) / int(sizes.sum())
  report["time"]["total"] = time.perf_counter() - t_start
  log(f"final: calibration accuracy {report['accuracy']['final']:.4f}, "
      f"sparsity {report['achieved_sparsity']:.4f}, "
      f"{report['time']['total']:.1f} s")
  variables_out = dict(variables)
  variables_out.update(final)
  return UniPTSResult(variables_out, sparsities, masks, report)
