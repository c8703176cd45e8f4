"""Tests of experiments/unipts.py: the UniPTS CLI on a finished dense run.

A narrow LeNet-300-100 (width 0.25) is trained for one epoch on the embedded
`digits` with ``experiments.main.run_main`` (in-process, once per module);
the UniPTS CLI then runs in-process on it with a tiny search and one epoch
of sparse training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import main
from experiments import train
from experiments import unipts as cli
from experiments.configs import unipts_lenet5_mnist5k
from flipout_jax import unipts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "configs",
                      "unipts_lenet300100_mnist5k.py")
CONFIGS = [CONFIG, os.path.join(REPO, "experiments", "configs",
                                "unipts_lenet5_mnist5k.py")]
DENSE = ["--config.dataset=digits", "--config.width=0.25",
         "--config.num_epochs=1", "--config.batch_size=64",
         "--config.eval_batch_size=500", "--noprogress"]
# A tiny search (4 + 1·3 genomes) and one epoch of sparse training.
TINY = ["--config.calibration_size=64", "--config.eval_batch_size=500",
        "--config.unipts.population_size=4", "--config.unipts.generations=1",
        "--config.unipts.num_parents=2", "--config.unipts.crossover_children=2",
        "--config.unipts.mutation_children=1", "--config.unipts.epochs=1",
        "--config.unipts.batch_size=32"]
SPARSITY = 0.9


@pytest.fixture(scope="module")
def dense_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dense"))
  result = main.run_main(["prog", f"--config={CONFIG}", *DENSE,
                          f"--workdir={workdir}"])
  assert result["method"] == "dense" and result["sparsity"] == 0.0
  return workdir


def run_cli(*args):
  return cli.run_main(["prog", f"--config={CONFIG}", *TINY, *args])


def error_of(*args) -> str:
  with pytest.raises(SystemExit) as e:
    run_cli(*args)
  message = str(e.value.code)
  assert message.startswith("error: ") and "\n" not in message, message
  return message


def test_config_unipts_fields_are_the_library_defaults():
  fields = unipts_lenet5_mnist5k.unipts_fields().to_dict()
  assert fields == dataclasses.asdict(unipts.UniPTSConfig())
  for path in CONFIGS:
    config = main.parse_flags(["prog", f"--config={path}"])["config"].value
    assert config.method == "dense" and config.sparsity == 0.9
    assert config.calibration_size == 512 and config.search is True
    assert config.unipts.redistribute is True  # the files' one change
    train.validate(config)  # the teacher recipe
    assert cli.validate(config).redistribute is True


def test_cli_prunes_to_the_target_sparsity(dense_workdir, tmp_path, capsys):
  workdir = str(tmp_path / "search")
  result = run_cli(f"--dense_workdir={dense_workdir}", f"--workdir={workdir}")
  out = capsys.readouterr().out
  assert out.strip().splitlines()[-1] == (
      f"final test_accuracy={result['test_accuracy']!r} "
      f"sparsity={result['sparsity']!r}")
  assert 0.0 <= result["test_accuracy"] <= 1.0
  # redistribute=True: Σ p_l·n_l = P·N; ⌊p_l·n_l⌋ prunes < 1 fewer per layer.
  layers = result["layers"]
  n = result["prunable_weights"]
  assert set(layers) == {"fc1/kernel", "fc2/kernel", "fc3/kernel"}
  assert n == 64 * 75 + 75 * 25 + 25 * 10
  assert SPARSITY - len(layers) / n < result["sparsity"] <= SPARSITY + 1e-12
  assert result["target_sparsity"] == SPARSITY
  for layer in layers.values():
    assert layer["pruned"] == math.floor(layer["target"] * layer["size"])
  # The saved sparse weights have those zeros; the baselines are exact.
  saved = train.load_final_params(workdir)
  for path, layer in layers.items():
    w = saved[f"params/{path}"]
    assert w.size - np.count_nonzero(w) >= layer["pruned"]
  glob = result["baselines"]["global_magnitude"]
  assert glob["pruned_weights"] == math.floor(SPARSITY * n)
  # LeNet-300-100 has no BatchNorm: recalibration is a no-op, said so.
  bn = result["baselines"]["global_magnitude_bn"]
  assert bn["test_accuracy"] == glob["test_accuracy"]
  assert bn["bn_recalibration"].startswith("no-op")
  for k in ("uniform_magnitude", "uniform_magnitude_bn"):
    for layer in result["baselines"][k]["layers"].values():
      assert layer["pruned"] == math.floor(SPARSITY * layer["size"])
  assert result["dense"]["test_accuracy"] == result["dense"][
      "reported_test_accuracy"]
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  assert report["search"]["evaluations"] >= 1
  assert len(report["calibration_indices"]) == 64

  # Resumable: the same config is skipped; another one is refused.
  again = run_cli(f"--dense_workdir={dense_workdir}", f"--workdir={workdir}")
  assert "skipped" in capsys.readouterr().out and again == result
  assert "another config" in error_of(f"--dense_workdir={dense_workdir}",
                                      f"--workdir={workdir}",
                                      "--config.seed=1")


def test_cli_without_search_prunes_every_layer_to_the_target(
    dense_workdir, tmp_path):
  result = run_cli(f"--dense_workdir={dense_workdir}",
                   f"--workdir={tmp_path}", "--config.search=False",
                   "--config.sparsity=0.95", "--config.calibration_labels=true",
                   "--config.unipts.epochs=0")
  for layer in result["layers"].values():
    assert layer["pruned"] == math.floor(0.95 * layer["size"])
  assert abs(result["sparsity"] - 0.95) < 3 / result["prunable_weights"]
  assert result["calibration"]["labels"] == "true"


def test_calibration_set_is_deterministic_and_seeded():
  a = cli.calibration_indices(1438, 64, 42)
  assert np.array_equal(a, cli.calibration_indices(1438, 64, 42))
  assert len(set(a.tolist())) == 64 and np.all(np.diff(a) > 0)
  assert not np.array_equal(a, cli.calibration_indices(1438, 64, 43))


def test_one_line_errors(dense_workdir, tmp_path):
  missing = str(tmp_path / "nope")
  assert "does not exist" in error_of(f"--dense_workdir={missing}")
  assert "--dense_workdir: required" in error_of()
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  (unfinished / "config.json").write_text("{}")
  assert "unfinished" in error_of(f"--dense_workdir={unfinished}")
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "not an experiments.main workdir" in error_of(
      f"--dense_workdir={empty}")
  for bad in ("1.5", "-0.1", "1.0"):
    msg = error_of(f"--dense_workdir={dense_workdir}", f"--config.sparsity={bad}")
    assert msg.startswith("error: sparsity:"), msg
  assert error_of(f"--dense_workdir={dense_workdir}",
                  "--config.unipts.population_size=1").startswith(
                      "error: unipts.population_size:")
  assert error_of(f"--dense_workdir={dense_workdir}",
                  "--config.calibration_labels=none").startswith(
                      "error: calibration_labels:")
  assert "exceeds the 1438 training examples" in error_of(
      f"--dense_workdir={dense_workdir}", "--config.calibration_size=5000",
      f"--workdir={tmp_path / 'big'}")
  assert "unknown field" in error_of("--config.sparsty=0.9")


def test_error_is_one_line_on_stderr_in_a_process(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.unipts", f"--config={CONFIG}",
       f"--dense_workdir={tmp_path / 'nope'}"],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: dense_workdir:"), (
      proc.stderr)
