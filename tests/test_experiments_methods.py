"""The methods of the results tables through the harness: each by name with
its ``method_kw``, every family once end to end (ST-3, DST, static random,
gradient flow, GraSP, N:M structure, UniPTS and magnitude as post-training
phases), the epochs -> steps conversion and the library's errors named by
config key.

Runs train a narrow LeNet-300-100 (width 0.25) on the embedded `digits`
(1,438 images, 22 steps per epoch at batch 64) in-process.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from experiments import main
from experiments import recipe
from experiments import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "experiments", "configs")
DST = os.path.join(CONFIGS, "dst_lenet300100_mnist5k.py")
ST3 = os.path.join(CONFIGS, "st3_lenet300100_mnist5k.py")
GF = os.path.join(CONFIGS, "gradient_flow_lenet300100_mnist5k.py")
NM = os.path.join(CONFIGS, "nm_lenet300100_mnist5k.py")
UNIPTS = os.path.join(CONFIGS, "unipts_lenet300100_mnist5k.py")
SPE = 22
TINY = ["--config.dataset=digits", "--config.width=0.25",
        "--config.batch_size=64", "--config.eval_batch_size=500"]
# 2 epochs: ST-3's ramp over steps 5..16, the second epoch under the frozen mask.
ST3_TINY = TINY + ["--config.num_epochs=2", "--config.start_epoch=0.25",
                   "--config.end_epoch=0.75", "--config.freeze_epoch=1"]
# 1 epoch: mask updates at steps 5, 10, 15 (T_end = 16).
DST_TINY = TINY + ["--config.num_epochs=1", "--config.every_epochs=0.25",
                   "--config.end_epoch=0.75"]
CASES = {
    "st3": (ST3, ST3_TINY + ["--config.sparsity=0.9"], 0.9),
    "st3_sigma": (ST3, ST3_TINY + ["--config.target=98.44",
                                   "--config.grad_clip=3.0"], 1 - 0.5 ** 6),
    "dst_ee": (DST, DST_TINY + ["--config.sparsity=0.95"], 0.95),
    "rigl": (DST, DST_TINY, 0.9),
    "set": (DST, DST_TINY, 0.9),
    "static_random": (DST, DST_TINY, 0.9),
    "gradient_flow": (GF, TINY + ["--config.num_epochs=2", "--config.rounds=3",
                                  "--config.every_epochs=0.25",
                                  "--config.measure=gradient_norm"], 0.9),
    "grasp": (GF, TINY + ["--config.num_epochs=1", "--config.sparsity=0.8"], 0.8),
}


def load_config(path, *overrides):
  return main.parse_flags(["prog", f"--config={path}", *overrides])["config"].value


def spec_of(path, *overrides):
  return recipe.resolve(train.config_json(load_config(path, *overrides)))


def zeros_of(workdir):
  return {k: v == 0 for k, v in train.load_final_params(str(workdir)).items()
          if k.startswith("params/") and v.ndim >= 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  out = {}
  for name, (path, args, _) in CASES.items():
    wd = root / name
    out[name] = wd, main.run_main(["prog", f"--config={path}", *args,
                                   f"--config.method={name}", "--noprogress",
                                   f"--workdir={wd}"])
  return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_family_trains_to_its_sparsity(runs, name):
  wd, result = runs[name]
  target, n = CASES[name][2], result["prunable_weights"]
  assert abs(result["sparsity"] - target) <= 1 / n
  zeros = zeros_of(wd)
  assert sum(int(z.sum()) for z in zeros.values()) >= result["pruned_weights"]
  rows = train.read_metrics(str(wd))
  assert rows[-1]["step"] == len(rows) * SPE
  with open(wd / "final.json") as f:
    assert json.load(f)["sparsity"] == result["sparsity"]


def test_dst_moves_the_random_start_static_random_keeps_it(runs):
  static = zeros_of(runs["static_random"][0])
  for name in ("rigl", "set"):  # the same random start, then moved
    zeros = zeros_of(runs[name][0])
    assert any(not np.array_equal(zeros[k], static[k]) for k in zeros)
  assert spec_of(DST, "--config.method=static_random")["method"] == "rigl"


def test_method_kw_goes_to_the_constructor_in_steps():
  spec = spec_of(ST3)
  assert spec["method"] == "st3" and spec["method_kw"]["sparsity"] == 1 - 0.5 ** 8
  kw, _ = recipe._steps(spec, 31)  # pylint: disable=protected-access
  assert (kw["start_step"], kw["end_step"], kw["freeze_step"]) == (77, 1240, 2325)
  assert recipe.keywords("st3").keys() >= kw.keys()
  # A config shared by several methods: each gets the arguments it takes.
  rigl = recipe._steps(spec_of(DST, "--config.method=rigl"), 31)[0]  # pylint: disable=protected-access
  assert "exploration" not in rigl and rigl["every"] == 31
  assert rigl["end_step"] == int(22.5 * 31) and rigl["seed"] == 42
  gm = spec_of(DST, "--config.method=global_magnitude")["method_kw"]
  assert gm["end_epoch"] == 22.5 and gm["noise_scale"] == 0.0
  assert gm["distribution"] == "global"  # its own default, not DST's ERK
  # Movement ends at FlipOut's last event (4 halvings of 9 epochs for 90 %).
  mv = spec_of(os.path.join(CONFIGS, "flipout_lenet300100_mnist5k.py"),
               "--config.method=movement", "--config.sparsity=0.9")
  assert mv["method_kw"]["end_epoch"] == 36.0 and mv["method_kw"]["every_epochs"] == 1.0


def test_structure_string_and_nm_sparsity(tmp_path):
  assert recipe.structure("units").kind == fj.units().kind
  s = recipe.structure("1:4+skip")
  assert s.kind == fj.n_m(1, 4).kind and s.options["skip_incompatible"] is True
  spec = spec_of(NM, "--config.structure=1:4")
  assert spec["method_kw"]["sparsity"] == 0.75
  assert spec_of(NM, "--config.method=rigl")["method_kw"]["end_epoch"] == 60.0
  # Width 0.25: fc1 has 784 inputs (N:M), fc2/fc3 75/25 (left dense: +skip).
  result = main.run_main(["prog", f"--config={NM}", *ST3_TINY, "--noprogress",
                          "--config.structure=2:4+skip", f"--workdir={tmp_path}"])
  assert result["layers"]["fc1/kernel"] == 0.5 and result["sparsity"] < 0.5
  z = zeros_of(tmp_path)["params/fc1/kernel"]
  assert np.all((~z).reshape(-1, 4, z.shape[-1]).sum(axis=1) <= 2)


def test_coupled_structure_string_prunes_whole_traced_groups(tmp_path):
  s = recipe.structure("coupled:l2")  # no model: no groups (validation)
  assert s.kind == "coupled" and s.options["reduce"] == "l2"
  with pytest.raises(recipe.ConfigError, match="^method_kw.structure: reduce"):
    recipe.structure("coupled:median")
  path = os.path.join(CONFIGS, "structured_mnist5k.py")
  result = main.run_main(["prog", f"--config={path}", *TINY, "--noprogress",
                          "--config.model=lenet300100", "--config.num_epochs=1",
                          "--config.every_epochs=0.25", "--config.sparsity=0.5",
                          f"--workdir={tmp_path}"])
  z = zeros_of(tmp_path)
  # Uniform 50 % of the 75 and 25 hidden units: 37 and 13 kept, whole
  # (a dead fc1 column is a dead fc2 row; a dead fc2 column a dead fc3 row).
  dead1 = z["params/fc1/kernel"].all(axis=0)
  dead2 = z["params/fc2/kernel"][~dead1].all(axis=0)
  assert (int((~dead1).sum()), int((~dead2).sum())) == (37, 13)
  assert z["params/fc2/kernel"][dead1].all() and z["params/fc3/kernel"][dead2].all()
  assert round(result["sparsity"] * 6925) == 6925 - (64 * 37 + 37 * 13 + 130)


@pytest.mark.parametrize("args,names", [
    (["--config.sparsity=1.5"], ["method_kw.sparsity", "1.5"]),
    (["--config.method=rigl", "--config.every_epochs=0.0001"],
     ["method_kw.every_epochs", "every"]),
    (["--config.exploration=-1"], ["method_kw.exploration"]),
    (["--config.method=gradient_flow"], ["gradient_flow", "measure", "required"]),
    (["--config.structure=2-4"], ["method_kw.structure", "N:M"]),
    (["--config.optimizer=sgdd"], ["optimizer", "sgdd"]),
    ([f"--config={os.path.join(CONFIGS, 'flipout_lenet300100_mnist5k.py')}",
      "--config.sparsity=0.9999"],
     ["method_kw.every_epochs", "events"]),
])
def test_library_errors_name_the_config_key(tmp_path, args, names):
  if not args[0].startswith("--config="):
    args = [f"--config={DST}", *args]
  with pytest.raises(SystemExit) as err:
    main.run_main(["prog", *args, f"--workdir={tmp_path}"])
  msg = str(err.value.code)
  assert msg.startswith("error: ") and "\n" not in msg
  for name in names:
    assert name in msg, msg
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_a_key_no_method_takes_is_an_error():
  config = load_config(DST)
  config.unlock()
  config.method_kw.exploraton = 1e-3
  with pytest.raises(recipe.ConfigError, match="method_kw.exploraton: not an "
                     "argument of any method"):
    train.validate(config)


def test_temperature_reaches_the_loss_fn():
  seen = []

  def update(updates, state, params=None, *, loss_fn=None):
    seen.append(float(loss_fn(params)))
    return updates, state

  tx = recipe.with_temperature(
      optax.GradientTransformationExtraArgs(lambda p: (), update), 200.0)
  loss = lambda p, *, temperature=1.0: jnp.sum(p) / temperature
  tx.update(jnp.ones(2), (), jnp.full(2, 100.0), loss_fn=loss)
  assert seen == [1.0]
  assert spec_of(GF, "--config.measure=gradient_norm")["hvp_temperature"] == 200.0
  assert spec_of(GF)["hvp_temperature"] == 1.0
  assert spec_of(GF, "--config.method=grasp")["hvp_temperature"] == 200.0


# --- Post-training phases -----------------------------------------------------

POST = ["--config.calibration_size=64", "--noprogress"]
UNIPTS_KW = dict(population_size=4, generations=1, num_parents=2,
                 crossover_children=2, mutation_children=1, epochs=1,
                 batch_size=32)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("dense"))
  result = main.run_main(["prog", f"--config={UNIPTS}", *TINY, "--noprogress",
                          "--config.num_epochs=1", f"--workdir={wd}"])
  assert result["sparsity"] == 0.0
  return wd


def post_config(method, dense_workdir, sparsity=0.9):
  c = load_config(UNIPTS, *TINY, *POST[:1], f"--config.method={method}",
                  f"--config.init_from={dense_workdir}",
                  f"--config.sparsity={sparsity}")
  c.unlock()
  c.method_kw.update(UNIPTS_KW)
  return c


@pytest.mark.parametrize("method", ["magnitude", "magnitude_uniform",
                                    "unipts", "unipts_uniform", "wanda",
                                    "sparsegpt"])
def test_post_training_phase_from_a_dense_run(dense, tmp_path, method):
  config = post_config(method, dense)
  result = train.run(config, str(tmp_path), progress=False)
  n = result["prunable_weights"]
  assert abs(result["sparsity"] - 0.9) <= 0.01
  zeros = zeros_of(tmp_path)
  assert sum(int(z.sum()) for z in zeros.values()) >= result["pruned_weights"] > 0.85 * n
  if method.endswith("_uniform") or method in ("wanda", "sparsegpt"):
    # P in every layer
    for layer in result["layers"].values():
      assert abs(layer - 0.9) < 0.02
  report = json.loads((tmp_path / "report.json").read_text())
  assert len(report["calibration_indices"]) == 64
  # Finished: reported again at once; another teacher is another run.
  assert train.run(config, str(tmp_path), progress=False) == result
  assert train.config_diff(result["config"], train.config_json(
      post_config(method, dense + "x")))


def test_magnitude_with_a_structure_is_n_m_magnitude(dense, tmp_path):
  """magnitude_uniform + structure "2:4+skip": fj.post_training's N:M
  magnitude (the largest 2 |w| of every 4 inputs); layers whose inputs are
  not a multiple of 4 (75, 25 at width 0.25) stay dense; global magnitude
  cannot be N:M."""
  c = post_config("magnitude_uniform", dense, sparsity=0.5)
  c.method_kw.structure = "2:4+skip"
  result = train.run(c, str(tmp_path), progress=False)
  assert result["layers"] == {"fc1/kernel": 0.5}
  params = train.load_final_params(str(tmp_path))
  w = params["params/fc1/kernel"]
  assert ((w != 0).reshape(-1, 4, w.shape[1]).sum(1) == 2).all()
  dense_w = train.load_final_params(dense)["params/fc1/kernel"]
  groups = np.abs(dense_w).reshape(-1, 4, w.shape[1])
  kept = np.sort(groups, axis=1)[:, 2:]  # the 2 largest of each group
  np.testing.assert_array_equal(
      np.sort(np.abs(w).reshape(-1, 4, w.shape[1]), axis=1)[:, 2:], kept)
  assert (params["params/fc2/kernel"] != 0).all()
  c = post_config("magnitude", dense, sparsity=0.5)
  c.method_kw.structure = "2:4"
  with pytest.raises(recipe.ConfigError, match="allocation: N:M"):
    train.validate(c)


def test_calibration_set_is_deterministic_and_seeded():
  a = recipe.calibration_indices(1000, 64, 42)
  assert np.array_equal(a, recipe.calibration_indices(1000, 64, 42))
  assert not np.array_equal(a, recipe.calibration_indices(1000, 64, 43))
  assert len(set(a.tolist())) == 64 and np.all(np.diff(a) > 0)
  with pytest.raises(recipe.ConfigError, match="calibration_size"):
    recipe.calibration_indices(10, 64, 42)


def test_wanda_and_sparsegpt_arguments_fail_at_validation(dense):
  c = post_config("wanda", dense)
  c.method_kw.allocation = "global"
  with pytest.raises(recipe.ConfigError, match="method_kw.allocation: .*magnitude"):
    train.validate(c)
  c = post_config("sparsegpt", dense, sparsity=0.6)
  c.method_kw.structure = "2:4"
  with pytest.raises(recipe.ConfigError, match="sparsity"):
    train.validate(c)


def test_post_training_errors(tmp_path, dense):
  with pytest.raises(recipe.ConfigError, match="init_from: unipts is a "
                     "post-training method"):
    train.validate(load_config(UNIPTS, "--config.method=unipts"))
  with pytest.raises(recipe.ConfigError, match="init_from: .* no finished run"):
    train.run(post_config("unipts", str(tmp_path / "none")), str(tmp_path / "w"))
  c = post_config("unipts", dense)
  c.method_kw.population_size = 0
  with pytest.raises(recipe.ConfigError, match="method_kw.population_size"):
    train.validate(c)
  c = post_config("unipts", dense)
  c.calibration_labels = "oracle"
  with pytest.raises(recipe.ConfigError, match="calibration_labels"):
    train.validate(c)
