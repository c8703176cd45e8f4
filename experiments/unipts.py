r"""UniPTS post-training sparsity of a finished `experiments.main` run.

    python -m experiments.unipts --config experiments/configs/unipts_lenet5_mnist5k.py \
        --dense_workdir runs/dense_lenet5/seed42 [--config.sparsity=0.95] \
        [--config.calibration_size=512] [--config.seed=42] [--config.search=False] \
        [--config.unipts.epochs=20] [--workdir DIR] [--overwrite]

The dense model is the one a finished `experiments.main` run left in
`--dense_workdir`: the model, width and data set are rebuilt from its
`config.json`, the variables are its `final_params.npz` (the final epoch's
params and BatchNorm statistics). The calibration set is `calibration_size`
images of the data set's train split, drawn without replacement by
`numpy.random.default_rng([seed, 1])` (sorted indices; the same for every
model and sparsity at one seed). Then `flipout_jax.unipts.prune` (search,
masks, sparse training with distillation; `--config.unipts.<field>` sets any
`UniPTSConfig` field), and the test accuracy of the sparse model.

The same dense model is also pruned one-shot, without any training, as
baselines (in `final.json` under `baselines`): global magnitude (the
`⌊P·N⌋` smallest |w| over all prunable weights) and uniform layer-wise
magnitude (`⌊P·n_l⌋` per layer), each without and with BatchNorm
recalibration on the calibration set (a no-op, reported as such, for models
without BatchNorm such as the LeNets).

Writes to the workdir (default `runs/<config name>/<search|uniform>/s<P>/
seed<seed>`): `final_params.npz` (the sparse variables, keyed as
experiments.main's), `report.json` (`unipts.prune`'s report: search history,
per-stage calibration accuracy, timings; plus the calibration indices),
`final.json`, and ends with the line
`final test_accuracy=<float> sparsity=<float>` (sparsity: the achieved
fraction of pruned prunable weights). A workdir whose `final.json` holds the
same UniPTS config and dense model is skipped (its line printed again); one
of another config is an error unless `--overwrite`. Bad flags, config values
or a missing / unfinished dense workdir stop with a one-line `error: ...` on
stderr (exit status 1).

Sweep (the results table; one process at a time, resumable):

    python -m experiments.unipts --config experiments/configs/unipts_lenet5_mnist5k.py \
        --sweep --out experiments/results/unipts_lenet5_mnist5k \
        --seeds 42,43,44 --sparsities 0.9,0.95

trains the dense teachers with `experiments.main` (the config's teacher
recipe) in `<out>/runs/dense/seed<k>` (`experiments.sweep.run_one`: finished
runs are skipped, killed ones resumed), runs UniPTS with and without the
search in `<out>/runs/unipts{,_uniform}/s<P>/seed<k>` (dense seed k, UniPTS
seed k; finished runs skipped), and writes `<out>/results.md` and
`<out>/results.json`. Other `--config.<field>=<value>` flags are passed on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "experiments", "configs",
                              "unipts_lenet5_mnist5k.py")
# The config fields that define a UniPTS run (the rest is the teacher recipe).
UNIPTS_FIELDS = ("sparsity", "seed", "calibration_size", "calibration_labels",
                 "search", "unipts", "eval_batch_size")
CALIBRATION_LABELS = ("teacher", "true")
_CALIBRATION_STREAM = 1  # default_rng([seed, 1]) draws the calibration set
RUN_FILES = ("final.json", "report.json", "final_params.npz")


class UniPTSError(ValueError):
  """A bad flag, config value or workdir; the message is one line."""


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("dense_workdir", None, "Workdir of a finished "
                      "experiments.main run: the dense model.", flag_values=fv)
  flags.DEFINE_string("workdir", None, "Run directory (default runs/<config "
                      "name>/<search|uniform>/s<sparsity>/seed<seed>).",
                      flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace a finished run of another "
                    "config in --workdir.", flag_values=fv)
  flags.DEFINE_bool("sweep", False, "Run the dense x sparsity x {search, "
                    "uniform} x seeds sweep and write the results table.",
                    flag_values=fv)
  flags.DEFINE_string("out", None, "--sweep: output directory (default "
                      "experiments/results/<config name>).", flag_values=fv)
  flags.DEFINE_list("seeds", ["42", "43", "44"], "--sweep: seeds (dense and "
                    "UniPTS).", flag_values=fv)
  flags.DEFINE_list("sparsities", ["0.9", "0.95"], "--sweep: target "
                    "sparsities.", flag_values=fv)


def parse_flags(argv: Sequence[str]) -> flags.FlagValues:
  return main_lib.parse_flags(argv, _define_flags, DEFAULT_CONFIG, __doc__)


# --- Config --------------------------------------------------------------------------


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return (isinstance(x, (int, float)) and not isinstance(x, bool)
          and math.isfinite(x))


def unipts_config_json(config) -> dict[str, Any]:
  """The UniPTS fields of ``config`` as JSON (what identifies a run)."""
  from experiments import train  # pylint: disable=g-import-not-at-top
  full = train.config_json(config)
  return {k: full[k] for k in UNIPTS_FIELDS if k in full}


def validate(config):
  """Checks the UniPTS fields; returns the ``UniPTSConfig``.

  Raises:
    UniPTSError: naming the field and what is valid.
  """
  check_fields(config)
  from flipout_jax import unipts  # pylint: disable=g-import-not-at-top
  try:
    return unipts.UniPTSConfig(**config.unipts.to_dict())
  except (TypeError, ValueError) as e:
    raise UniPTSError(f"unipts.{main_lib.one_line(e)}") from None


def check_fields(config) -> None:
  """The checks of :func:`validate` that need no JAX (all but ``unipts.*``)."""
  missing = [k for k in UNIPTS_FIELDS if k not in config]
  if missing:
    raise UniPTSError(
        f"config: missing the UniPTS fields {', '.join(missing)}; use a "
        "config like experiments/configs/unipts_lenet5_mnist5k.py")
  p = config.sparsity
  if not (_is_number(p) and 0.0 <= p < 1.0):
    raise UniPTSError(f"sparsity: got {p!r}; must be a number in [0, 1) (the "
                      "fraction of the prunable weights to zero)")
  if not (_is_int(config.seed) and config.seed >= 0):
    raise UniPTSError(f"seed: got {config.seed!r}; must be an int >= 0")
  if not (_is_int(config.calibration_size) and config.calibration_size >= 1):
    raise UniPTSError(f"calibration_size: got {config.calibration_size!r}; "
                      "must be an int >= 1")
  if config.calibration_labels not in CALIBRATION_LABELS:
    raise UniPTSError(f"calibration_labels: got {config.calibration_labels!r}; "
                      f"must be one of {', '.join(CALIBRATION_LABELS)}")
  if not isinstance(config.search, bool):
    raise UniPTSError(f"search: got {config.search!r}; must be True or False")
  if not (_is_int(config.eval_batch_size) and config.eval_batch_size >= 1):
    raise UniPTSError(f"eval_batch_size: got {config.eval_batch_size!r}; "
                      "must be an int >= 1")


# --- The dense run ------------------------------------------------------------------


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def check_dense_workdir(dense_workdir: str | None) -> dict[str, Any]:
  """The finished dense run's ``config.json``, ``final.json`` and weights hash.

  Raises:
    UniPTSError: for a missing flag, a missing directory, an unfinished run
      or a directory that is not an experiments.main workdir.
  """
  if not dense_workdir:
    raise UniPTSError("--dense_workdir: required: the workdir of a finished "
                      "`python -m experiments.main` run (the dense model)")
  d = dense_workdir
  if not os.path.isdir(d):
    raise UniPTSError(f"dense_workdir: {d} does not exist (or is not a "
                      "directory); pass the --workdir of a finished "
                      "experiments.main run")
  has = {f: os.path.exists(os.path.join(d, f))
         for f in ("config.json", "final.json", "final_params.npz",
                   "checkpoints")}
  if not has["final.json"]:
    if has["config.json"] or has["checkpoints"]:
      raise UniPTSError(
          f"dense_workdir: {d} holds an unfinished experiments.main run (no "
          "final.json); finish it first with `python -m experiments.main "
          f"--config <its config> --workdir {d} --resume`")
    raise UniPTSError(f"dense_workdir: {d} is not an experiments.main workdir "
                      "(no final.json, config.json or checkpoints/)")
  for f in ("config.json", "final_params.npz"):
    if not has[f]:
      raise UniPTSError(f"dense_workdir: {d} has final.json but no {f}; not a "
                        "complete experiments.main workdir")
  try:
    with open(os.path.join(d, "config.json")) as f:
      config = json.load(f)
    with open(os.path.join(d, "final.json")) as f:
      final = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UniPTSError(f"dense_workdir: {d}: unreadable run files "
                      f"({main_lib.one_line(e)})") from None
  for k in ("model", "width", "dataset"):
    if k not in config:
      raise UniPTSError(f"dense_workdir: {d}/config.json has no {k!r}")
  return {"config": config, "final": final,
          "params_sha256": _sha256(os.path.join(d, "final_params.npz"))}


def load_dense(dense_workdir: str, dense_config: dict[str, Any],
               data_dir: str | None = None):
  """Rebuilds the dense run's model and data set and loads its variables.

  Returns:
    ``(model, variables, ds)``: the Linen model, ``{"params": ...,
    "batch_stats": ...}`` (no ``batch_stats`` without BatchNorm) filled from
    ``final_params.npz``, and the data set.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import data as data_lib  # pylint: disable=g-import-not-at-top
  from flipout_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  from flipout_jax import trees  # pylint: disable=g-import-not-at-top
  from experiments import train  # pylint: disable=g-import-not-at-top

  c = dense_config
  try:
    ds = data_lib.load(c["dataset"], data_dir=data_dir or c.get("data_dir"))
    model = models_lib.get_model(c["model"], num_classes=ds.train.num_classes,
                                 width=c["width"])
  except (ValueError, data_lib.DatasetNotPreparedError) as e:
    raise UniPTSError(
        f"dense_workdir: {dense_workdir}: {main_lib.one_line(e)}") from None
  dummy = jnp.zeros((1, *ds.train.image_shape), jnp.float32)
  template = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x,
                                          train=False))(dummy)
  saved = train.load_final_params(dense_workdir)
  variables = {}
  for collection in ("params", "batch_stats"):
    if collection not in template:
      continue
    flat, treedef = jax.tree_util.tree_flatten_with_path(template[collection])
    leaves = []
    for path, leaf in flat:
      key = f"{collection}/{trees.path_str(path)}"
      if key not in saved or saved[key].shape != leaf.shape:
        got = "missing" if key not in saved else f"shape {saved[key].shape}"
        raise UniPTSError(
            f"dense_workdir: {dense_workdir}/final_params.npz does not match "
            f"the {c['model']} (width {c['width']}) of its config.json: {key} "
            f"is {got}, expected shape {leaf.shape}")
      leaves.append(jnp.asarray(saved[key], leaf.dtype))
    variables[collection] = jax.tree_util.tree_unflatten(treedef, leaves)
  return model, variables, ds


