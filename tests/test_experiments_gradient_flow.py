"""CLI tests of the gradient-flow methods (experiments/methods_gradient_flow.py).

Each measure trains a narrow LeNet-300-100 (width 0.25) on the embedded
`digits` (22 steps per epoch at batch 64) for 3 epochs: pruning rounds at the
first steps of epochs 2 and 3, through ``experiments.main.run_main``
in-process.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from experiments import main
from experiments import methods
from experiments import methods_gradient_flow as gf
from experiments import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
CONFIGS = [os.path.join(CONFIG_DIR, f"gradient_flow_{m}_mnist5k.py")
           for m in ("lenet300100", "lenet5")]
TINY = ["--config.dataset=digits", "--config.width=0.25",
        "--config.batch_size=64", "--config.eval_batch_size=500",
        "--config.num_epochs=3", "--config.rounds=2", "--config.round_epochs=1",
        "--config.lr_decay_epochs=(2.5,)", "--config.sparsity=0.9",
        "--noprogress"]


def cli(workdir, *args):
  return main.run_main(["prog", f"--config={CONFIGS[0]}", *TINY, *args,
                        f"--workdir={workdir}"])


def load_config(path, *overrides):
  return main.parse_flags(["prog", f"--config={path}", *overrides])["config"].value


def test_registered_with_the_config_fields():
  assert {"gradient_flow", "grasp"} <= set(methods.METHODS)
  assert methods.METHODS["gradient_flow"].needs_loss_fn
  assert set(gf.MEASURES) == {
      "magnitude", "loss_preservation", "loss_preservation_magnitude",
      "gradient_norm", "gradient_norm_preservation"}
  for path in CONFIGS:
    c = load_config(path)
    assert c.method == "gradient_flow" and set(gf.DEFAULTS) <= set(c.keys())
    train.validate(c)
    for m in gf.MEASURES:
      train.validate(load_config(path, f"--config.measure={m}",
                                 "--config.sparsity=0.98"))


@pytest.mark.parametrize("measure", [
    "magnitude", "loss_preservation", "loss_preservation_magnitude",
    "gradient_norm", "gradient_norm_preservation", "grasp"])
def test_cli_prunes_each_measure_to_the_target(tmp_path, capsys, measure):
  args = (["--config.method=grasp"] if measure == "grasp"
          else [f"--config.measure={measure}"])
  result = cli(tmp_path, *args)
  assert capsys.readouterr().out.strip().splitlines()[-1] == train.final_line(result)
  n = result["prunable_weights"]
  assert result["pruned_weights"] == round(0.9 * n)
  assert abs(result["sparsity"] - 0.9) <= 1 / n
  params = train.load_final_params(str(tmp_path))
  zeros = sum(int(np.sum(v == 0)) for k, v in params.items()
              if k.startswith("params/") and v.ndim >= 2)
  assert zeros >= result["pruned_weights"]
  rows = train.read_metrics(str(tmp_path))
  got = [r["sparsity"] for r in rows]
  if measure == "grasp":  # One shot at the first step.
    assert got == pytest.approx([0.9] * 3, abs=1 / n)
  else:  # Round 1 at the first step of epoch 2, round 2 of epoch 3.
    s1 = fj.schedules.rounds_sparsities(0.9, 2)[0]
    assert got == pytest.approx([0.0, s1, 0.9], abs=1 / n)
  assert np.isfinite(rows[-1]["train_loss"])


def test_defaults_apply_to_a_config_without_the_fields(tmp_path):
  flipout = os.path.join(CONFIG_DIR, "flipout_lenet300100_mnist5k.py")
  c = load_config(flipout, "--config.method=gradient_flow")
  assert "measure" not in c
  train.validate(c)
  assert gf.field(c, "measure") == "loss_preservation_magnitude"
  assert methods.target_sparsity(c) == 1 - 0.5 ** 8  # FlipOut's events rule.


@pytest.mark.parametrize("args,names", [
    (["--config.measure=hessian"], ["measure", "hessian", "gradient_norm"]),
    (["--config.rounds=0"], ["rounds", ">= 1"]),
    (["--config.rounds=3"], ["rounds", "num_epochs"]),
    (["--config.round_epochs=0.01"], ["round_epochs", "one step"]),
    (["--config.hvp_temperature=0"], ["hvp_temperature"]),
])
def test_bad_values_give_one_line_errors(tmp_path, args, names):
  with pytest.raises(SystemExit) as err:
    cli(tmp_path, *args)
  msg = str(err.value.code)
  assert msg.startswith("error: ") and "\n" not in msg
  for name in names:
    assert name in msg


def test_temperature_reaches_the_loss_fn():
  seen = []

  def update(updates, state, params=None, *, loss_fn=None):
    seen.append(float(loss_fn(params)))
    return updates, state

  tx = gf.with_temperature(
      optax.GradientTransformationExtraArgs(lambda p: (), update), 200.0)
  loss = lambda p, *, temperature=1.0: jnp.sum(p) / temperature
  tx.update(jnp.ones(2), (), jnp.full(2, 100.0), loss_fn=loss)
  assert seen == [1.0]
  c = load_config(CONFIGS[0])
  assert gf.temperature(c, "gradient_norm") == 200.0
  assert gf.temperature(c, "gradient_norm_preservation") == 1.0
