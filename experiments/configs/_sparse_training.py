"""Config fields of the sparse-training methods (ST-3, DST), with defaults.

Shared by the ST-3 and DST config files (which add them to `_base.base_config()`)
and by `experiments/methods_sparse_training.py` (which uses these defaults
when a config lacks a field, so that e.g. `--config.method=rigl` also runs on
the FlipOut configs). No JAX import here: configs load without it.

ST-3 / ST-3σ (methods "st3", "st3_sigma"; final sparsity = `sparsity`, or
`target` / the pruning events as for FlipOut, see `_base.py`)
  st3_start_epoch     the cubic ramp s_t = S·(1 − (1 − i/N)^power) starts here;
                      None: 5/160 of num_epochs (the reference's epoch 5 of 160).
  st3_end_epoch       ... and reaches S here (must be < num_epochs); None: half
                      of num_epochs (the reference's epoch 80 of 160).
  st3_power           exponent of the ramp (3: cubic).
  st3_rescale         the per-output-channel rescaling (paper default on).
  st3_finetune_epochs the last this-many epochs of the run train under the
                      mask frozen at their start (weights replaced by their
                      effective values, no thresholding): the reference's
                      fine-tuning; 0: none. Must start after st3_end_epoch.
  st3_grad_clip       None, or clip the gradient's global norm to this value
                      before ST-3 (the reference's CIFAR recipe: 3.0).
DST (methods "dst_ee", "rigl", "set"; "static_random" uses only
     dst_distribution; all need `sparsity`, or `target`/events as above)
  dst_update_every_epochs  ΔT in epochs (floor(ΔT·steps_per_epoch) steps, ≥ 1).
  dst_end_epoch       T_end: no mask update at or after it; the cosine drop
                      fraction reaches 0 here; None: 3/4 of num_epochs (RigL).
  dst_drop_fraction   d_0; None: the family's (0.5 DST-EE/RigL, 0.3 SET).
  dst_exploration     DST-EE's c in S_i = |g_i| + c·ln(t+1)/(N_i + ε); c = 0 is RigL.
  dst_epsilon         ε > 0.
  dst_distribution    per-layer density: "erk", "uniform" or "global".
  dst_sparse_init     (optional; only configs that want it have it, default
                      False) also for "static_random": at the first update,
                      rescale each output unit's kept weights by
                      sqrt(fan_in / kept fan_in), so that a random sparse
                      start has the variance the dense init gives (the
                      "sparse init" of Evci et al.); the library's DST keeps
                      the dense init's values, which at 98 % sparsity on
                      LeNet-5 leaves logits ~3,500x smaller than dense.
"""

from ml_collections import config_dict

# field -> (type, default); None defaults are placeholders of that type.
ST3_FIELDS = {
    "st3_start_epoch": (float, None),
    "st3_end_epoch": (float, None),
    "st3_power": (float, 3.0),
    "st3_rescale": (bool, True),
    "st3_finetune_epochs": (int, 0),
    "st3_grad_clip": (float, None),
}
DST_FIELDS = {
    "dst_update_every_epochs": (float, 1.0),
    "dst_end_epoch": (float, None),
    "dst_drop_fraction": (float, None),
    "dst_exploration": (float, 1e-3),
    "dst_epsilon": (float, 1.0),
    "dst_distribution": (str, "erk"),
}
# Optional fields: not added by add_dst_fields (adding a field to a config
# changes its JSON, and runs made before could then no longer be resumed or
# skipped by a sweep); a config that wants one sets it.
DST_OPTIONAL_FIELDS = {
    "dst_sparse_init": (bool, False),
}
# The reference's ST-3 schedule on CIFAR-10: ramp from epoch 5 to 80 of 160.
ST3_REFERENCE_EPOCHS = (5.0, 80.0, 160.0)
# RigL: mask updates stop at 3/4 of training.
DST_END_FRACTION = 0.75


def _add(c: config_dict.ConfigDict, fields) -> config_dict.ConfigDict:
  for name, (kind, default) in fields.items():
    setattr(c, name, config_dict.placeholder(kind) if default is None else default)
  return c


def add_st3_fields(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  return _add(c, ST3_FIELDS)


def add_dst_fields(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  return _add(c, DST_FIELDS)
