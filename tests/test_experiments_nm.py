"""CLI tests of the N:M methods: nm_magnitude, nm_flipout, nm_st3, nm_dst.

Each method trains a narrow LeNet-300-100 on the embedded `digits` (1,438
images, 22 steps per epoch at batch 64) for one or two epochs through
``experiments.main.run_main`` in-process. Width 0.16 gives 64 → 48 → 16 → 10
units: every layer's input size (64, 48, 16) is divisible by 4, so the
final params must be exactly N:M everywhere.
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest

from experiments import main
from experiments import methods
from experiments import methods_nm
from experiments import train
from flipout_jax import nm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NM_CONFIG = os.path.join(REPO, "experiments", "configs",
                         "nm_lenet300100_mnist5k.py")
FLIPOUT_CONFIG = os.path.join(REPO, "experiments", "configs",
                              "flipout_lenet300100_mnist5k.py")
STEPS_PER_EPOCH = 22

TINY = ["--config.dataset=digits", "--config.width=0.16",
        "--config.batch_size=64", "--config.eval_batch_size=500",
        "--noprogress"]
# 2 epochs (44 steps). Events / ramp from step 5 to step 16; ST-3's second
# epoch fine-tunes under the mask frozen after step 21; DST updates the
# masks at steps 5, 10, ..., 30 (T_end = 33).
TINY2 = TINY + ["--config.num_epochs=2", "--config.prune_start_epoch=0.25",
                "--config.prune_end_epoch=0.75",
                "--config.st3_start_epoch=0.25", "--config.st3_end_epoch=0.75",
                "--config.st3_finetune_epochs=1",
                "--config.dst_update_every_epochs=0.25"]

CASES = {
    ("nm_magnitude", 2): TINY2,
    ("nm_flipout", 2): TINY2,
    ("nm_st3", 2): TINY2,
    ("nm_dst", 2): TINY2,
    ("nm_st3", 1): TINY2 + ["--config.nm_n=1", "--config.st3_grad_clip=3.0"],
    ("nm_magnitude", 1): TINY2 + ["--config.nm_n=1"],
}


def load_config(path, *overrides):
  return main.parse_flags(["prog", f"--config={path}", *overrides])["config"].value


def cli(workdir, path, *args):
  return main.run_main(["prog", f"--config={path}", *args,
                        f"--workdir={workdir}"])


def final_kernels(workdir):
  params = train.load_final_params(str(workdir))
  return {k: v for k, v in params.items()
          if k.startswith("params/") and v.ndim >= 2}


def test_methods_are_registered():
  for name in ("nm_magnitude", "nm_flipout", "nm_st3", "nm_dst"):
    assert name in methods.METHODS
    assert not methods.METHODS[name].prunes_to_target  # set by N:M


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Each case trained once: ``{case: (workdir, result, stdout lines)}``."""
  out = {}
  root = tmp_path_factory.mktemp("runs")
  for (method, n), args in CASES.items():
    workdir = root / f"{method}_{n}"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      result = cli(workdir, NM_CONFIG, *args, f"--config.method={method}")
    out[(method, n)] = (workdir, result, buf.getvalue().strip().splitlines())
  return out


@pytest.mark.parametrize("case", sorted(CASES), ids=lambda c: f"{c[0]}_{c[1]}of4")
def test_cli_ends_exactly_nm(runs, case):
  method, n = case
  workdir, result, out = runs[case]
  assert out[-1] == train.final_line(result)
  kernels = final_kernels(workdir)
  assert len(kernels) == 3
  # Every group of 4 inputs holds at most n nonzeros.
  assert nm.check_nm(kernels, n, 4)
  # The masks keep exactly n per group: sparsity exactly 1 − n/4, and every
  # pruned weight is 0.0.
  assert result["sparsity"] == 1 - n / 4
  zeros = sum(int(np.sum(k == 0)) for k in kernels.values())
  if method == "nm_dst":
    # A weight grown at 0.0 stays 0.0 while its gradient is 0 (digits has
    # constant-zero pixels), so the params may hold fewer than n per group.
    assert zeros >= result["pruned_weights"]
  else:
    assert zeros == result["pruned_weights"]
    for k in kernels.values():
      assert np.all(np.asarray(nm.nm_group_counts(k, 4)) == n), method
  rows = train.read_metrics(str(workdir))
  assert [r["epoch"] for r in rows] == [1, 2]
  assert rows[-1]["step"] == 2 * STEPS_PER_EPOCH
  assert result["test_accuracy"] > 0.3  # it trained


def test_nm_methods_run_on_a_config_without_nm_fields(tmp_path):
  # The FlipOut config has no nm_* fields: defaults 2:4, RigL growth.
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    result = cli(tmp_path / "dst", FLIPOUT_CONFIG, *TINY,
                 "--config.num_epochs=1", "--config.method=nm_dst")
  assert result["sparsity"] == 0.5
  assert nm.check_nm(final_kernels(tmp_path / "dst"), 2, 4)


@pytest.mark.parametrize("override, match", [
    ("--config.nm_n=0", r"^nm_n: got 0; must be an int in \[1, nm_m=4\)"),
    ("--config.nm_n=4", r"^nm_n: got 4; must be an int in \[1, nm_m=4\)"),
    ("--config.nm_m=1", r"^nm_m: got 1; must be an int in \[2, 255\]"),
    ("--config.nm_m=256", r"^nm_m: got 256; must be an int in \[2, 255\]"),
    ("--config.nm_dst_grow=magic", r"^nm_dst_grow: got 'magic'"),
    ("--config.prune_end_epoch=90", r"^prune_end_epoch: 90"),
])
def test_bad_fields_are_config_errors(override, match):
  method = "nm_dst" if "grow" in override else (
      "nm_magnitude" if "prune_end" in override else "nm_st3")
  config = load_config(NM_CONFIG, f"--config.method={method}", override)
  with pytest.raises(methods.ConfigError, match=match):
    train.validate(config)


def test_indivisible_layer_is_a_config_error_naming_layer_and_field(tmp_path):
  # Width 0.25: 64 → 75 → 25 → 10; fc2 has 75 inputs, not divisible by 4.
  args = ["--config.dataset=digits", "--config.width=0.25",
          "--config.num_epochs=1", "--config.method=nm_magnitude",
          "--config.prune_start_epoch=0.1", "--config.prune_end_epoch=0.5",
          "--noprogress"]
  with pytest.raises(SystemExit, match=r"nm_skip_incompatible: .*'fc2/kernel'"):
    cli(tmp_path / "a", NM_CONFIG, *args)
  config = load_config(NM_CONFIG, *[a for a in args if a.startswith("--config")])
  assert not methods_nm.skip_incompatible(config)
  # A config without the field (default None): conv nets skip, MLPs do not.
  assert methods_nm.skip_incompatible(
      load_config(FLIPOUT_CONFIG, "--config.model=lenet5"))
  assert not methods_nm.skip_incompatible(load_config(FLIPOUT_CONFIG))
