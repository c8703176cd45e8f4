"""Tests of experiments/: configs, the method registry, the CLI, resume, the sweep.

Runs train a narrow LeNet-300-100 (width 0.25) on the embedded `digits` for a
few epochs; the CLI is called in-process (``main.run_main``) except where a
real process is needed (the SIGKILL test and one error check).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import flax.linen as nn
import numpy as np
import pytest

from experiments import main
from experiments import recipe
from experiments import sweep
from experiments import train
from experiments.configs import _base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
MAIN_CONFIG = os.path.join(CONFIG_DIR, "flipout_lenet300100_mnist5k.py")
CIFAR_CONFIGS = [os.path.join(CONFIG_DIR, f"flipout_{m}_cifar10.py")
                 for m in ("vgg19", "resnet18")]

# digits: 1,438 training images; batch 64 -> 22 steps per epoch.
TINY = ["--config.dataset=digits", "--config.width=0.25",
        "--config.batch_size=64", "--config.eval_batch_size=500",
        "--config.num_epochs=2", "--config.method_kw.every_epochs=0.5",
        "--config.lr=0.05", "--config.lr_decay_epochs=(1.5,)", "--noprogress"]


def load_config(path=MAIN_CONFIG, *overrides):
  return main.parse_flags(["prog", f"--config={path}", *overrides])["config"].value


def cli(workdir, *args):
  return main.run_main(["prog", f"--config={MAIN_CONFIG}", *TINY, *args,
                        f"--workdir={workdir}"])


def final_params(workdir):
  return train.load_final_params(str(workdir))


def assert_bit_identical(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


# --- Configs ---------------------------------------------------------------------


def config_files():
  return sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                if not os.path.basename(p).startswith("_"))


def test_config_files_exist():
  names = {os.path.basename(p) for p in config_files()}
  assert {"flipout_lenet300100_mnist5k.py", "flipout_lenet5_mnist5k.py",
          "flipout_vgg19_cifar10.py", "flipout_resnet18_cifar10.py"} <= names


def spec(path=MAIN_CONFIG, *overrides):
  return recipe.resolve(train.config_json(load_config(path, *overrides)))


@pytest.mark.parametrize("path", config_files(), ids=os.path.basename)
def test_every_config_loads_and_validates(path):
  # The N:M config's sparsity is 1 - N/M of the structure a run names.
  config = load_config(path, *(["--config.structure=2:4"] if "nm_" in path else []))
  phases = train.validate(config)
  assert phases and recipe.resolve(train.config_json(config))["method"]


def test_main_job_config_reaches_99_percent():
  config = load_config()
  assert config.method == "flipout" and config.model == "lenet300100"
  assert config.dataset == "mnist_5k" and config.batch_size == 128
  kw = spec()["method_kw"]
  assert kw["sparsity"] == 1 - 0.5 ** 8 >= 0.99  # the events at 9, 18, ..., 72
  assert (kw["every_epochs"], kw["prune_rate"], kw["p"]) == (9.0, 0.5, 2.0)
  assert kw["noise_scale"] == 1.0 and kw["seed"] == 42
  # Every paper target fits the main job's schedule (used by the sweep).
  for t in _base.PAPER_TARGETS:
    train.validate(load_config(MAIN_CONFIG, f"--config.target={t}"))


@pytest.mark.parametrize("path", CIFAR_CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("target,every,events", [
    (75, 117, 2), (93.75, 70, 4), (98.44, 50, 6), (99.61, 39, 8), (99.9, 32, 10)])
def test_cifar_targets_give_the_papers_sparsities(path, target, every, events):
  config = load_config(path, f"--config.target={target}")
  assert config.num_epochs == 350 and config.lr == 0.1
  assert config.optimizer_kw.momentum == 0.9 and config.weight_decay == 5e-4
  assert config.batch_size == 128 and tuple(config.lr_decay_epochs) == (150, 250)
  assert config.augment is True
  s = spec(path, f"--config.target={target}")
  assert s["method_kw"]["every_epochs"] == every
  # Events at k * every < 350, never at the last epoch.
  assert events * every < 350 <= (events + 1) * every
  assert s["method_kw"]["sparsity"] == 1 - 0.5 ** events
  assert abs(100 * s["method_kw"]["sparsity"] - target) < 5e-3
  assert load_config(f"{path}:{target}").target == target
  kw, _ = recipe._steps(s, 391)  # pylint: disable=protected-access
  assert kw["every"] == every * 391


def test_explicit_sparsity_and_end_epoch():
  kw, _ = recipe._steps(spec(MAIN_CONFIG, "--config.sparsity=0.99"), 31)  # pylint: disable=protected-access
  assert (kw["sparsity"], kw["every"], kw["start_step"]) == (0.99, 9 * 31, 0)
  c = load_config(MAIN_CONFIG, "--config.sparsity=0.9")
  c.unlock()
  c.method_kw.every_epochs = None
  c.method_kw.end_epoch = 40.0
  kw, _ = recipe._steps(recipe.resolve(train.config_json(c)), 31)  # pylint: disable=protected-access
  assert kw["end_step"] == 40 * 31 and kw["every"] is None


def test_any_registry_method_by_name_and_presets():
  c = load_config(MAIN_CONFIG, "--config.method=random")
  s = recipe.resolve(train.config_json(c))
  assert s["method"] == "random_pruning"
  valid = recipe.keywords("random_pruning")
  assert {recipe.canonical(k, valid)[0] for k in s["method_kw"]} == set(valid)
  c.unlock()
  c.presets.my_flipout = {"method": "flipout", "p": 1.0}
  c.method = "my_flipout"
  s = recipe.resolve(train.config_json(c))
  assert s["method"] == "flipout" and s["method_kw"]["p"] == 1.0
  phases = recipe.phases(s, 31)
  assert [p.name for p in phases] == ["train"] and phases[0].num_epochs == 80
  hoyer = recipe.phases(spec(MAIN_CONFIG, "--config.method=hoyer_square"), 31)
  assert [(p.name, p.num_epochs) for p in hoyer] == [("train", 80), ("finetune", 20)]


# --- Errors ------------------------------------------------------------------------


@pytest.mark.parametrize("args,names", [
    (["--config.method=magic"], ["method", "magic", "flipout", "snip", "dense"]),
    (["--config.model=vgg99"], ["model", "vgg99", "lenet300100"]),
    (["--config.dataset=imagenet"], ["imagenet", "mnist_5k"]),
    (["--config.nosuchfield=1"], ["unknown field nosuchfield", "sparsity"]),
    (["--config.num_epochs=abc"], ["num_epochs", "abc"]),
    (["--config.sparsity=1.5"], ["method_kw.sparsity", "1.5"]),
    (["--config.sparsity=0.9999"], ["method_kw.every_epochs", "events"]),
    (["--config.optimizer_kw.momentum=abc"], ["momentum", "abc"]),
    (["--config.lr_schedule=linear"], ["lr_schedule", "cosine"]),
    (["--config.target=50"], ["target", "99.61"]),
    (["--config.width=0"], ["width"]),
    (["--config.batch_size=0"], ["batch_size"]),
    (["--config.method_kw.noise_on=some"], ["method_kw.noise_on", "prunable"]),
    (["--config=does_not_exist.py"], ["does_not_exist.py"]),
    (["--nosuchflag"], ["nosuchflag"]),
])
def test_bad_names_and_values_give_one_line_errors(tmp_path, args, names):
  with pytest.raises(SystemExit) as err:
    main.run_main(["prog", *args, f"--workdir={tmp_path}"])
  msg = str(err.value.code)
  assert msg.startswith("error: ") and "\n" not in msg
  for name in names:
    assert name in msg
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_error_in_a_real_process_is_one_line_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config.model=resnet99",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
      timeout=120, check=False)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: model: unknown value 'resnet99'")
  assert "final" not in proc.stdout


# --- End to end, every method ---------------------------------------------------


@pytest.mark.parametrize("method", [
    "dense", "flipout", "global_magnitude", "hoyer_square", "movement",
    "noisy_global_magnitude", "random", "snip"])
def test_cli_trains_every_method_to_its_target(tmp_path, capsys, method):
  extra = [f"--config.method={method}"]
  if method == "snip":
    extra.append("--config.sparsity=0.9")
  if method == "hoyer_square":
    extra += ["--config.hoyer_lambda=1e-3",
              "--config.presets.hoyer_square.finetune_epochs=1"]
  result = cli(tmp_path, *extra)
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1] == train.final_line(result)
  assert out[-1].startswith("final test_accuracy=")
  _, acc, sp = out[-1].split()
  assert float(acc.split("=")[1]) == result["test_accuracy"]
  assert float(sp.split("=")[1]) == result["sparsity"]
  with open(tmp_path / "final.json") as f:
    assert json.load(f)["sparsity"] == result["sparsity"]

  config = load_config(MAIN_CONFIG, *[a for a in TINY + extra if a.startswith("--config")])
  n = result["prunable_weights"]
  params = final_params(tmp_path)
  zeros = sum(int(np.sum(v == 0)) for k, v in params.items()
              if k.startswith("params/") and v.ndim >= 2)
  if method not in ("dense", "hoyer_square"):
    target = recipe.resolve(train.config_json(config))["method_kw"]["sparsity"]
    assert result["pruned_weights"] == round(target * n)
    assert abs(result["sparsity"] - target) <= 1 / n
    assert zeros >= result["pruned_weights"]  # Pruned weights are exactly 0.0.
  elif method == "dense":
    assert result["sparsity"] == 0.0
  else:  # Hoyer-Square: the threshold's mask, held through fine-tuning.
    assert 0 < result["sparsity"] < 1 and zeros >= result["pruned_weights"]

  rows = train.read_metrics(str(tmp_path))
  epochs = config.num_epochs + (1 if method == "hoyer_square" else 0)
  assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
  assert {"epoch", "step", "train_loss", "test_accuracy", "sparsity", "lr",
          "time"} <= set(rows[0])
  assert rows[-1]["step"] == epochs * 22
  for f in ("sparsity.md", "curves.png", "config.json"):
    assert os.path.getsize(tmp_path / f) > 0
  assert "| **global** |" in (tmp_path / "sparsity.md").read_text()


# --- Resume ----------------------------------------------------------------------

# 10 epochs of 22 steps; FlipOut events at epochs 2, 4, 6, 8.
KILL_ARGS = ["--config.dataset=digits", "--config.width=0.25",
             "--config.batch_size=64", "--config.eval_batch_size=500",
             "--config.num_epochs=10", "--config.method_kw.every_epochs=2",
             "--config.lr_decay_epochs=(7,9)", "--noprogress"]


def _checkpoints(workdir):
  d = os.path.join(workdir, train.CHECKPOINT_DIR)
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def test_killed_run_resumes_bit_identical(tmp_path):
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  log = open(tmp_path / "killed.log", "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.main", f"--config={MAIN_CONFIG}",
       *KILL_ARGS, f"--workdir={killed}"], cwd=REPO,
      stdout=log, stderr=subprocess.STDOUT)
  state = {}

  def kill_after_two_checkpoints():
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if len(_checkpoints(killed)) >= 1 and _checkpoints(killed)[-1] >= 2:
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.01)
    state["rc"] = proc.wait()

  killer = threading.Thread(target=kill_after_two_checkpoints)
  killer.start()
  # The uninterrupted reference, in-process, while the other one runs.
  main.run_main(["prog", f"--config={MAIN_CONFIG}", *KILL_ARGS, f"--workdir={ref}"])
  killer.join()
  log.close()
  assert state["rc"] == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
  assert not os.path.exists(os.path.join(killed, "final.json"))
  last = _checkpoints(killed)[-1]
  assert 2 <= last < 10

  result = main.run_main(["prog", f"--config={MAIN_CONFIG}", *KILL_ARGS,
                          f"--workdir={killed}", "--resume"])
  assert_bit_identical(final_params(ref), final_params(killed))
  with open(os.path.join(ref, "final.json")) as f:
    assert json.load(f)["test_accuracy"] == result["test_accuracy"]
  strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]
  assert strip(train.read_metrics(killed)) == strip(train.read_metrics(ref))
  assert abs(result["sparsity"] - (1 - 0.5 ** 4)) <= 1 / result["prunable_weights"]

  # A finished run is skipped, with or without --resume; an unfinished one
  # is refused without --resume; --resume with another config is refused.
  t = time.time()
  again = main.run_main(["prog", f"--config={MAIN_CONFIG}", *KILL_ARGS,
                         f"--workdir={killed}", "--resume"])
  assert again == result and time.time() - t < 5
  assert main.run_main(["prog", f"--config={MAIN_CONFIG}", *KILL_ARGS,
                        f"--workdir={killed}"]) == result
  os.remove(os.path.join(ref, "final.json"))
  with pytest.raises(SystemExit, match="holds an unfinished run"):
    main.run_main(["prog", f"--config={MAIN_CONFIG}", *KILL_ARGS, f"--workdir={ref}"])
  with pytest.raises(SystemExit, match="another config.*seed"):
    main.run_main(["prog", f"--config={MAIN_CONFIG}", *KILL_ARGS,
                   "--config.seed=7", f"--workdir={ref}", "--resume"])


def test_resume_across_the_hoyer_finetune_phase_is_bit_identical(tmp_path):
  config = load_config(MAIN_CONFIG, *[a for a in TINY if a.startswith("--config")],
                       "--config.method=hoyer_square", "--config.hoyer_lambda=1e-3",
                       "--config.presets.hoyer_square.finetune_epochs=2")
  ref = train.run(config, str(tmp_path / "ref"), progress=False)
  wd = str(tmp_path / "cut")
  # Stop at the phase boundary (after epoch 2), then inside the fine-tuning.
  assert train.run(config, wd, progress=False, stop_after_epochs=2) is None
  assert train.run(config, wd, resume=True, progress=False, stop_after_epochs=3) is None
  assert not os.path.exists(os.path.join(wd, "final.json"))
  result = train.run(config, wd, resume=True, progress=False)
  assert_bit_identical(final_params(tmp_path / "ref"), final_params(wd))
  assert result["sparsity"] == ref["sparsity"] > 0
  assert [r["phase"] for r in train.read_metrics(wd)] == ["train"] * 2 + ["finetune"] * 2


# --- The reproduction sweep -------------------------------------------------------


def test_flipout_sweep_overrides_and_plot(tmp_path):
  """The FlipOut table's grid: target sets the paper's sparsity; λ is a
  nested preset field; swept fields given again are dropped."""
  grid = sweep.parse_grid(["method=flipout,snip,hoyer_square", "target=75,99.61"])
  runs = sweep.plan(grid, [42, 43], str(tmp_path))
  assert len(runs) == 3 * 2 * 2
  fl = [r for r in runs if r.method == "flipout" and r.tag == "99.61"][0]
  assert fl.overrides == ["--config.method=flipout", "--config.target=99.61"]
  assert fl.workdir == str(tmp_path / "runs" / "method=flipout" / "target=99.61" / "seed42")
  fwd = sweep.forwarded_overrides(
      ["--config.num_epochs=2", "--config.method=x", "--workers=2",
       "--config.seed", "5", "--config.width", "0.5",
       "--config.presets.hoyer_square.strength=1"],
      {"method", "seed", "presets.hoyer_square.strength"})
  assert fwd == ["--config.num_epochs=2", "--config.width=0.5"]
  for r in runs:
    config = load_config(MAIN_CONFIG, *r.overrides, f"--config.seed={r.seed}")
    train.validate(config)
    kw = recipe.resolve(train.config_json(config))["method_kw"]
    if r.method != "hoyer_square":  # 2 / 8 halvings of the paper's schedule
      assert kw["sparsity"] == 1 - 0.5 ** {"75": 2, "99.61": 8}[r.tag]
  config = load_config(MAIN_CONFIG, "--config.method=hoyer_square",
                       "--config.presets.hoyer_square.strength=3e-3")
  assert recipe.resolve(train.config_json(config))["method_kw"]["strength"] == 3e-3
  for i, r in enumerate(runs):
    r.result = {"test_accuracy": 0.9 + 0.01 * (i % 3),
                "sparsity": 0.5 + 0.1 * (i % 4)}
  runs[-1].result = None
  sweep.plot(runs, ["flipout", "snip", "hoyer_square"], str(tmp_path / "p.png"), "t")
  assert os.path.getsize(tmp_path / "p.png") > 0


def test_generic_sweep_plan_and_table(tmp_path):
  grid = sweep.parse_grid(["method=dst_ee,rigl", "sparsity=0.9,0.95"])
  runs = sweep.plan(grid, [1, 2], str(tmp_path))
  assert len(runs) == 8
  assert runs[0].overrides == ["--config.method=dst_ee", "--config.sparsity=0.9"]
  assert runs[0].workdir == str(tmp_path / "runs" / "method=dst_ee" / "sparsity=0.9" / "seed1")
  for i, r in enumerate(runs):
    r.result = {"test_accuracy": 0.5 + 0.1 * (i % 2), "sparsity": float(r.tag)}
  runs[-1].result = None
  text = sweep.table(runs, ["dst_ee", "rigl"], ["0.9", "0.95"])
  # Seeds 1 and 2 of a cell alternate 0.5 / 0.6: mean 55.00, std 7.07.
  assert "| dst_ee | 55.00 ± 7.07 | 55.00 ± 7.07 |" in text
  assert "| rigl | 55.00 ± 7.07 | 50.00 (n=1) |" in text
  with pytest.raises(SystemExit, match="grid"):
    sweep.parse_grid(["method"])


def test_config_diff_compares_only_what_a_run_uses(tmp_path):
  new = train.config_json(load_config())
  # Another method's arguments, unused presets and a field added since at
  # its default are not a difference.
  old = dict(new, presets={}, method_kw=dict(new["method_kw"], exploration=9.0))
  del old["sparse_init"]
  assert train.config_diff(old, new) == []
  changed = dict(new, method_kw=dict(new["method_kw"], p=3.0))
  assert train.config_diff(new, changed) == ["method_kw.p"]
  assert train.config_diff(dict(new, seed=new["seed"] + 1), new) == [
      "seed", "method_kw.seed"]
  # A config recorded before method_kw (flat fields) is upgraded.
  flat = {k: new[k] for k in ("method", "model", "width", "dataset", "seed",
                              "batch_size", "eval_batch_size", "num_epochs",
                              "lr", "lr_schedule", "lr_decay_epochs",
                              "lr_decay_factor", "weight_decay")}
  flat.update(momentum=0.9, nesterov=False, prune_every_epochs=9.0,
              prune_rate=0.5, prune_start_epoch=0.0, noise_scale=1.0,
              noise_on="all", flipout_p=2.0, sparsity=None, target=None,
              st3_power=3.0)
  assert train.config_diff(flat, new) == []
  assert train.config_diff(dict(flat, flipout_p=1.0), new) == ["method_kw.p"]
  # The sweep skips such a finished run instead of re-running it.
  run = sweep.Run("m", "t", 0, [], workdir=str(tmp_path), config=new)
  with open(tmp_path / "final.json", "w") as f:
    json.dump({"config": flat, "test_accuracy": 0.5, "sparsity": 0.9}, f)
  assert sweep.run_one(run, MAIN_CONFIG, []).skipped


class TinyBNNet(nn.Module):
  """Conv -> BatchNorm -> relu -> pool -> Dense: the BatchNorm path of the loop
  at a fraction of ResNet-20's compile time (its random init alone takes
  seconds to compile on this CPU)."""
  num_classes: int = 10
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def test_batchnorm_model_trains_and_resumes_bit_identical(tmp_path, monkeypatch):
  from flipout_jax import models
  monkeypatch.setitem(models._REGISTRY, "tiny_bn", TinyBNNet)
  monkeypatch.setitem(models.MODEL_HAS_BATCHNORM, "tiny_bn", True)
  monkeypatch.setattr(models, "MODEL_NAMES", models.MODEL_NAMES + ("tiny_bn",))
  config = load_config(MAIN_CONFIG, "--config.dataset=digits",
                       "--config.model=tiny_bn", "--config.batch_size=64",
                       "--config.eval_batch_size=500", "--config.num_epochs=3",
                       "--config.method_kw.every_epochs=1")
  ref = train.run(config, str(tmp_path / "ref"), progress=False)
  wd = str(tmp_path / "cut")
  assert train.run(config, wd, progress=False, stop_after_epochs=1) is None
  result = train.run(config, wd, resume=True, progress=False)
  a, b = final_params(tmp_path / "ref"), final_params(wd)
  assert_bit_identical(a, b)
  assert result["test_accuracy"] == ref["test_accuracy"]
  assert result["sparsity"] == ref["sparsity"] > 0.7
  # The running statistics were trained, checkpointed and restored.
  assert np.abs(a["batch_stats/bn/mean"]).max() > 0
  assert not np.allclose(a["batch_stats/bn/var"], 1.0)


# --- Gradient-flow loss curves -----------------------------------------------------


def test_gradient_flow_curves_start_from_the_same_dense_model():
  from experiments import gradient_flow_curves as gfc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from experiments import data as data_lib  # pylint: disable=g-import-not-at-top
  from flipout_jax import models  # pylint: disable=g-import-not-at-top
  config = load_config(os.path.join(CONFIG_DIR, "gradient_flow_lenet300100_mnist5k.py"),
                       *[a for a in TINY if a.startswith("--config.")
                         and "every_epochs" not in a])
  measures = ["magnitude", "loss_preservation"]
  out, spe = gfc.curves(config, measures, [0.9], [0], 1, [0], eval_examples=100)
  assert spe == 22 and sorted(out) == [(0, 0.9, m) for m in sorted(measures)]
  a, b = out[(0, 0.9, "magnitude")][0], out[(0, 0.9, "loss_preservation")][0]
  # The loss before the prune, then after each step; the same model until
  # the prune, different masks after it.
  assert a.shape == b.shape == (spe + 1,) and np.isfinite(a).all()
  assert a[0] == b[0] and a[1] != b[1]
  # At initialisation: the loss of the seed's initial params on the subset.
  ds = data_lib.load("digits")
  model = models.get_model(config.model, num_classes=10, width=config.width)
  x, y = ds.train.read(np.linspace(0, ds.train.num_examples - 1, 100).round()
                       .astype(np.int64))
  params = model.init(jax.random.PRNGKey(0), x[:1], train=False)["params"]
  loss = optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": params}, x, train=False), y).mean()
  np.testing.assert_allclose(a[0], loss, rtol=1e-6)
