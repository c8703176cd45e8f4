"""The train loop: one jitted step, per-epoch evaluation, checkpoints, resume.

:func:`run` writes into ``workdir`` a ``metrics.jsonl`` line and an Orbax
checkpoint per epoch, then ``sparsity.md``, ``curves.png``, ``final_params.npz``,
``final.json`` and the line ``final test_accuracy=<float> sparsity=<float>``.
Faults are one line (:class:`RunError`, :class:`ConfigError`): a non-finite loss
(that epoch unsaved), a full disk, an unwritable workdir or one a live run holds
(``flock`` on ``.lock``); a checkpoint that does not restore goes to
``checkpoints.bad/``. A run killed and resumed ends with the same bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from ml_collections import config_dict

import flipout_jax as fj
from experiments import data as data_lib
from experiments import recipe
from flipout_jax import models as models_lib

ConfigError = recipe.ConfigError
ConfigDict = config_dict.ConfigDict


class RunError(RuntimeError):
  """A run that cannot go on (non-finite loss, full disk); one-line message."""


CHECKPOINT_DIR = "checkpoints"
BAD_CHECKPOINT_DIR = "checkpoints.bad"
LOCK_FILE = ".lock"
RUN_FILES = ("metrics.jsonl", "final.json", "sparsity.md", "curves.png",
             "report.json", "final_params.npz", "config.json")


def validate(config: ConfigDict) -> list[recipe.Phase]:
  """Builds ``config`` at 1,000 nominal steps per epoch; raises ConfigError."""
  ints = {"seed": 0, "batch_size": 1, "eval_batch_size": 1, "num_epochs": 1}
  missing = [k for k in ("method", "model", "width", "dataset", *ints)
             if k not in config]
  if missing:
    raise ConfigError(f"config: missing fields {', '.join(missing)}")
  try:
    fj.validate.choice(config.model, "model", models_lib.MODEL_NAMES + models_lib.GPT_NAMES)
    fj.validate.choice(config.dataset, "dataset", data_lib.DATASETS)
    models_lib.check_width(config.width)
    for key, low in ints.items():
      fj.validate.integer(config[key], key, low=low)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  spec = recipe.resolve(config_json(config))
  phases = recipe.phases(spec, 1000)
  for phase in phases:
    if phase.make_tx is not None and phase.enter is None:
      phase.make_tx(None)
  return phases


@dataclasses.dataclass
class _Setup:
  config: ConfigDict
  ds: data_lib.Dataset
  model: Any
  has_bn: bool
  steps_per_epoch: int
  phases: list[recipe.Phase]
  starts: list[int]  # first global epoch of each phase
  params0: Any
  batch_stats0: Any
  eval_step: Any

  @property
  def total_epochs(self) -> int:
    return self.starts[-1] + self.phases[-1].num_epochs

  def phase_of_epoch(self, epoch: int) -> int:
    """The phase that trains global epoch ``epoch`` (phases with epochs)."""
    return max(j for j, p in enumerate(self.phases)
               if p.num_epochs and self.starts[j] <= epoch)

  def template_aux(self, j: int):
    """An ``aux`` with phase ``j``'s structure (from the initial params)."""
    enter = self.phases[j].enter
    return None if enter is None else enter(self.params0)[1]


def load_variables(workdir: str, template) -> dict[str, Any]:
  """The finished run in ``workdir``'s final variables, shaped as ``template``."""
  if not os.path.exists(os.path.join(workdir, "final.json")):
    raise ConfigError(f"init_from: {workdir} holds no finished run (no "
                      "final.json); finish it first (experiments.main --resume)")
  saved = load_final_params(workdir)

  def load(collection, path, leaf):
    key = f"{collection}/{fj.trees.path_str(path)}"
    if key not in saved or saved[key].shape != leaf.shape:
      raise ConfigError(
          f"init_from: {workdir}/final_params.npz does not match the model: "
          f"{key} is {saved[key].shape if key in saved else 'missing'}, "
          f"expected {leaf.shape}")
    return jnp.asarray(saved[key], leaf.dtype)
  return {c: jax.tree_util.tree_map_with_path(functools.partial(load, c), tree)
          for c, tree in template.items()}


