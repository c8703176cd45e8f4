"""UniPTS's dynamic sparse training as an optax transformation (SPEC §4 (c)).

Layer l (``n_l`` weights) has a fixed sparsity ``p_l`` (from the search) and
so a fixed count ``k_l = round(p_l·n_l)`` of pruned weights. The optimizer state
keeps the dense *raw* weights ``w``; the model computes with ``m⊙w``, ``m``
the per-layer magnitude mask that zeroes exactly the ``k_l`` smallest ``|w|``
of the layer (ties: the later position is pruned; :mod:`flipout_jax.
selection`). Masks are recomputed from ``w`` after every step, so weights
move in and out of the mask while every layer keeps exactly ``k_l`` zeros.

One ``update(g, state, params)`` (``g = ∂L/∂(m⊙w)``, the gradient at the
params, which are the effective weights ``m_t⊙w_t``)::

    g̃      = g + λ·(1 − m_t)⊙w_t           straight-through + decay of pruned
    u, s'  = inner.update(g̃, s, w_t)        inner sees the raw weights
    w_t+1  = w_t + u
    m_t+1  = magnitude mask of w_t+1 with exactly k_l zeros per layer
    updates = m_t+1⊙w_t+1 − params

``λ = 5e-5`` (SR-STE-like: pruned weights are pulled towards 0, so that
kept weights have to beat a shrinking competitor to be swapped out). Since
the straight-through estimator passes ``g`` to every weight, pruned weights
keep learning and can come back. Non-prunable leaves (biases, norm scales)
are trained normally by ``inner`` and are not copied into the state.

It is :func:`flipout_jax.core.prune` in raw mode (``weights="raw"``, the
loop of :func:`flipout_jax.st3` too: raw weights in ``core.RawState``,
``updates = effective − params``, so a user's train step is the ordinary
one) with :func:`flipout_jax.core.hard_raw_rule` (magnitude masks) instead
of ST-3's soft threshold and ``pruned_decay=λ``. As there: put weight decay *inside* ``inner`` (it then
decays the raw weights, as in the reference), gradient clipping before this
transformation, and this transformation last in a chain.

**Starting.** ``init(params)`` takes the *dense* weights: they become the
raw weights and ``get_masks(state)`` their magnitude masks. Train from the
sparse params ``flipout_jax.trees.apply_masks(params, get_masks(state))``
(:func:`flipout_jax.sparse_params`), so that the first gradient is the sparse model's.

**Exactness.** The masks always have exactly ``k_l`` False entries.
``optax.apply_updates`` lands every masked weight on exactly +0.0 (``p + (0
− p)``) and a kept one on ``w`` up to one rounding of ``p + (w − p)``; the
raw weights, not the params, are the source of truth, so this never
accumulates, and :func:`effective_params` gives the exact sparse weights
(what :func:`flipout_jax.unipts.run` returns). Their layer l has more than
``k_l`` zeros only if its raw weights hold more than ``k_l`` exact zeros
(e.g. an already pruned checkpoint); the params could in addition show a
kept weight as 0.0 if it shrank by a factor above 2^24 in one step.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from flipout_jax import core
from flipout_jax import schedules
from flipout_jax import selection
from flipout_jax import trees
from flipout_jax import validate

PyTree = Any
DEFAULT_DECAY = 5e-5


def layer_magnitude_masks(weights: Sequence[jax.Array],
                          pruned) -> list[jax.Array]:
  """Per-tensor masks pruning exactly ``pruned[i]`` smallest ``|w|`` of each.

  Args:
    weights: float arrays.
    pruned: ints ``0 <= k_i <= size_i`` (a list, or an int array that may be
      traced: one compiled function serves every sparsity).

  Returns:
    bool masks like ``weights`` with exactly ``k_i`` False entries each;
    among equal magnitudes the earlier position is kept.
  """
  return _magnitude_masks(list(weights), jnp.asarray(pruned, jnp.int32))


@jax.jit
def _magnitude_masks(weights, pruned):
  # Jitted (and cached per shapes) so that an eager ``init`` does not run
  # the 32 selection passes op by op, which takes seconds on a CPU.
  sizes = jnp.asarray([w.size for w in weights], jnp.int32)
  return selection.top_k_masks(
      [jnp.abs(w.astype(jnp.float32)) for w in weights],
      [[i] for i in range(len(weights))], sizes - pruned)


def check_sparsities(sparsities) -> dict[str, float]:
  """Validates ``{path: sparsity in [0, 1)}``; returns a plain dict."""
  if not isinstance(sparsities, Mapping):
    raise ValueError(
        "sparsities: must be a mapping {param path: sparsity in [0, 1)}, got "
        f"{type(sparsities).__name__}.")
  return {str(path): validate.sparsity(s, f"sparsities[{path!r}]")
          for path, s in sparsities.items()}


def sparse_training(inner: optax.GradientTransformation,
                    *,
                    sparsities: Mapping[str, float],
                    decay: float = DEFAULT_DECAY,
                    filter_fn: trees.FilterFn | None = None,
                    structure=None,
                    packed_masks: bool = False
                    ) -> optax.GradientTransformationExtraArgs:
  """UniPTS dynamic sparse training (module docstring for the math).

  ``core.prune(weights="raw")`` with :func:`flipout_jax.core.hard_raw_rule`,
  the per-layer counts of ``sparsities`` (a ``{path: p}`` distribution, one
  event at step 0) and ``pruned_decay=decay``.

  Args:
    inner: the raw weights' optimizer (UniPTS: ``optax.chain(
      optax.add_decayed_weights(1e-4), optax.sgd(cosine_with_warmup,
      momentum=0.9))``); it receives the raw weights as ``params``.
    sparsities: ``{path: p_l}`` per prunable leaf (paths as
      :func:`flipout_jax.trees.leaves_with_paths` renders them, e.g.
      ``"fc1/kernel"``); unnamed prunable leaves stay dense.
    decay: ``λ >= 0`` of the pruned weights' decay (paper: 5e-5).
    filter_fn: ``(path, leaf) -> bool`` selecting the prunable leaves
      (default: float leaves with ndim >= 2).
    structure: the sparsity pattern (:mod:`flipout_jax.structure`):
      unstructured (default), ``fj.units(...)`` (the ``p_l`` of a layer's
      units) or ``fj.n_m(n, m)`` (every named ``p_l`` must then be
      ``1 − n/m``).
    packed_masks: store the masks as bits (0.125 B per weight, not 1);
      the same results bit for bit (:func:`flipout_jax.core.prune`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`flipout_jax.core.PruneState`: ``masks`` are the masks of the
    current params (:func:`flipout_jax.get_masks`), ``method_state`` a
    :class:`flipout_jax.core.RawState` (the raw weights:
    :func:`flipout_jax.get_raw_weights`; no rule state). ``update`` needs
    ``params`` and passes extra keyword arguments to ``inner``.

  Raises:
    ValueError: for sparsities outside [0, 1), a negative ``decay``, or (at
      init) paths that are not prunable leaves or a filter selecting nothing.
  """
  sparsities = check_sparsities(sparsities)
  # Only used inside the update: traceable (optax.inject_hyperparams).
  decay = validate.number(decay, "decay", low=0, traceable=True)
  validate.optional_callable(filter_fn, "filter_fn")
  tx = core.prune(
      inner, weights="raw", raw_rule=core.hard_raw_rule(structure),
      # One event at step 0: the budget row of {path: p_l} as given.
      schedule=schedules.one_shot(max(sparsities.values(), default=0.0), 0),
      distribution=sparsities, structure=structure, pruned_decay=decay,
      filter_fn=filter_fn, packed_masks=packed_masks,
      name="unipts.sparse_training")

  def init_fn(params):
    # Named after the user's argument (the loop would say "distribution").
    prunable = trees.prunable_tree(params, filter_fn)
    paths = [p for p, _ in trees.leaves_with_paths(
        trees.mask_like(params, prunable))]
    unknown = sorted(set(sparsities) - set(paths))
    if unknown:
      raise ValueError(
          f"sparsities: {unknown} are not prunable leaves of params; the "
          f"prunable paths are {paths}.")
    try:
      return tx.init(params)
    except ValueError as e:  # The pattern's own check, in the user's words.
      if str(e).startswith("sparsity: "):
        raise ValueError(f"sparsities: {str(e)[len('sparsity: '):]}") from None
      raise

  return optax.GradientTransformationExtraArgs(init_fn, tx.update)


def find_state(state: optax.OptState) -> core.PruneState:
  """The one :func:`sparse_training` ``PruneState`` inside ``state``: the
  raw-weights state without a rule state.

  Raises:
    ValueError: if ``state`` holds none, or more than one.
  """
  found = [s for s in core.find_prune_states(state)
           if isinstance(s.method_state, core.RawState)
           and s.method_state.rule is None]
  if len(found) != 1:
    raise ValueError(
        f"state: holds {len(found)} flipout_jax.unipts.sparse_training "
        "states; pass the optimizer state of (a chain holding) exactly one.")
  return found[0]


def effective_params(state: optax.OptState, params: PyTree) -> PyTree:
  """The exact sparse weights ``m⊙w`` of the state (``params`` elsewhere)."""
  found = find_state(state)
  masks = trees.user_view(found.masks)  # bool, also when packed
  raw = trees.user_view(found.method_state.raw)
  return jax.tree.map(
      lambda m, r, p: p if m is None else jnp.where(m, r, jnp.zeros_like(r)),
      masks, raw, params, is_leaf=lambda x: x is None)
