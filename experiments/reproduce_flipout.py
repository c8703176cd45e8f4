"""Reproduce the FlipOut paper's comparison at CPU scale.

    python -m experiments.reproduce_flipout \
        --config experiments/configs/flipout_lenet300100_mnist5k.py \
        --workers 2 --seeds 42,43,44 --out experiments/results/flipout_lenet300100

Runs {flipout, global_magnitude, noisy_global_magnitude, random, snip} x the
paper's sparsities {75, 93.75, 98.44, 99.61, 99.90 %} x seeds, plus
Hoyer-Square for each --hoyer_lambdas (its sparsity is set indirectly by λ)
and a dense baseline, each as a subprocess of ``experiments.main`` in
``<out>/runs/<method>/<tag>/seed<k>`` with ``--resume``: a finished run is
skipped, a killed one continues, so the sweep itself is resumable. The
sparsity of a gradual method is set by ``--config.target`` (the paper's
prune_every scaled to the config's num_epochs; sparsity = 1 - 0.5^N for the N
events before the last epoch), and SNIP gets the same sparsity one-shot.

Writes ``<out>/results.md`` (mean ± std over seeds, beside the paper's CIFAR
numbers), ``<out>/results.json`` and ``<out>/accuracy_vs_sparsity.png``.
Fields of the config can be overridden as in experiments.main
(``--config.num_epochs=2``); they are passed on to every run.
"""

from __future__ import annotations

import math
import os
import sys

from absl import flags
from ml_collections import config_flags

from experiments import main as main_lib
from experiments import sweep
from experiments.configs import _base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "experiments", "configs",
                              "flipout_lenet300100_mnist5k.py")
GRADUAL = ("flipout", "global_magnitude", "noisy_global_magnitude", "random")
ALL_METHODS = GRADUAL + ("snip", "hoyer_square")
LABELS = {"flipout": "FlipOut", "global_magnitude": "Global magnitude",
          "noisy_global_magnitude": "Noisy global magnitude",
          "random": "Random", "snip": "SNIP", "hoyer_square": "Hoyer-Square",
          "dense": "Dense"}
# Fields the sweep sets itself; a --config.<field> override of them is dropped.
SWEPT = ("method", "seed", "target", "sparsity", "hoyer_lambda")



def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("workers", 2, "Runs in parallel.", flag_values=fv)
  flags.DEFINE_list("seeds", ["42", "43", "44"], "Seeds.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory (default "
                      "experiments/results/<config name>).", flag_values=fv)
  flags.DEFINE_list("methods", list(ALL_METHODS), "Methods to run.",
                    flag_values=fv)
  flags.DEFINE_list("targets", [f"{t:g}" for t in _base.PAPER_TARGETS],
                    "Sparsities in percent (the paper's).", flag_values=fv)
  flags.DEFINE_list("hoyer_lambdas", ["1e-4", "1e-3", "3e-3", "1e-2", "3e-2"],
                    "λ values of Hoyer-Square (its sparsity follows from λ).",
                    flag_values=fv)
  flags.DEFINE_bool("dense", True, "Also run the dense baseline.", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print the runs, run nothing.",
                    flag_values=fv)


# SPEC.md §1: the FlipOut paper's CIFAR-10 test accuracy (%), seeds 42/43/44.
PAPER_CIFAR = """\
| model / sparsity | FlipOut | Global mag. | Random | SNIP | Noisy global mag. |
|---|---|---|---|---|---|
| VGG19 dense | 93.58 | | | | |
| VGG19 75% | 92.77±0.08 | 93.78±0.24 | 91.92±0.22 | 93.75±0.27 | 92.84±0.16 |
| VGG19 98.44% | 92.40±0.23 | 93.21±0.25 | 73.48±0.85 | 10.00 | 92.58±0.15 |
| VGG19 99.61% | 91.48±0.17 | 91.27±0.14 | 15.77±5.65 | 10.00 | 91.15±0.10 |
| VGG19 99.90% | 87.40±0.23 | 82.89±2.01 | 10.00 | 10.00 | 86.13±0.68 |
| ResNet18 dense | 95.37 | | | | |
| ResNet18 75% | 94.64±0.21 | 95.46±0.10 | 94.31±0.18 | 95.09±0.18 | 94.58±0.12 |
| ResNet18 98.44% | 93.72±0.24 | 94.19±0.20 | 78.31±1.22 | 91.53±0.31 | 93.62±0.21 |
| ResNet18 99.61% | 91.47±0.30 | 91.11±0.21 | 49.30±7.92 | 85.31±0.30 | 91.55±0.10 |
| ResNet18 99.90% | 82.50±0.12 | 80.63±0.45 | 13.65±6.33 | 10.00 | 83.23±0.53 |

Hoyer-Square at ~99.9%: VGG19 82.78, ResNet18 78.58 (single runs)."""