def _setup(config: ConfigDict) -> _Setup:
  """The data, model, phases and initial variables of a validated ``config``."""
  try:
    ds = data_lib.load(config.dataset, data_dir=config.data_dir,
                       **dict(config.get("data_kw") or {}))
    spe = data_lib.steps_per_epoch(ds, config.batch_size)
    if config.augment and not ds.augment:
      raise ConfigError(f"augment: {config.dataset} has no augmentation (CIFAR "
                        "data sets only); set augment=None or False")
    is_gpt = config.model in models_lib.GPT_NAMES
    if is_gpt != isinstance(ds.train, data_lib.TextSplit):
      raise ConfigError(f"model: {config.model} does not take {config.dataset}'s"
                        " inputs (GPT models: text data sets; others: images)")
    if is_gpt:  # The data's vocabulary and window; model_kw the rest.
      model = models_lib.get_gpt(config.model, vocab_size=ds.train.num_classes,
                                 max_len=ds.train.seq_len, **config.get("model_kw", {}))
    else:
      model = models_lib.get_model(
          config.model, num_classes=ds.train.num_classes, width=config.width)
    has_bn = not is_gpt and models_lib.uses_batchnorm(config.model)
    # Jitted: eager init compiles every op of a deep model one by one.
    init, eval_step = _cached(
        (config.model, config.width, config.dataset, str(config.get("model_kw")),
         str(config.get("data_kw"))),
        lambda: (jax.jit(lambda r, x: model.init(r, x, train=False)),
                 _make_eval_step(model, has_bn)))
    dummy = jnp.zeros_like(ds.train.read(np.arange(1))[0])
    variables = dict(init(jax.random.PRNGKey(config.seed), dummy))
    if config.init_from:
      variables = load_variables(config.init_from, variables)
    phases = recipe.phases(recipe.resolve(config_json(config)), spe, example=(
        lambda v, x: model.apply(v, x, train=False), variables, dummy))
    starts = list(np.cumsum([0] + [p.num_epochs for p in phases[:-1]]).tolist())
    setup = _Setup(config, ds, model, has_bn, spe, phases, starts,
                   variables["params"], variables.get("batch_stats", {}), eval_step)
    # Every phase's tx built now: a bad value fails before training.
    for j, phase in enumerate(phases):
      if phase.make_tx is not None:
        phase.make_tx(setup.template_aux(j)).init(setup.params0)
  except ConfigError:
    raise
  except (ValueError, data_lib.DatasetNotPreparedError) as e:
    raise ConfigError(recipe.one_line(e)) from None
  return setup


def _logits(model, has_bn, params, batch_stats, images, train):
  """``(logits, batch_stats)``; BatchNorm statistics updated when training."""
  if not has_bn:
    return model.apply({"params": params}, images, train=train), batch_stats
  variables = {"params": params, "batch_stats": batch_stats}
  if not train:
    return model.apply(variables, images, train=False), batch_stats
  logits, updated = model.apply(variables, images, train=True, mutable=["batch_stats"])
  return logits, updated["batch_stats"]


def _make_train_step(model, tx, has_bn: bool):
  def train_step(state, images, labels):
    def loss_fn(params, train=True, temperature=1.0):
      logits, stats = _logits(model, has_bn, params, state["batch_stats"],
                              images, train)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits / temperature, labels).mean(), stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    # The batch's eval-mode loss, for the methods that score with it.
    eval_loss = lambda p, *, temperature=1.0: loss_fn(p, False, temperature)[0]
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"],
                                   loss_fn=eval_loss)
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, loss

  return jax.jit(train_step)


# Jitted functions by what they depend on: runs in one process compile once.
_STEP_CACHE: dict[tuple[Any, ...], Any] = {}


def _cached(key, make):
  if key not in _STEP_CACHE:
    if len(_STEP_CACHE) >= 16:
      _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
    _STEP_CACHE[key] = make()
  return _STEP_CACHE[key]


def _train_step_for(setup: _Setup, j: int, tx):
  """A phase with ``enter`` builds its tx from data (aux): not cached."""
  if setup.phases[j].enter is not None:
    return _make_train_step(setup.model, tx, setup.has_bn)
  return _cached((json.dumps(config_json(setup.config), sort_keys=True), j),
                 lambda: _make_train_step(setup.model, tx, setup.has_bn))


