r"""Training-loss curves right after a one-shot prune, per gradient-flow measure.

Lubana & Dick (ICLR 2021): magnitude-pruned models converge faster after pruning
than |θg|-pruned (SNIP-like) ones. Dense ``--prune_epochs`` epochs (0: at init),
one prune per sparsity × measure (momentum reset), ``--epochs_after`` more; the
eval-mode training loss on ``--eval_examples`` fixed images after every step,
mean over seeds, into ``<out>.png`` (panel per prune time × sparsity) and
``<out>.json``. Schedule fields are not used.

    python -m experiments.gradient_flow_curves \
        --config experiments/configs/gradient_flow_lenet300100_mnist5k.py \
        --sparsities 0.9,0.98 --prune_epochs 0,1 --epochs_after 3 \
        --out experiments/results/gradient_flow_curves
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

import flipout_jax as fj
from experiments import data as data_lib
from flipout_jax import models as models_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "experiments", "configs",
                              "gradient_flow_lenet300100_mnist5k.py")
LABELS = {"magnitude": "|θ| (magnitude)", "loss_preservation": "|θg| (SNIP-like)",
          "loss_preservation_magnitude": "|θ²g|", "gradient_norm": "θHg (GraSP-like)",
          "gradient_norm_preservation": "|θHg|"}
COLORS = {m: f"C{i}" for i, m in enumerate(LABELS)}


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_list("measures", list(COLORS), "Measures.", flag_values=fv)
  flags.DEFINE_list("sparsities", ["0.9", "0.98"], "Sparsities.", flag_values=fv)
  flags.DEFINE_list("prune_epochs", ["0", "1"], "Dense epochs before the one-shot "
                    "prune (0: at initialisation).", flag_values=fv)
  flags.DEFINE_integer("epochs_after", 3, "Epochs after the prune.", flag_values=fv)
  flags.DEFINE_list("seeds", ["42", "43", "44"], "Seeds.", flag_values=fv)
  flags.DEFINE_integer("eval_examples", 1000, "Training images (evenly spaced) "
                       "the loss is measured on.", flag_values=fv)
  out = os.path.join(REPO, "experiments", "results", "gradient_flow_curves")
  flags.DEFINE_string("out", out, "Output path without extension.", flag_values=fv)


def curves(config, measures, sparsities, prune_epochs, epochs_after, seeds,
           eval_examples=1000):
  """``{(prune_epoch, sparsity, measure): [seeds, steps_after + 1]}`` losses."""
  from experiments import recipe  # pylint: disable=g-import-not-at-top
  from experiments import train  # pylint: disable=g-import-not-at-top

  ds = data_lib.load(config.dataset, data_dir=config.data_dir)
  spe = data_lib.steps_per_epoch(ds, config.batch_size)
  model = models_lib.get_model(config.model, num_classes=ds.train.num_classes,
                               width=config.width)
  assert not models_lib.uses_batchnorm(config.model), "BatchNorm: not handled"
  n = ds.train.num_examples
  x_all, y_all = ds.train.read(
      np.linspace(0, n - 1, min(eval_examples, n)).round().astype(np.int64))

  train_loss = jax.jit(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x_all, train=False), y_all).mean())
  init = jax.jit(lambda k: model.init(
      k, jnp.zeros((1, *ds.train.image_shape)), train=False)["params"])
  out = {}
  for e0 in prune_epochs:
    step0 = e0 * spe
    total_epochs = e0 + epochs_after
    for p in sparsities:
      for m in measures:
        spec = recipe.resolve(dict(train.config_json(config), method_kw={
            "measure": m}, method="gradient_flow"))
        lr = recipe.learning_rate_fn(
            spec["lr"], spec["lr_schedule"], spec["lr_decay_epochs"],
            spec["lr_decay_factor"], spec["num_epochs"], spe)
        score = fj.methods.gradient_flow.gradient_flow_score(m)
        # Prune once at step0 by m, then the mask fixed; moments reset.
        tx = recipe.with_temperature(fj.core.prune(
            recipe.optimizer(spec, lr), score_fn=score, reset_moments="all",
            schedule=fj.schedules.one_shot(p, step0), name="one_shot_" + m),
            spec["hvp_temperature"])
        step = train._make_train_step(model, tx, False)  # pylint: disable=protected-access

        runs = []
        for seed in seeds:
          params = init(jax.random.PRNGKey(seed))
          state = {"params": params, "batch_stats": {}, "opt_state": tx.init(params)}
          losses, k = [], 0
          for epoch in range(total_epochs):
            for images, labels in data_lib.train_batches(
                ds, config.batch_size, seed=seed, epoch=epoch):
              if k == step0:
                losses.append(train_loss(state["params"]))  # before the prune
              state, _ = step(state, images, labels)
              k += 1
              if k > step0:
                losses.append(train_loss(state["params"]))
          runs.append(np.asarray(jax.device_get(losses), np.float64))
        out[(e0, p, m)] = np.stack(runs)
        r = out[(e0, p, m)].mean(0)
        print(f"prune at epoch {e0}, sparsity {p:g}, {m}: loss before "
              f"{r[0]:.3f}, after {r[1]:.3f}, +1 epoch {r[spe]:.3f}, "
              f"+{epochs_after} epochs {r[-1]:.3f}", flush=True)
  return out, spe


def plot(out, spe, path, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  prune_epochs = sorted({k[0] for k in out})
  sparsities = sorted({k[1] for k in out})
  fig, axes = plt.subplots(len(prune_epochs), len(sparsities), squeeze=False,
                           figsize=(5.5 * len(sparsities), 3.8 * len(prune_epochs)))
  for i, e0 in enumerate(prune_epochs):
    for j, p in enumerate(sparsities):
      ax = axes[i][j]
      for (e, s, m), runs in out.items():
        if (e, s) != (e0, p):
          continue
        x = np.arange(runs.shape[1]) / spe  # epochs since the prune
        ax.plot(x, runs.mean(0), color=COLORS.get(m), label=LABELS.get(m, m))
        ax.fill_between(x, runs.min(0), runs.max(0), color=COLORS.get(m),
                        alpha=0.15, lw=0)
      when = "at init" if e0 == 0 else f"after {e0} epoch(s)"
      ax.set(yscale="log", title=f"prune {100 * p:g}% {when}",
             xlabel="epochs after the prune", ylabel="training-set loss")
      ax.grid(alpha=0.3, which="both")
  axes[0][0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> None:
  from experiments import main as main_lib  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  fv = main_lib.parse_flags(argv, _define_flags, DEFAULT_CONFIG, __doc__)
  config, seeds = fv["config"].value, [int(s) for s in fv["seeds"].value]
  out, spe = curves(config, fv["measures"].value,
                    [float(s) for s in fv["sparsities"].value],
                    [int(e) for e in fv["prune_epochs"].value],
                    fv["epochs_after"].value, seeds, fv["eval_examples"].value)
  path = fv["out"].value
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  plot(out, spe, path + ".png",
       f"{config.model} on {config.dataset}: one-shot prune; mean over seeds "
       f"{', '.join(map(str, seeds))} (band: min–max)")
  summary = [{"prune_epoch": e0, "sparsity": p, "measure": m, "before": r[0],
              "after": r[1], "after_1_epoch": r[spe], "after_all": r[-1],
              "mean_first_epoch": float(r[1:spe + 1].mean())}
             for (e0, p, m), r in ((k, v.mean(0)) for k, v in out.items())]
  command = "python -m experiments.gradient_flow_curves " + " ".join(argv[1:])
  with open(path + ".json", "w") as f:
    json.dump({"command": command, "steps_per_epoch": spe, "summary": summary,
               "curves": {f"{e0}/{p}/{m}": runs.mean(0).round(5).tolist()
                          for (e0, p, m), runs in out.items()}}, f, indent=1)
  print(f"wrote {path}.png and {path}.json")


if __name__ == "__main__":
  main()
