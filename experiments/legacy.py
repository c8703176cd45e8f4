"""Configs recorded before ``method_kw`` (flat ``st3_*``, ``dst_*`` fields) in
the current shape, so that :func:`experiments.recipe.same_run` recognises the
committed tables' finished runs (a sweep skips them, ``--resume`` accepts them).
"""

from __future__ import annotations

import json
from typing import Any

from experiments.configs import _base

COMMON = ("method", "model", "width", "dataset", "data_dir", "augment", "seed",
          "batch_size", "eval_batch_size", "num_epochs", "lr", "lr_schedule",
          "lr_decay_epochs", "lr_decay_factor", "weight_decay", "target",
          "hvp_temperature")
# old field -> method_kw key
RENAMED = {
    **{k: k for k in ("sparsity", "prune_rate", "noise_scale", "noise_on",
                      "measure", "rounds", "reset_moments")},
    "prune_every_epochs": "every_epochs", "prune_start_epoch": "start_epoch",
    "prune_end_epoch": "end_epoch", "flipout_p": "p",
    "round_epochs": "every_epochs", "st3_power": "power", "st3_rescale": "rescale",
}
DST = {"dst_update_every_epochs": "every_epochs",
       "dst_drop_fraction": "drop_fraction", "dst_exploration": "exploration",
       "dst_epsilon": "epsilon", "dst_distribution": "distribution"}
HOYER = {"hoyer_lambda": "strength", "hoyer_threshold": "threshold",
         **{k: k for k in ("finetune_epochs", "finetune_lr", "finetune_lr_schedule",
                           "finetune_lr_decay_epochs")}}
# Flags of the results tables' commands -> the fields they set now
# (``--config.<key>=v`` of a key in ``method_kw`` needs no entry).
FLAGS = {"dst_exploration": "method_kw.exploration",
         "hoyer_lambda": "presets.hoyer_square.strength"}
DST_METHODS = ("dst_ee", "rigl", "set", "static_random")


def upgrade(old: dict[str, Any]) -> dict[str, Any]:
  """``old`` in the current shape (unchanged if it already is)."""
  if "method_kw" in old or "model" not in old:
    return old
  new = json.loads(_base.base_config().to_json_best_effort())
  new.update({k: old[k] for k in COMMON if k in old})
  new["optimizer_kw"] = {"momentum": old.get("momentum", 0.9),
                         "nesterov": old.get("nesterov", False)}
  kw = {v: old[k] for k, v in RENAMED.items() if old.get(k) is not None}
  n, method = old["num_epochs"], old["method"]
  if method in ("st3", "st3_sigma"):  # None: the reference's 5 -> 80 of 160.
    start, end = old.get("st3_start_epoch"), old.get("st3_end_epoch")
    finetune = old.get("st3_finetune_epochs") or 0
    kw.update(start_epoch=n * 5 / 160 if start is None else start,
              end_epoch=n * 80 / 160 if end is None else end,
              freeze_epoch=n - finetune if finetune else None)
    new["grad_clip"] = old.get("st3_grad_clip")
  if method in DST_METHODS:
    end = old.get("dst_end_epoch")
    kw["end_epoch"] = 0.75 * n if end is None else end
    kw.update({v: old[k] for k, v in DST.items() if old.get(k) is not None})
    new["sparse_init"] = bool(old.get("dst_sparse_init", False))
  if old.get("structured"):
    kw["structure"] = "units"
  new["presets"]["hoyer_square"].update(
      {v: old[k] for k, v in HOYER.items() if k in old})
  new["method_kw"] = kw
  return new
