"""flipout_jax: pruning and sparse training as pure optax transformations.

    import flipout_jax as fj
    tx = fj.flipout(optax.sgd(0.1, momentum=0.9), sparsity=0.99, every=500)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)  # pruned weights are 0.0
"""

from flipout_jax import distributions
from flipout_jax import hessian
from flipout_jax import post_training
from flipout_jax import registry
from flipout_jax import schedules
from flipout_jax import scores
from flipout_jax import selection
from flipout_jax import structure
from flipout_jax import trees
from flipout_jax import unipts
from flipout_jax.core import PruneState
from flipout_jax.coupled import coupled
from flipout_jax.dependency import compact
from flipout_jax.dependency import dependency_groups
from flipout_jax.core import Tracker
from flipout_jax.core import get_masks
from flipout_jax.core import prune
from flipout_jax.core import reseed
from flipout_jax.core import sparse_params
from flipout_jax.methods.dst import coverage_counter
from flipout_jax.methods.dst import dst
from flipout_jax.methods.dst import dst_ee
from flipout_jax.methods.dst import rigl
from flipout_jax.methods.dst import set_
from flipout_jax.methods.flipout import flip_counter
from flipout_jax.methods.flipout import flipout
from flipout_jax.methods.flipout import global_magnitude
from flipout_jax.methods.flipout import random_pruning
from flipout_jax.methods.gradient_flow import gradient_flow
from flipout_jax.methods.gradient_flow import grasp
from flipout_jax.methods.hoyer_square import hoyer_square
from flipout_jax.methods.hoyer_square import hoyer_square_penalty
from flipout_jax.methods.hoyer_square import threshold_prune
from flipout_jax.methods.movement import movement
from flipout_jax.methods.one_shot import fixed_mask
from flipout_jax.methods.one_shot import snip
from flipout_jax.methods.st3 import ST3State
from flipout_jax.methods.st3 import get_raw_weights
from flipout_jax.methods.st3 import st3
from flipout_jax.methods.st3 import st3_effective
from flipout_jax.methods.st3 import st3_scales
from flipout_jax.methods.st3 import st3_thresholds
from flipout_jax.report import SparsityError
from flipout_jax.report import SparsityReport
from flipout_jax.report import check_nm
from flipout_jax.report import check_sparse
from flipout_jax.report import sparsity_report
from flipout_jax.sparse_init import sparse_init
from flipout_jax.structure import n_m
from flipout_jax.structure import units
from flipout_jax.structure import unstructured

# fj.export is the function (fj.export(params, masks)); the module stays
# importable as flipout_jax.sparse_export.
from flipout_jax.sparse_export import export
from flipout_jax.sparse_export import export_report
from flipout_jax.sparse_export import to_dense

__version__ = "0.1.0"