def _make_eval_step(model, has_bn: bool):
  def eval_step(params, batch_stats, images, labels):
    logits, _ = _logits(model, has_bn, params, batch_stats, images, False)
    return (jnp.sum(jnp.argmax(logits, -1) == labels),
            optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum())
  return jax.jit(eval_step)


def evaluate(setup: _Setup, params, batch_stats) -> dict[str, float]:
  """``test_accuracy`` of every label (text: every position); for text also
  ``val_loss`` (mean next-byte cross-entropy) and ``val_perplexity`` (its exp)."""
  correct, loss, n = 0, 0.0, 0
  for x, labels in data_lib.eval_batches(setup.ds, setup.config.eval_batch_size):
    c, s = setup.eval_step(params, batch_stats, x, labels)
    correct, loss, n = correct + int(c), loss + float(s), n + labels.size
  text = isinstance(setup.ds.test, data_lib.TextSplit)
  return {"test_accuracy": correct / n, **({"val_loss": loss / n, "val_perplexity":
                                            float(np.exp(loss / n))} if text else {})}


def masks_of(opt_state):
  """The masks of a flipout_jax state, or None for a plain optimizer."""
  return fj.get_masks(opt_state) if fj.core.find_prune_states(opt_state) else None


def _flat(prefix: str, tree) -> dict[str, Any]:
  return {f"{prefix}{i}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _unflat(prefix: str, template, restored: dict[str, Any]):
  treedef = jax.tree.structure(template)
  return jax.tree.unflatten(treedef, [restored[f"{prefix}{i}"] for i in range(treedef.num_leaves)])


def _checkpoint_item(state, aux, meta: dict[str, Any]) -> dict[str, Any]:
  return {**_flat("s", state), **_flat("a", aux), **meta}


def _manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           cleanup_tmp_directories=True))


def _atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def lock_workdir(workdir: str):
  """Creates ``workdir`` and locks it (``flock`` on ``.lock``, holding our pid;
  close the file to release); ConfigError: not writable, or held (its pid)."""
  f = None
  try:
    os.makedirs(workdir, exist_ok=True)
    f = open(os.path.join(workdir, LOCK_FILE), "a+")  # pylint: disable=consider-using-with
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    raise ConfigError(
        f"workdir: {workdir} is in use by another run (pid {holder}); wait "
        "for it to end, stop it, or use another --workdir") from None
  except OSError as e:
    if f is not None:
      f.close()
    raise ConfigError(f"workdir: cannot write to {workdir}: "
                      f"{e.strerror or e}") from None
  return f


def is_no_space(e: BaseException) -> bool:
  """Whether ``e`` or an exception it came from is a full disk (ENOSPC)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if ((isinstance(e, OSError) and e.errno == errno.ENOSPC)
        or os.strerror(errno.ENOSPC) in str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def _not_no_space(record: logging.LogRecord) -> bool:
  """A filter: drops the full-disk tracebacks Orbax's background saves log."""
  return not (record.exc_info and is_no_space(record.exc_info[1]))


def first_non_finite(losses: np.ndarray) -> int | None:
  """The index of the first non-finite entry of ``losses``, or None."""
  bad = np.flatnonzero(~np.isfinite(losses))
  return int(bad[0]) if bad.size else None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The parseable lines of ``metrics.jsonl`` (a killed run may leave half a line)."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  with contextlib.suppress(FileNotFoundError), open(path) as f:
    for line in f:
      with contextlib.suppress(json.JSONDecodeError):
        rows.append(json.loads(line))
  return rows


def _truncate_metrics(workdir: str, completed: int) -> None:
  rows = [r for r in read_metrics(workdir) if r.get("epoch", 0) <= completed]
  _atomic_write(os.path.join(workdir, "metrics.jsonl"),
                "".join(json.dumps(r) + "\n" for r in rows))