def forwarded_overrides(argv: list[str]) -> list[str]:
  """The ``--config.<field>=<value>`` arguments, minus the swept fields."""
  out, skip_next = [], False
  for i, arg in enumerate(argv):
    if skip_next:
      skip_next = False
      continue
    if not arg.startswith("--config."):
      continue
    if "=" not in arg:  # "--config.x value" form.
      arg = f"{arg}={argv[i + 1]}" if i + 1 < len(argv) else arg
      skip_next = True
    field = arg[len("--config."):].split("=", 1)[0].split(".")[0]
    if field in SWEPT:
      print(f"note: --config.{field} is set by the sweep; ignoring {arg}",
            file=sys.stderr)
      continue
    out.append(arg)
  return out


def events_for_target(target: float) -> int:
  return {75.0: 2, 93.75: 4, 98.44: 6, 99.61: 8, 99.9: 10}[
      min(_base.PAPER_TARGETS, key=lambda t: abs(t - target))]


def plan(methods: list[str], targets: list[float], seeds: list[int],
         lambdas: list[str], dense: bool, out: str) -> list[sweep.Run]:
  """The runs: method, tag (sparsity or λ), seed, and the config overrides."""
  runs = []

  def add(method, tag, seed, overrides, **info):
    workdir = os.path.join(out, "runs", method, tag, f"seed{seed}")
    runs.append(sweep.Run(method=method, tag=tag, seed=seed,
                          overrides=overrides, workdir=workdir,
                          info=dict(dict(target=None), **info)))

  for seed in seeds:
    if dense:
      add("dense", "dense", seed, ["--config.method=dense"])
    for method in methods:
      if method == "hoyer_square":
        for lam in lambdas:
          add(method, f"lambda{lam}", seed,
              [f"--config.method={method}", f"--config.hoyer_lambda={lam}"],
              hoyer_lambda=float(lam))
        continue
      for t in targets:
        sparsity = 1.0 - 0.5 ** events_for_target(t)
        add(method, f"s{t:g}", seed,
            [f"--config.method={method}", f"--config.target={t:g}",
             f"--config.sparsity={sparsity!r}"], target=t)
  return runs


def summarize(done: list[sweep.Run], config, name: str) -> str:
  ok = [d for d in done if d.result]
  failed = [d for d in done if not d.result]
  targets = sorted({d.info["target"] for d in done if d.info["target"] is not None})
  seeds = sorted({d.seed for d in done})
  lines = [f"# FlipOut reproduction: {config.model} on {config.dataset}",
           "",
           f"Config `{name}` ({config.num_epochs} epochs, batch {config.batch_size}, "
           f"SGD lr {config.lr} momentum {config.optimizer_kw.momentum}, weight decay "
           f"{config.weight_decay}); seeds {', '.join(map(str, seeds))}. "
           "Test accuracy (%), mean ± std over seeds (n in brackets when not "
           "all seeds finished). Sparsity = 1 − 0.5^N after N halving events "
           "(SNIP: one shot at the first step).",
           ""]
  dense = [d.result["test_accuracy"] for d in ok if d.method == "dense"]
  if dense:
    lines += [f"Dense: {sweep.cell(dense)}", ""]
  methods = [m for m in ALL_METHODS if m != "hoyer_square"
             and any(d.method == m for d in done)]
  table = sweep.table(done, methods, [f"s{t:g}" for t in targets])
  for m in methods:  # readable row and column labels
    table = table.replace(f"| {m} |", f"| {LABELS[m]} |", 1)
  table = table.replace("| method | " + " | ".join(f"s{t:g}" for t in targets),
                        "| method | " + " | ".join(f"{t:g}%" for t in targets), 1)
  lines.append(table)
  hoyer = [d for d in done if d.method == "hoyer_square"]
  if hoyer:
    lines += ["", "Hoyer-Square (sparsity set indirectly by λ; threshold "
              f"{config.presets.hoyer_square.threshold:g}, "
              f"{config.presets.hoyer_square.finetune_epochs} fine-tune "
              "epochs):", "", "| λ | sparsity reached (%) | test accuracy (%) |",
              "|---|---:|---:|"]
    for lam in sorted({d.info["hoyer_lambda"] for d in hoyer}):
      rs = [d.result for d in hoyer if d.info["hoyer_lambda"] == lam and d.result]
      sp = sweep.cell([r["sparsity"] for r in rs])
      lines.append(f"| {lam:g} | {sp} | {sweep.cell([r['test_accuracy'] for r in rs])} |")
  if failed:
    lines += ["", "Failed runs (see run.log in the workdir):", ""]
    lines += [f"* {d.workdir} (exit {d.returncode})" for d in failed]
  lines += ["", "## The paper's numbers: CIFAR-10, VGG19 / ResNet18, 350 epochs",
            "",
            "For the ranking of the methods only: another data set and other "
            "models, not comparable in absolute value with the table above.",
            "", PAPER_CIFAR, ""]
  return "\n".join(lines)


