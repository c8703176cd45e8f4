"""CLI tests of the sparse-training methods: st3, st3_sigma, dst_ee, rigl, set, static_random.

Each method trains a narrow LeNet-300-100 (width 0.25) on the embedded
`digits` (1,438 images, 22 steps per epoch at batch 64) for a few dozen steps
through ``experiments.main.run_main`` in-process, and must end at exactly its
target sparsity with the pruned weights at exactly 0.0.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest

from experiments import main
from experiments import methods
from experiments import methods_sparse_training as mst
from experiments import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
DST_CONFIG = os.path.join(CONFIG_DIR, "dst_lenet300100_mnist5k.py")
ST3_CONFIG = os.path.join(CONFIG_DIR, "st3_lenet300100_mnist5k.py")
FLIPOUT_CONFIG = os.path.join(CONFIG_DIR, "flipout_lenet300100_mnist5k.py")
STEPS_PER_EPOCH = 22

TINY = ["--config.dataset=digits", "--config.width=0.25",
        "--config.batch_size=64", "--config.eval_batch_size=500",
        "--noprogress"]
# 2 epochs (44 steps): ramp over steps 5..16, the second epoch fine-tunes
# under the mask frozen after step 21.
ST3_TINY = TINY + ["--config.num_epochs=2", "--config.st3_start_epoch=0.25",
                   "--config.st3_end_epoch=0.75", "--config.st3_finetune_epochs=1"]
# 1 epoch (22 steps): mask updates at steps 5, 10, 15 (T_end = 16).
DST_TINY = TINY + ["--config.num_epochs=1", "--config.dst_update_every_epochs=0.25"]

CASES = {
    "st3": (ST3_CONFIG, ST3_TINY + ["--config.sparsity=0.9"]),
    "st3_sigma": (ST3_CONFIG, ST3_TINY + ["--config.target=98.44",
                                          "--config.st3_grad_clip=3.0"]),
    "dst_ee": (DST_CONFIG, DST_TINY + ["--config.sparsity=0.95"]),
    "set": (DST_CONFIG, DST_TINY + ["--config.sparsity=0.9"]),
    "rigl": (DST_CONFIG, DST_TINY + ["--config.sparsity=0.9"]),
    "static_random": (DST_CONFIG, DST_TINY + ["--config.sparsity=0.9"]),
}


def load_config(path, *overrides):
  return main.parse_flags(["prog", f"--config={path}", *overrides])["config"].value


def cli(workdir, path, *args):
  return main.run_main(["prog", f"--config={path}", *args,
                        f"--workdir={workdir}"])


def zero_patterns(workdir):
  params = train.load_final_params(str(workdir))
  return {k: v == 0 for k, v in params.items()
          if k.startswith("params/") and v.ndim >= 2}


def test_methods_are_registered():
  for name in CASES:
    assert name in methods.METHODS and methods.METHODS[name].prunes_to_target


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Each method trained once: ``{method: (workdir, result, stdout lines, args)}``.

  One run per method (each compiles its own train step, the bulk of the
  time); the tests below share them.
  """
  out = {}
  root = tmp_path_factory.mktemp("runs")
  for method, (path, args) in CASES.items():
    args = [*args, f"--config.method={method}"]
    workdir = root / method
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      result = cli(workdir, path, *args)
    out[method] = (workdir, result, buf.getvalue().strip().splitlines(), path,
                   args)
  return out


@pytest.mark.parametrize("method", sorted(CASES))
def test_cli_trains_to_the_target_sparsity(runs, method):
  workdir, result, out, path, args = runs[method]
  assert out[-1] == train.final_line(result)
  with open(workdir / "final.json") as f:
    assert json.load(f)["sparsity"] == result["sparsity"]

  config = load_config(path, *[a for a in args if a.startswith("--config")])
  target = methods.target_sparsity(config)
  n = result["prunable_weights"]
  assert abs(result["sparsity"] - target) <= 1 / n
  assert abs(result["pruned_weights"] - target * n) <= 1
  # Every pruned weight is exactly 0.0 in the saved (effective) params.
  zeros = sum(int(z.sum()) for z in zero_patterns(workdir).values())
  assert zeros >= result["pruned_weights"]
  rows = train.read_metrics(str(workdir))
  assert [r["epoch"] for r in rows] == list(range(1, config.num_epochs + 1))
  assert rows[-1]["step"] == config.num_epochs * STEPS_PER_EPOCH
  # ST-3: the ramp reaches the target within epoch 1 and the fine-tuning
  # epoch keeps the frozen mask; DST: sparse from the first step.
  assert all(r["sparsity"] == result["sparsity"] for r in rows)


def test_dst_moves_the_random_start_static_random_keeps_it(runs):
  # Same seed: the same random ERK start, hence the same count per layer;
  # the DST methods moved weights, static_random did not.
  static = runs["static_random"][1]["layers"]
  static_zeros = zero_patterns(runs["static_random"][0])
  for name in ("rigl", "set"):
    assert (json.dumps(runs[name][1]["layers"], sort_keys=True)
            == json.dumps(static, sort_keys=True))
    zeros = zero_patterns(runs[name][0])
    assert any(not np.array_equal(zeros[k], static_zeros[k]) for k in zeros)


