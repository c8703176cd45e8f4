"""One-shot masks: SNIP at initialisation, and training under a fixed mask."""

from __future__ import annotations


import optax

from flipout_jax import core
from flipout_jax import schedules
from flipout_jax import scores
from flipout_jax import trees


def snip(inner: optax.GradientTransformation, *, sparsity: float,
         start_step: int = 0, distribution="global", structure=None,
         filter_fn=None,
         seed: int = 0, packed_masks: bool = False
        ) -> optax.GradientTransformationExtraArgs:
  """SNIP (Lee et al. 2019): one-shot pruning by ``|θ·g|``, then a fixed mask.

  At the update with count ``start_step`` (default 0, the first; the one
  event, so it is also the end: README, "Vocabulary"), scores every
  prunable weight by ``|θ·g|`` with the gradient of that step taken at the
  weights ``θ`` it was computed at, keeps the top ``N − round(sparsity·N)``
  globally, and never changes the mask again.

  Deviations from the reference code: the kept weights are not
  re-initialised after the mask is chosen (they train on from the values
  they were scored at), and ``g`` is the gradient of whatever loss the
  training step differentiates (softmax cross-entropy in ``experiments/``),
  not a loss of the pruning code's own.

  ``structure`` is the sparsity pattern (``fj.n_m(2, 4)``, ``fj.units()``;
  default unstructured), as in every method.
  """
  return core.prune(
      inner, score_fn=scores.snip,
      schedule=schedules.one_shot(sparsity, start_step),
      distribution=distribution, structure=structure, filter_fn=filter_fn,
      seed=seed,
      packed_masks=packed_masks, name="snip")


def fixed_mask(inner: optax.GradientTransformation, masks, *,
               packed_masks: bool = False
               ) -> optax.GradientTransformationExtraArgs:
  """Trains with ``masks`` held fixed (fine-tuning after one-shot pruning).

  Args:
    inner: the optimizer to wrap.
    masks: a mask tree (bool arrays where prunable, None elsewhere), e.g. from
      :func:`flipout_jax.get_masks` or :func:`flipout_jax.threshold_prune`.
    packed_masks: store the masks as bits (0.125 B per weight, not 1);
      the same results bit for bit (:func:`flipout_jax.core.prune`).

  Returns:
    A transformation that keeps masked weights at exactly 0.0.
  """
  paths = {path for path, _ in trees.leaves_with_paths(masks)}
  if not paths:
    raise ValueError("masks: holds no mask array; nothing would be pruned.")
  return core.prune(
      inner, score_fn=scores.magnitude, schedule=schedules.Schedule((), ()),
      filter_fn=lambda path, leaf: path in paths, initial_masks=masks,
      packed_masks=packed_masks, name="fixed_mask")