def plot(done: list[sweep.Run], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ok = [d for d in done if d.result]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, m in enumerate(m for m in ALL_METHODS if m != "hoyer_square"):
    pts = {}
    for d in ok:
      if d.method == m:
        pts.setdefault(d.info["target"], []).append(d.result)
    if not pts:
      continue
    xs, ys, es = [], [], []
    for t in sorted(pts):
      sp = sum(r["sparsity"] for r in pts[t]) / len(pts[t])
      mean, std = sweep.mean_std([100 * r["test_accuracy"] for r in pts[t]])
      xs.append(1 - sp)
      ys.append(mean)
      es.append(0 if math.isnan(std) else std)
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=LABELS[m], color=f"C{i}")
  hoyer = [d.result for d in ok if d.method == "hoyer_square"]
  if hoyer:
    ax.scatter([max(1 - r["sparsity"], 1e-5) for r in hoyer],
               [100 * r["test_accuracy"] for r in hoyer], marker="x",
               color="k", label="Hoyer-Square (λ sweep)")
  dense = [100 * d.result["test_accuracy"] for d in ok if d.method == "dense"]
  if dense:
    ax.axhline(sum(dense) / len(dense), color="gray", ls=":", label="dense")
  ax.set_xscale("log")
  ax.invert_xaxis()
  ax.set_xlabel("fraction of weights remaining (1 − sparsity), log scale")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3, which="both")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  fv = main_lib.parse_flags(argv, _define_flags, DEFAULT_CONFIG, __doc__)
  config = fv["config"].value
  name = main_lib.config_name(fv)
  config_path = config_flags.get_config_filename(fv["config"])
  out = os.path.abspath(fv["out"].value or
                        os.path.join(REPO, "experiments", "results", name))
  workers = fv["workers"].value
  try:
    targets = [float(t) for t in fv["targets"].value]
    seeds = [int(s) for s in fv["seeds"].value]
    lambdas = fv["hoyer_lambdas"].value
    [float(x) for x in lambdas]  # pylint: disable=expression-not-assigned
  except ValueError as e:
    raise SystemExit(f"error: --targets/--seeds/--hoyer_lambdas: {e}") from None
  bad = [t for t in targets if min(abs(t - p) for p in _base.PAPER_TARGETS) > 5e-3]
  if bad:
    raise SystemExit(f"error: targets: {bad} are not the paper's; valid: "
                     f"{', '.join(f'{t:g}' for t in _base.PAPER_TARGETS)}")
  runs = plan(fv["methods"].value, targets, seeds, lambdas, fv["dense"].value,
              out)
  forwarded = forwarded_overrides(argv[1:])
  sweep.validate_runs(runs, config_path, forwarded)  # fail fast, here
  print(f"{len(runs)} runs, {workers} in parallel, into {out}", flush=True)
  if fv["dry_run"].value:
    for r in runs:
      print(" ".join(r.overrides + forwarded), f"--config.seed={r.seed}")
    return
  os.makedirs(out, exist_ok=True)
  done = sweep.run_all(runs, config_path, forwarded, workers)
  # Keep the planned order for the tables.
  text = summarize(done, config, name)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  sweep.write_json(done, os.path.join(out, "results.json"))
  plot(done, os.path.join(out, "accuracy_vs_sparsity.png"),
       f"{config.model} on {config.dataset} ({config.num_epochs} epochs)")
  print(text)
  failed = sum(1 for d in done if not d.result)
  if failed:
    raise SystemExit(f"error: {failed} of {len(runs)} runs failed; see results.md")


if __name__ == "__main__":
  main()