def test_sparse_init_rescales_kept_weights_once():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import flipout_jax as fj  # pylint: disable=g-import-not-at-top

  params = {"dense": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (50, 8)),
                      "bias": jnp.ones((8,))}}
  tx = fj.sparse_init(fj.rigl(optax.sgd(0.0), sparsity=0.9, update_every=5,
                              end_step=10, seed=1))
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, state = tx.update(zeros, state, params)
  new = optax.apply_updates(params, updates)
  m = fj.get_masks(state)["dense"]["kernel"]
  kept = np.asarray(m).sum(0)
  scale = np.sqrt(50 / np.maximum(kept, 1))
  w0, w1 = np.asarray(params["dense"]["kernel"]), np.asarray(new["dense"]["kernel"])
  np.testing.assert_allclose(w1, np.where(m, w0 * scale, 0.0), rtol=1e-6)
  assert np.all(w1[~np.asarray(m)] == 0.0)
  np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])
  updates, _ = tx.update(zeros, state, new)  # Only the first update rescales.
  assert float(jnp.max(jnp.abs(updates["dense"]["kernel"]))) == 0.0
  # Off unless a config asks for it; the sparse-init config does.
  assert not mst.field(load_config(DST_CONFIG), "dst_sparse_init")
  assert mst.field(load_config(os.path.join(
      CONFIG_DIR, "dst_lenet5_mnist5k_sparse_init.py")), "dst_sparse_init")


def test_st3_resume_is_bit_identical(tmp_path):
  path, args = CASES["st3"]
  config = load_config(path, *[a for a in args if a.startswith("--config")])
  ref = tmp_path / "ref"
  train.run(config, str(ref), progress=False)
  cut = tmp_path / "cut"
  # Killed after the ramp epoch, resumed across the switch to fine-tuning.
  assert train.run(config, str(cut), progress=False, stop_after_epochs=1) is None
  train.run(config, str(cut), resume=True, progress=False)
  a, b = train.load_final_params(str(ref)), train.load_final_params(str(cut))
  for k in a:
    assert a[k].tobytes() == b[k].tobytes(), k


def test_configs():
  st3 = load_config(ST3_CONFIG)
  flipout = load_config(FLIPOUT_CONFIG)
  # The ST-3 LeNet-300-100 runs compare with the FlipOut reproduction table.
  for key in ("model", "dataset", "batch_size", "num_epochs", "lr", "momentum",
              "weight_decay", "lr_schedule", "lr_decay_epochs",
              "lr_decay_factor", "nesterov"):
    assert st3[key] == flipout[key], key
  assert methods.target_sparsity(st3) == methods.target_sparsity(flipout) == 1 - 0.5 ** 8
  for t, events in [(75, 2), (93.75, 4), (98.44, 6), (99.61, 8)]:
    c = load_config(ST3_CONFIG, f"--config.target={t}")
    assert methods.target_sparsity(c) == 1 - 0.5 ** events
  assert mst.st3_steps(st3, 31) == (77, 40 * 31, 75 * 31)  # epochs 2.5, 40, 75
  dst = load_config(DST_CONFIG)
  assert mst.dst_steps(dst, 31) == (31, int(22.5 * 31))
  # The methods also run on configs without their fields (defaults).
  c = flipout.copy_and_resolve_references()
  c.unlock()
  for name in CASES:
    c.method = name
    train.validate(c)
  assert mst.st3_steps(c, 31) == (77, 40 * 31, None)


@pytest.mark.parametrize("args,names", [
    (["--config.method=st3", "--config.st3_end_epoch=90"],
     ["st3_start_epoch, st3_end_epoch", "num_epochs=80"]),
    (["--config.method=st3", "--config.st3_finetune_epochs=50"],
     ["st3_finetune_epochs", "st3_end_epoch"]),
    (["--config.method=st3", "--config.st3_power=0"], ["st3_power", "> 0"]),
    (["--config.method=st3_sigma", "--config.st3_grad_clip=-1"],
     ["st3_grad_clip"]),
])
def test_bad_st3_values_give_one_line_errors(tmp_path, args, names):
  with pytest.raises(SystemExit) as err:
    main.run_main(["prog", f"--config={ST3_CONFIG}", *args,
                   f"--workdir={tmp_path}"])
  msg = str(err.value.code)
  assert msg.startswith("error: ") and "\n" not in msg
  for name in names:
    assert name in msg


@pytest.mark.parametrize("args,names", [
    (["--config.method=rigl", "--config.dst_update_every_epochs=0"],
     ["dst_update_every_epochs", "> 0"]),
    (["--config.method=set", "--config.dst_end_epoch=31"],
     ["dst_end_epoch", "num_epochs=30"]),
    (["--config.method=dst_ee", "--config.dst_exploration=-1"],
     ["dst_exploration", ">= 0"]),
    (["--config.method=dst_ee", "--config.dst_drop_fraction=1.5"],
     ["dst_drop_fraction", "(0, 1)"]),
    (["--config.method=static_random", "--config.dst_distribution=magic"],
     ["dst_distribution", "erk"]),
    (["--config.method=rigl", "--config.sparsity=1.0"], ["sparsity", "[0, 1)"]),
])
def test_bad_dst_values_give_one_line_errors(tmp_path, args, names):
  with pytest.raises(SystemExit) as err:
    main.run_main(["prog", f"--config={DST_CONFIG}", *args,
                   f"--workdir={tmp_path}"])
  msg = str(err.value.code)
  assert msg.startswith("error: ") and "\n" not in msg
  for name in names:
    assert name in msg
