"""UniPTS: post-training sparsity from a dense model and a calibration set.

Xie et al., "UniPTS: A Unified Framework for Proficient Post-Training
Sparsity", CVPR 2024 (arXiv 2405.18810); SPEC §4.

    from flipout_jax import unipts
    result = unipts.run(model.apply, variables, calibration_x, sparsity=0.9)
    sparse_variables = result.variables
    result.sparsities     # {"fc1/kernel": 0.93, ...}
    result.report         # search history, per-stage accuracy, timings

The pieces are usable on their own:

* :func:`distillation_loss`, :func:`tau_schedule` — the base-decayed
  objective (:mod:`.loss`);
* :func:`decode_genome`, :func:`evolutionary_search` — the
  reducing-regrowing search (:mod:`.search`);
* :func:`recalibrate_batch_stats` — BatchNorm recalibration
  (:mod:`.batchnorm`);
* :func:`sparse_training` — the dynamic-sparse-training stage as an optax
  transformation (:mod:`.dst`; its raw weights:
  :func:`flipout_jax.get_raw_weights`).
"""

from flipout_jax.unipts.batchnorm import batch_stats_momentum
from flipout_jax.unipts.batchnorm import has_batch_stats
from flipout_jax.unipts.batchnorm import recalibrate_batch_stats
from flipout_jax.unipts.loss import distillation_loss
from flipout_jax.unipts.loss import tau_schedule
from flipout_jax.unipts.pipeline import PAPER_CONFIG
from flipout_jax.unipts.pipeline import UniPTSConfig
from flipout_jax.unipts.pipeline import UniPTSResult
from flipout_jax.unipts.pipeline import run
from flipout_jax.unipts.search import SearchResult
from flipout_jax.unipts.search import decode_genome
from flipout_jax.unipts.search import evolutionary_search
from flipout_jax.unipts.search import num_pruned
from flipout_jax.unipts.dst import effective_params
from flipout_jax.unipts.dst import layer_magnitude_masks
from flipout_jax.unipts.dst import sparse_training

__all__ = [
    "PAPER_CONFIG", "SearchResult", "UniPTSConfig",
    "UniPTSResult", "batch_stats_momentum", "decode_genome",
    "distillation_loss", "effective_params", "evolutionary_search",
    "has_batch_stats", "layer_magnitude_masks",
    "num_pruned", "recalibrate_batch_stats", "run", "sparse_training",
    "tau_schedule",
]