def plot_curves(workdir: str, title: str = "") -> str:
  """``curves.png``: test accuracy and sparsity against the epoch."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = read_metrics(workdir)
  epochs = [r["epoch"] for r in rows]
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(epochs, [100 * r["test_accuracy"] for r in rows], "C0-", label="test accuracy")
  ax.set(xlabel="epoch", title=title)
  ax.set_ylabel("test accuracy (%)", color="C0")
  ax2 = ax.twinx()
  ax2.plot(epochs, [100 * r["sparsity"] for r in rows], "C1--", label="sparsity")
  ax2.set_ylabel("sparsity (%)", color="C1")
  ax2.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, "curves.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def final_line(result: dict[str, Any]) -> str:
  return (f"final test_accuracy={result['test_accuracy']!r} "
          f"sparsity={result['sparsity']!r}" + "".join(
              f" {k}={result[k]!r}" for k in ("val_loss", "val_perplexity")
              if k in result))


def config_json(config: ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _check_workdir(config: ConfigDict, workdir: str, resume: bool,
                   overwrite: bool) -> None:
  has_run = (os.path.exists(os.path.join(workdir, CHECKPOINT_DIR))
             or any(os.path.exists(os.path.join(workdir, f)) for f in RUN_FILES))
  if overwrite:
    shutil.rmtree(os.path.join(workdir, CHECKPOINT_DIR), ignore_errors=True)
    for f in RUN_FILES:
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(workdir, f))
  elif has_run and not resume:
    raise ConfigError(
        f"workdir: {workdir} holds an unfinished run; pass --resume to "
        "continue it, --overwrite to start over, or another --workdir")
  if resume and not overwrite:
    check_same_config(config, workdir)


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """The fields a run uses in which two configs (as :func:`config_json`)
  differ (``recipe.same_run``: old-shape configs upgraded first)."""
  try:
    return recipe.same_run(old, new)
  except ConfigError as e:  # Not a config of a run this harness makes.
    return [f"config ({recipe.one_line(e)})"]


def check_same_config(config: ConfigDict, workdir: str) -> None:
  """Raises ConfigError if ``workdir`` holds a run of another config."""
  saved = os.path.join(workdir, "config.json")
  if not os.path.exists(saved):
    return
  with open(saved) as f:
    old = json.load(f)
  diff = config_diff(old, config_json(config))
  if diff:
    raise ConfigError(
        f"workdir: {workdir} holds a run of another config (differs in "
        f"{', '.join(diff)}); resume with the same config or use another "
        "--workdir")


def run(config: ConfigDict, workdir: str, *, resume: bool = False,
        overwrite: bool = False, progress: bool = True,
        stop_after_epochs: int | None = None) -> dict[str, Any] | None:
  """Trains ``config`` in ``workdir``; returns the final result (at once for a
  finished run of the same config; ``overwrite`` deletes it first). ``resume``:
  from the newest checkpoint that restores (else from scratch, saying so);
  ``progress``: a tqdm bar; ``stop_after_epochs``: return None after that many
  epochs, as if killed. ConfigError (bad config or workdir, resume and
  overwrite) or RunError (non-finite loss, no space left)."""
  t_start = time.time()
  if resume and overwrite:
    raise ConfigError("--resume and --overwrite: give at most one (--resume "
                      "continues the run in the workdir, --overwrite deletes "
                      "it and starts over)")
  validate(config)
  if not overwrite and os.path.exists(os.path.join(workdir, "final.json")):
    check_same_config(config, workdir)
    with open(os.path.join(workdir, "final.json")) as f:
      result = json.load(f)
    print(f"{workdir}: finished before (final.json); skipped.", flush=True)
    print(final_line(result), flush=True)
    return result
  lock = lock_workdir(workdir)
  loggers = (logging.getLogger(), logging.getLogger("absl"))
  for logger in loggers:
    logger.addFilter(_not_no_space)
  try:
    _check_workdir(config, workdir, resume, overwrite)
    setup = _setup(config)
    return _train(setup, workdir, resume, progress, stop_after_epochs, t_start)
  except (ConfigError, RunError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    if is_no_space(e):
      raise RunError(
          f"no space left on {workdir}; the checkpoints committed before are "
          "intact: free space, then rerun with --resume") from None
    raise
  finally:
    for logger in loggers:
      logger.removeFilter(_not_no_space)
    lock.close()


def _restore(setup: _Setup, mgr, step: int):
  """``(phase index, state, aux, elapsed)`` of checkpoint ``step``."""
  ckpt_phase = setup.phase_of_epoch(step - 1)
  phase = setup.phases[ckpt_phase]
  template_aux = setup.template_aux(ckpt_phase)
  state = {"params": setup.params0, "batch_stats": setup.batch_stats0}
  template = dict(state, opt_state=phase.make_tx(template_aux).init(setup.params0))
  restored = mgr.restore(step, args=ocp.args.StandardRestore(_checkpoint_item(
      template, template_aux, {"epoch": 0, "step": 0, "elapsed": 0.0})))
  # Fresh uncommitted copies keep the jitted steps' cache keys.
  restored = {k: jnp.asarray(np.asarray(v)) if isinstance(v, jax.Array) else v
              for k, v in restored.items()}
  return (ckpt_phase, _unflat("s", template, restored),
          _unflat("a", template_aux, restored), float(restored["elapsed"]))


def _restore_newest(setup: _Setup, workdir: str):
  """``(manager, step, restored)`` of the newest checkpoint that restores (or
  None, None); newer ones go to ``checkpoints.bad/``, with a warning each."""
  mgr = _manager(workdir)
  bad = []
  found = None, None
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      found = step, _restore(setup, mgr, step)
      break
    except Exception as e:  # pylint: disable=broad-except
      path = os.path.join(workdir, CHECKPOINT_DIR, str(step))
      print(f"warning: checkpoint {path} does not restore "
            f"({recipe.one_line(e)[:300]}); moved to {BAD_CHECKPOINT_DIR}/, "
            "trying an older one", file=sys.stderr, flush=True)
      bad.append(step)
  if bad:
    mgr.close()
    os.makedirs(os.path.join(workdir, BAD_CHECKPOINT_DIR), exist_ok=True)
    for step in bad:
      target = os.path.join(workdir, BAD_CHECKPOINT_DIR, str(step))
      shutil.rmtree(target, ignore_errors=True)
      os.replace(os.path.join(workdir, CHECKPOINT_DIR, str(step)), target)
    mgr = _manager(workdir)
  return (mgr, *found)


def _train(setup: _Setup, workdir: str, resume: bool, progress: bool,
           stop_after_epochs: int | None, t_start: float):
  config, spe, total_epochs = setup.config, setup.steps_per_epoch, setup.total_epochs
  _atomic_write(os.path.join(workdir, "config.json"),
                json.dumps(config_json(config), indent=2, sort_keys=True))
  state = {"params": setup.params0, "batch_stats": setup.batch_stats0,
           "opt_state": None}
  completed, elapsed0, ckpt_phase, aux = 0, 0.0, -1, None
  mgr, latest, restored = (_restore_newest(setup, workdir) if resume
                           else (_manager(workdir), None, None))
  if latest is not None:
    completed = int(latest)
    ckpt_phase, state, aux, elapsed0 = restored
    print(f"{workdir}: resumed after epoch {completed}/{total_epochs} "
          f"(phase {setup.phases[ckpt_phase].name}).", flush=True)
  elif resume:
    print(f"{workdir}: nothing to resume (no checkpoint); starting fresh.", flush=True)
  _truncate_metrics(workdir, completed)

  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm.tqdm(total=total_epochs * spe, initial=completed * spe, unit="step",
                  disable=True if not progress else None, dynamic_ncols=True,
                  desc=config.method)
  metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a")
  failed, masks = True, None
  try:
    for j, phase in enumerate(setup.phases):
      if j < ckpt_phase:
        continue
      if phase.post is not None:  # Post-training: once, from the params.
        variables = {"params": state["params"]}
        if setup.has_bn:
          variables["batch_stats"] = state["batch_stats"]
        variables, masks, report = phase.post(setup.model, variables, setup.ds)
        state = dict(state, params=variables["params"],
                     batch_stats=variables.get("batch_stats", {}))
        _atomic_write(os.path.join(workdir, "report.json"), json.dumps(
            report, indent=1, sort_keys=True, default=float))
        continue
      if j > ckpt_phase:  # A fresh start of phase j.
        aux = None
        if phase.enter is not None:
          params, aux = phase.enter(state["params"])
          state = dict(state, params=params)
        tx = phase.make_tx(aux)
        state = dict(state, opt_state=tx.init(state["params"]))
      else:
        tx = phase.make_tx(aux)
      train_step = _train_step_for(setup, j, tx)
      start, end = setup.starts[j], setup.starts[j] + phase.num_epochs
      for epoch in range(max(completed, start), end):
        losses = []
        for images, labels in data_lib.train_batches(
            setup.ds, config.batch_size, seed=config.seed, epoch=epoch,
            augment=config.augment):
          state, loss = train_step(state, images, labels)
          losses.append(loss)
          bar.update(1)
        # One fetch per epoch, no sync per step.
        losses = np.asarray(jax.device_get(losses), np.float32)
        bad = first_non_finite(losses)
        if bad is not None:
          raise RunError(
              f"non-finite training loss ({losses[bad]}) at step "
              f"{epoch * spe + bad + 1} (epoch {epoch + 1}/{total_epochs}); "
              f"stopped without saving that epoch: lower lr (now "
              f"{config.lr}) or guard the optimizer (optax.apply_if_finite)")
        completed = epoch + 1
        scores = evaluate(setup, state["params"], state["batch_stats"])
        row = {
            "epoch": completed, "step": completed * spe, "phase": phase.name,
            # The float32 running sum, in step order.
            "train_loss": float(np.cumsum(losses, dtype=np.float32)[-1]) / spe,
            **scores,
            "sparsity": fj.sparsity_report(
                state["params"], masks_of(state["opt_state"])).sparsity,
            "lr": float(phase.learning_rate((completed - start) * spe - 1)),
            "time": round(elapsed0 + time.time() - t_start, 3)}
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        mgr.save(completed, args=ocp.args.StandardSave(_checkpoint_item(
            state, aux, {"epoch": completed, "step": completed * spe,
                         "elapsed": row["time"]})))
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{scores['test_accuracy']:.4f}",
                        sparsity=f"{row['sparsity']:.4f}")
        if bar.disable:
          val = "".join(f" {k} {v:.4f}" for k, v in scores.items() if k[:4] == "val_")
          print(f"epoch {completed}/{total_epochs} [{phase.name}] loss {row['train_loss']:.4f}"
                f" test_accuracy {scores['test_accuracy']:.4f} sparsity {row['sparsity']:.4f}"
                f" lr {row['lr']:.3g} ({row['time']:.1f}s){val}", flush=True)
        if stop_after_epochs is not None and completed >= stop_after_epochs:
          mgr.wait_until_finished()
          failed = False
          return None
      ckpt_phase = j
    mgr.wait_until_finished()
    failed = False
  finally:
    bar.close()
    metrics_file.close()
    # After a failure closing may fail the same way: report the first error.
    with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
      mgr.close()

  return _finish(setup, workdir, state, completed,
                 elapsed0 + time.time() - t_start, masks)


def _finish(setup: _Setup, workdir: str, state, completed: int,
            elapsed: float, masks=None) -> dict[str, Any]:
  config, params = setup.config, state["params"]
  scores = evaluate(setup, params, state["batch_stats"])
  masks = masks_of(state["opt_state"]) if masks is None else masks
  report = fj.sparsity_report(params, masks)
  zeros = fj.sparsity_report(params)
  text = (f"# Sparsity: {config.method}, {config.model} on {config.dataset}, "
          f"seed {config.seed}\n\n"
          f"{'From the masks' if masks is not None else 'Exact zeros'}; "
          f"test accuracy {100 * scores['test_accuracy']:.2f}%.\n\n{report}\n")
  print(report, flush=True)
  _atomic_write(os.path.join(workdir, "sparsity.md"), text)
  flat = {f"{c}/{p}": np.asarray(x) for c in ("params", "batch_stats")
          for p, x in fj.trees.leaves_with_paths(state[c])}
  np.savez(os.path.join(workdir, "final_params.npz"), **flat)
  plot_curves(workdir, f"{config.method}: {config.model} on {config.dataset}, "
              f"seed {config.seed}")
  result = {
      **scores, "sparsity": report.sparsity,
      "zero_fraction": zeros.sparsity, "prunable_weights": report.size,
      "pruned_weights": report.zeros, "layers": report.as_dict(),
      "epochs": completed, "steps": completed * setup.steps_per_epoch,
      "method": config.method, "model": config.model,
      "dataset": config.dataset, "seed": config.seed,
      "time": round(elapsed, 3), "config": config_json(config), **setup.ds.info}
  _atomic_write(os.path.join(workdir, "final.json"),
                json.dumps(result, indent=2, sort_keys=True))
  print(final_line(result), flush=True)
  return result


def load_final_params(workdir: str) -> dict[str, np.ndarray]:
  """The arrays of ``final_params.npz`` keyed ``params/<path>``."""
  with np.load(os.path.join(workdir, "final_params.npz")) as f:
    return {k: f[k] for k in f.files}