def calibration_indices(num_train: int, size: int, seed: int):
  """``size`` sorted train-split indices, drawn without replacement."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if size > num_train:
    raise UniPTSError(f"calibration_size: {size} exceeds the {num_train} "
                      "training examples of the data set")
  rng = np.random.default_rng([seed, _CALIBRATION_STREAM])
  return np.sort(rng.choice(num_train, size=size, replace=False))


# --- Evaluation and one-shot baselines ----------------------------------------------


_EVAL_STEPS: dict[Any, Any] = {}  # model -> jitted count of correct labels


def test_accuracy(model, variables, ds, batch_size: int) -> float:
  """Top-1 accuracy on the test split (evaluation mode)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import data as data_lib  # pylint: disable=g-import-not-at-top

  if model not in _EVAL_STEPS:  # One compilation per model and batch shape.
    _EVAL_STEPS[model] = jax.jit(lambda v, x, y: jnp.sum(
        jnp.argmax(model.apply(v, x, train=False), -1) == y))
  correct = _EVAL_STEPS[model]
  total = 0
  for images, labels in data_lib.eval_batches(ds, batch_size):
    total += int(correct(variables, images, labels))
  return total / ds.test.num_examples


def one_shot_masks(params, sparsity: float, scope: str):
  """Magnitude masks pruning ``⌊P·N⌋`` weights globally (``scope="global"``)
  or ``⌊P·n_l⌋`` per layer (``"layer"``): a mask tree (None = not prunable)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flipout_jax import selection  # pylint: disable=g-import-not-at-top
  from flipout_jax import trees  # pylint: disable=g-import-not-at-top
  from flipout_jax import unipts  # pylint: disable=g-import-not-at-top

  layout = trees.mask_like(params, trees.prunable_tree(params))
  weights = trees.prunable_leaves(layout, params)
  sizes = np.array([w.size for w in weights], np.int64)
  if scope == "global":
    pruned = int(math.floor(np.float64(sparsity) * int(sizes.sum())))
    masks = selection.top_k_masks(
        [jnp.abs(w.astype(jnp.float32)) for w in weights],
        [list(range(len(weights)))],
        jnp.asarray([int(sizes.sum()) - pruned], jnp.int32))
  else:
    masks = unipts.layer_magnitude_masks(
        weights, unipts.num_pruned(np.full(sizes.shape, sparsity), sizes))
  return trees.unflatten_prunable(layout, masks)


def mask_summary(masks) -> dict[str, Any]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flipout_jax import trees  # pylint: disable=g-import-not-at-top
  layers, size, pruned = {}, 0, 0
  for path, m in trees.leaves_with_paths(masks):
    m = np.asarray(m)
    k = int(m.size - np.count_nonzero(m))
    layers[path] = {"size": int(m.size), "pruned": k, "sparsity": k / m.size}
    size, pruned = size + m.size, pruned + k
  return {"sparsity": pruned / size, "prunable_weights": int(size),
          "pruned_weights": pruned, "layers": layers}


def baselines(model, variables, ds, calib_x, config, ucfg) -> dict[str, Any]:
  """One-shot magnitude pruning of the dense model, no training."""
  from flipout_jax import trees  # pylint: disable=g-import-not-at-top
  from flipout_jax import unipts  # pylint: disable=g-import-not-at-top
  has_bn = unipts.has_batch_stats(variables)
  note = ("recalibrated on the calibration set" if has_bn else
          "no-op: the model has no BatchNorm (identical to without)")
  out = {}
  for scope, name in (("global", "global_magnitude"),
                      ("layer", "uniform_magnitude")):
    masks = one_shot_masks(variables["params"], config.sparsity, scope)
    sparse = dict(variables, params=trees.apply_masks(variables["params"], masks))
    summary = mask_summary(masks)
    out[name] = dict(summary, bn_recalibration="none",
                     test_accuracy=test_accuracy(model, sparse, ds,
                                                 config.eval_batch_size))
    recal = unipts.recalibrate_batch_stats(model.apply, sparse, calib_x,
                                           batch_size=ucfg.bn_batch_size)
    acc = (test_accuracy(model, recal, ds, config.eval_batch_size) if has_bn
           else out[name]["test_accuracy"])
    out[name + "_bn"] = dict(summary, bn_recalibration=note, test_accuracy=acc)
  return out


# --- Files ---------------------------------------------------------------------------


def _atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _save_variables(path: str, variables) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flipout_jax import trees  # pylint: disable=g-import-not-at-top
  flat = {f"{c}/{p}": np.asarray(x) for c in ("params", "batch_stats")
          if c in variables for p, x in trees.leaves_with_paths(variables[c])}
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def final_line(result: dict[str, Any]) -> str:
  return (f"final test_accuracy={result['test_accuracy']!r} "
          f"sparsity={result['sparsity']!r}")


def finished_result(workdir: str, identity: dict[str, Any]):
  """The finished run in ``workdir`` if it has ``identity``; None if there is
  none; ``False`` if it is a run of another config or dense model."""
  path = os.path.join(workdir, "final.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      result = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  same = (result.get("config") == identity["config"]
          and result.get("dense", {}).get("config") == identity["dense_config"]
          and result.get("dense", {}).get("params_sha256")
          == identity["params_sha256"])
  return result if same else False


def _identity(config, dense: dict[str, Any]) -> dict[str, Any]:
  return {"config": unipts_config_json(config),
          "dense_config": dense["config"],
          "params_sha256": dense["params_sha256"]}


def default_workdir(config, name: str) -> str:
  mode = "search" if config.search else "uniform"
  return os.path.join("runs", name, mode, f"s{config.sparsity:g}",
                      f"seed{config.seed}")


# --- One run -------------------------------------------------------------------------


def run(config, dense_workdir: str | None, workdir: str, *,
        overwrite: bool = False, log=print) -> dict[str, Any]:
  """UniPTS of the dense run in ``dense_workdir``; returns ``final.json``.

  Raises:
    UniPTSError: bad config values, dense workdir or workdir (one line).
  """
  t_start = time.time()
  check_fields(config)
  dense = check_dense_workdir(dense_workdir)
  ucfg = validate(config)
  identity = _identity(config, dense)
  previous = finished_result(workdir, identity)
  if previous:
    log(f"{workdir}: finished before (final.json, same config and dense "
        "model); skipped.")
    log(final_line(previous))
    return previous
  if previous is False and not overwrite:
    raise UniPTSError(
        f"workdir: {workdir} holds a UniPTS run of another config or dense "
        "model; pass --overwrite to replace it, or another --workdir")

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import flipout_jax as fj  # pylint: disable=g-import-not-at-top
  from flipout_jax import unipts  # pylint: disable=g-import-not-at-top

  dense_cfg, dense_final = dense["config"], dense["final"]
  model, variables, ds = load_dense(dense_workdir, dense_cfg, config.data_dir)
  idx = calibration_indices(ds.train.num_examples, config.calibration_size,
                            config.seed)
  calib_x, calib_y = ds.train.read(idx)
  for f in RUN_FILES:
    if os.path.exists(os.path.join(workdir, f)):
      os.remove(os.path.join(workdir, f))
  os.makedirs(workdir, exist_ok=True)

  dense_acc = test_accuracy(model, variables, ds, config.eval_batch_size)
  reported = dense_final.get("test_accuracy")
  log(f"dense: {dense_cfg['model']} (width {dense_cfg['width']}) on "
      f"{dense_cfg['dataset']}, method {dense_cfg.get('method')}, seed "
      f"{dense_cfg.get('seed')}: test_accuracy {dense_acc:.4f}")
  if reported is not None and abs(reported - dense_acc) > 1e-6:
    log(f"warning: the dense run reported test_accuracy {reported}; its "
        f"final_params.npz gives {dense_acc} here")
  if dense_cfg.get("method", "dense") != "dense":
    log(f"note: the dense run's method is {dense_cfg.get('method')!r} "
        f"(sparsity {dense_final.get('sparsity')}); its final params are "
        "pruned as the dense model")

  t0 = time.time()
  base = baselines(model, variables, ds, calib_x, config, ucfg)
  t_base = time.time() - t0
  log(f"one-shot at {config.sparsity:g}: global magnitude test_accuracy "
      f"{base['global_magnitude']['test_accuracy']:.4f} (with BN "
      f"recalibration {base['global_magnitude_bn']['test_accuracy']:.4f}), "
      f"uniform layer-wise {base['uniform_magnitude']['test_accuracy']:.4f}")

  try:
    result = unipts.prune(
        model.apply, variables, calib_x, sparsity=float(config.sparsity),
        seed=config.seed, search=config.search,
        calibration_y=calib_y if config.calibration_labels == "true" else None,
        config=ucfg, log_fn=log)
  except ValueError as e:
    raise UniPTSError(main_lib.one_line(e)) from None
  sparse = jax.device_get(result.variables)
  accuracy = test_accuracy(model, sparse, ds, config.eval_batch_size)
  summary = mask_summary(result.masks)
  for path, layer in summary["layers"].items():
    layer["target"] = result.report["layers"][path]["target"]
  zeros = fj.sparsity_report(sparse["params"]).sparsity

  _save_variables(os.path.join(workdir, "final_params.npz"), sparse)
  report = dict(result.report, calibration_indices=idx.tolist())
  _atomic_write(os.path.join(workdir, "report.json"),
                json.dumps(report, indent=1, sort_keys=True, default=float))
  out = {
      "test_accuracy": accuracy,
      "sparsity": summary["sparsity"],
      "target_sparsity": float(config.sparsity),
      "zero_fraction": zeros,
      "prunable_weights": summary["prunable_weights"],
      "pruned_weights": summary["pruned_weights"],
      "layers": summary["layers"],
      "search": bool(config.search),
      "seed": config.seed,
      "calibration": {
          "split": "train", "size": int(idx.size),
          "labels": config.calibration_labels,
          "indices_sha256": hashlib.sha256(
              np.asarray(idx, np.int64).tobytes()).hexdigest()},
      "calibration_accuracy": result.report["accuracy"],
      "baselines": base,
      "dense": {
          "workdir": os.path.abspath(dense_workdir),
          "test_accuracy": dense_acc, "reported_test_accuracy": reported,
          "method": dense_cfg.get("method"), "model": dense_cfg["model"],
          "width": dense_cfg["width"], "dataset": dense_cfg["dataset"],
          "seed": dense_cfg.get("seed"), "config": dense_cfg,
          "params_sha256": dense["params_sha256"]},
      "time": {"baselines": round(t_base, 3),
               **{k: round(v, 3) for k, v in result.report["time"].items()},
               "total": round(time.time() - t_start, 3)},
      "config": identity["config"],
  }
  _atomic_write(os.path.join(workdir, "final.json"),
                json.dumps(out, indent=2, sort_keys=True))
  log(f"UniPTS ({'search' if config.search else 'uniform'}) at "
      f"{config.sparsity:g}: test_accuracy {accuracy:.4f}, sparsity "
      f"{summary['sparsity']:.6f} ({out['time']['total']:.1f} s)")
  log(final_line(out))
  return out


# --- The sweep -----------------------------------------------------------------------

ROWS = (  # (row label, run kind, baseline key or None)
    ("Global magnitude, one-shot (a)", "unipts", "global_magnitude"),
    ("Global magnitude + BN recalibration (b)", "unipts", "global_magnitude_bn"),
    ("Uniform layer-wise magnitude, one-shot", "unipts", "uniform_magnitude"),
    ("UniPTS without search: uniform P + sparse training (c)", "unipts_uniform",
     None),
    ("UniPTS: search + sparse training", "unipts", None),
)


def _forwarded(argv: Sequence[str], swept: Sequence[str]) -> list[str]:
  out = []
  for a in argv[1:]:
    if not a.startswith("--config."):
      continue
    field = a[len("--config."):].split("=", 1)[0].split(".")[0]
    if field in swept:
      print(f"note: --config.{field} is set by the sweep; ignoring {a}",
            file=sys.stderr)
      continue
    out.append(a)
  return out


def _run_unipts_subprocess(argv: list[str], workdir: str) -> tuple[int, float]:
  os.makedirs(workdir, exist_ok=True)
  cmd = [sys.executable, "-m", "experiments.unipts", *argv,
         f"--workdir={workdir}"]
  t0 = time.time()
  with open(os.path.join(workdir, "run.log"), "a") as log:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          check=False)
  return proc.returncode, round(time.time() - t0, 1)


def sweep_main(fv, argv: list[str]) -> None:
  from experiments import sweep  # pylint: disable=g-import-not-at-top
  from experiments import train  # pylint: disable=g-import-not-at-top

  config_path = config_flags.get_config_filename(fv["config"])
  name = main_lib.config_name(fv)
  out = os.path.abspath(fv["out"].value or
                        os.path.join(REPO, "experiments", "results", name))
  try:
    seeds = [int(s) for s in fv["seeds"].value]
    sparsities = [float(s) for s in fv["sparsities"].value]
  except ValueError as e:
    raise UniPTSError(
        f"--seeds/--sparsities: {main_lib.one_line(e)}") from None
  if not seeds or not sparsities:
    raise UniPTSError("--seeds/--sparsities: give at least one value each")
  forwarded = _forwarded(argv, ("seed", "sparsity", "search"))

  def config_for(*overrides):
    return parse_flags(["unipts", f"--config={config_path}", *forwarded,
                        *overrides])["config"].value

  # Plan and validate everything before running anything.
  dense_runs, unipts_runs = [], []
  for seed in seeds:
    c = config_for(f"--config.seed={seed}")
    try:
      train.validate(c)
    except train.ConfigError as e:
      raise UniPTSError(f"teacher recipe: {main_lib.one_line(e)}") from None
    teacher = {k: v for k, v in train.config_json(c).items()
               if k not in UNIPTS_FIELDS or k == "seed"}
    r = sweep.Run(method="dense", tag="dense", seed=seed, overrides=[],
                  workdir=os.path.join(out, "runs", "dense", f"seed{seed}"),
                  info={"teacher": teacher})
    dense_runs.append(r)
    for p in sparsities:
      for search in (True, False):
        overrides = [f"--config.sparsity={p!r}", f"--config.search={search}",
                     f"--config.seed={seed}"]
        c = config_for(*overrides)
        validate(c)
        kind = "unipts" if search else "unipts_uniform"
        unipts_runs.append(sweep.Run(
            method=kind, tag=f"{p:g}", seed=seed, overrides=overrides,
            workdir=os.path.join(out, "runs", kind, f"s{p:g}", f"seed{seed}"),
            config=c, info={"dense": r}))
  print(f"{len(dense_runs)} dense + {len(unipts_runs)} UniPTS runs, one at a "
        f"time, into {out}", flush=True)
  os.makedirs(out, exist_ok=True)

  for i, r in enumerate(dense_runs):
    final = os.path.join(r.workdir, "final.json")
    if os.path.exists(final):  # Compare the teacher recipe only.
      with open(final) as f:
        old = {k: v for k, v in json.load(f)["config"].items()
               if k not in UNIPTS_FIELDS or k == "seed"}
      if old != r.info["teacher"]:
        diff = sorted(k for k in set(old) | set(r.info["teacher"])
                      if old.get(k) != r.info["teacher"].get(k))
        raise UniPTSError(f"{r.workdir} holds a dense run of another teacher "
                          f"recipe (differs in {', '.join(diff)}); use another "
                          "--out")
    sweep.run_one(r, config_path, forwarded)
    res = r.result
    print(f"[dense {i + 1}/{len(dense_runs)}] seed{r.seed}: " + (
        f"test_accuracy={res['test_accuracy']:.4f} " + (
            "skipped (finished before)" if r.skipped else f"{r.seconds}s")
        if res else f"FAILED (exit {r.returncode}); see {r.workdir}/run.log"),
        flush=True)

  for i, r in enumerate(unipts_runs):
    d = r.info["dense"]
    if d.result is None:
      print(f"[unipts {i + 1}/{len(unipts_runs)}] {r.method} {r.tag} "
            f"seed{r.seed}: no dense model", flush=True)
      continue
    identity = _identity(r.config, check_dense_workdir(d.workdir))
    r.result = finished_result(r.workdir, identity) or None
    r.skipped = r.result is not None
    if not r.skipped:
      r.returncode, r.seconds = _run_unipts_subprocess(
          [f"--config={config_path}", *forwarded, *r.overrides,
           f"--dense_workdir={d.workdir}"], r.workdir)
      r.result = finished_result(r.workdir, identity) or None
    res = r.result
    print(f"[unipts {i + 1}/{len(unipts_runs)}] {r.method} {r.tag} "
          f"seed{r.seed}: " + (
              f"test_accuracy={res['test_accuracy']:.4f} "
              f"sparsity={res['sparsity']:.4f} " + (
                  "skipped (finished before)" if r.skipped
                  else f"{r.seconds}s")
              if res else f"FAILED (exit {r.returncode}); see "
              f"{r.workdir}/run.log"), flush=True)

  command = "python -m experiments.unipts " + " ".join(
      a if " " not in a else repr(a) for a in argv[1:])
  text = summarize(dense_runs, unipts_runs, config_for(), name, command,
                   os.path.relpath(config_path, REPO))
  _atomic_write(os.path.join(out, "results.md"), text)
  for r in unipts_runs:
    r.config, r.info = None, {"dense_workdir": r.info["dense"].workdir}
  sweep.write_json(dense_runs + unipts_runs, os.path.join(out, "results.json"))
  print(text)
  failed = [r for r in dense_runs + unipts_runs if not r.result]
  if failed:
    raise UniPTSError(f"{len(failed)} of {len(dense_runs) + len(unipts_runs)} "
                      "runs failed; see their run.log files")


def summarize(dense_runs, unipts_runs, config, name: str, command: str,
              config_path: str) -> str:
  from experiments import sweep  # pylint: disable=g-import-not-at-top
  cols = sorted({r.tag for r in unipts_runs}, key=float)
  seeds = sorted({r.seed for r in dense_runs})
  done = [r for r in unipts_runs if r.result]
  rows = []
  for label, kind, key in ROWS:
    for r in unipts_runs:
      if r.method != kind:
        continue
      res = r.result
      if res is not None and key is not None:
        res = res["baselines"][key]
      rows.append(sweep.Run(method=label, tag=r.tag, seed=r.seed,
                            overrides=[], result=res))
  labels = [label for label, _, _ in ROWS]
  header = "| method | " + " | ".join(f"P = {float(c):.0%}" for c in cols)
  acc = sweep.table(rows, labels, cols).splitlines()
  sp = sweep.table(rows, labels, cols, key="sparsity").splitlines()
  acc[0] = sp[0] = header + " |"
  dense = [r.result["test_accuracy"] for r in dense_runs if r.result]
  d0 = next((r.result for r in dense_runs if r.result), None)
  has_bn = bool(done) and done[0].result["baselines"]["global_magnitude_bn"][
      "bn_recalibration"].startswith("recalibrated")
  u = config.unipts
  lines = [
      f"# UniPTS post-training sparsity: {d0['model'] if d0 else '?'} on "
      f"{d0['dataset'] if d0 else '?'}",
      "",
      f"Config `{config_path}`. Dense teachers: `experiments.main` "
      f"(method dense, {config.num_epochs} epochs, batch {config.batch_size}, "
      f"SGD lr {config.lr} {config.lr_schedule}, momentum {config.momentum}, "
      f"weight decay {config.weight_decay}), seeds "
      f"{', '.join(map(str, seeds))}; each is pruned with the same seed. "
      f"Calibration set: {config.calibration_size} images of the train split "
      f"({config.calibration_labels} labels), drawn by the seed. UniPTS: "
      f"search population {u.population_size}, {u.generations} generations "
      f"({u.num_parents} parents, {u.crossover_children} crossover + "
      f"{u.mutation_children} mutation children), redistribute="
      f"{u.redistribute}; sparse training {u.epochs} epochs over the "
      f"calibration set, batch {u.batch_size}, SGD lr {u.learning_rate} "
      f"cosine with {u.warmup_epochs:g} warm-up epoch, distillation T="
      f"{u.temperature:g}, τ_e = {u.tau0:g}·{u.tau_decay:g}^e. "
      "Test accuracy (%) on the 1,000 test images, mean ± std over seeds.",
      "",
      f"Dense: {sweep.cell(dense)}",
      "",
      *acc,
      "",
      "Achieved sparsity (%) of the prunable weights:",
      "",
      *sp,
      "",
  ]
  if done:
    short = max(r.result["target_sparsity"] * r.result["prunable_weights"]
                - r.result["pruned_weights"] for r in done)
    lines += [
        "One-shot magnitude prunes exactly ⌊P·N⌋ (global) or ⌊P·n_l⌋ (per "
        "layer) weights; UniPTS prunes ⌊p_l·n_l⌋ per layer (the search "
        "decodes with `redistribute=True`, so Σ p_l·n_l = P·N): here at most "
        f"{short:.1f} weights short of P·N (N = "
        f"{done[0].result['prunable_weights']:,} prunable weights).", ""]
  if not has_bn:
    lines += [
        "(a) and (b) are the same numbers: the model has no BatchNorm, so "
        "BatchNorm recalibration is a no-op (UniPTS's own recalibration "
        "steps are skipped for the same reason). (c) is UniPTS with "
        "`--config.search=False`: P in every layer, then the same sparse "
        "training with distillation.", ""]
  search = [r for r in done if r.method == "unipts"]
  if search:
    paths = list(search[0].result["layers"])
    lines += ["Per-layer sparsity (%) found by the search (mean over seeds):",
              "", "| P | " + " | ".join(paths) + " |",
              "|---|" + "---:|" * len(paths)]
    for c in cols:
      rs = [r.result for r in search if r.tag == c]
      lines.append(f"| {float(c):.0%} | " + " | ".join(
          sweep.cell([x["layers"][p]["sparsity"] for x in rs])
          for p in paths) + " |")
    lines.append("")
  def mean(xs):
    return sum(xs) / max(len(xs), 1)

  dense_t = [r.result["time"] for r in dense_runs if r.result]
  parts = []
  for kind in ("unipts", "unipts_uniform"):
    ts = [r.result["time"] for r in done if r.method == kind]
    if ts:
      parts.append(
          f"{kind} {mean([t['total'] for t in ts]):.0f} (one-shot baselines "
          f"{mean([t['baselines'] for t in ts]):.0f}, search "
          f"{mean([t['search'] for t in ts]):.0f}, sparse training "
          f"{mean([t['train'] for t in ts]):.0f})")
  lines += ["Wall time per run (s, mean, 2 CPU cores shared with other "
            f"jobs): dense training {mean(dense_t):.0f}; " + "; ".join(parts)
            + ".", ""]
  failed = [r for r in dense_runs + unipts_runs if not r.result]
  if failed:
    lines += ["Failed or missing runs (see run.log in the workdir):", ""]
    lines += [f"* {r.workdir}" for r in failed] + [""]
  lines += ["Commands (everything, resumable; one process at a time):", "",
            f"    {command}", "",
            "which runs, per seed k and sparsity P:", "",
            f"    python -m experiments.main --config={config_path} "
            "--config.seed=k --workdir=<out>/runs/dense/seedk --resume",
            f"    python -m experiments.unipts --config={config_path} "
            "--config.sparsity=P --config.search=True --config.seed=k "
            "--dense_workdir=<out>/runs/dense/seedk "
            "--workdir=<out>/runs/unipts/sP/seedk",
            "    (and --config.search=False into <out>/runs/unipts_uniform/sP/"
            "seedk)", ""]
  return "\n".join(lines)


# --- Entry point ---------------------------------------------------------------------


def run_main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  """The CLI: parses ``argv`` (default sys.argv), runs, returns final.json.

  Raises:
    SystemExit: ``error: ...`` (one line) for bad flags, config values or
      workdirs.
  """
  argv = list(sys.argv if argv is None else argv)
  fv = parse_flags(argv)
  logging.set_verbosity(logging.WARNING)
  config = fv["config"].value
  try:
    if fv["sweep"].value:
      sweep_main(fv, argv)
      return None
    check_fields(config)
    workdir = fv["workdir"].value or default_workdir(
        config, main_lib.config_name(fv))
    return run(config, fv["dense_workdir"].value, workdir,
               overwrite=fv["overwrite"].value)
  except UniPTSError as e:
    raise SystemExit(f"error: {main_lib.one_line(e)}") from None


if __name__ == "__main__":
  run_main()
