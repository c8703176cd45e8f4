"""Resumable sweeps over config grids: the machinery every results table uses.

    python -m experiments.sweep --config experiments/configs/dst_lenet300100_mnist5k.py \
        --grid method=dst_ee,rigl,set,static_random --grid sparsity=0.9,0.95,0.98 \
        --seeds 42,43,44 --workers 2 --out experiments/results/dst_lenet300100

Each grid point × seed: ``experiments.main --resume`` in a subprocess (dying with
the sweep on Linux) in ``<out>/runs/<k1=v1>/.../seed<k>``, skipped when finished
with the same config. The first grid key gives ``results.md``'s rows (mean ± std
over seeds), the second its columns; ``results.json``, ``accuracy_vs_sparsity.png``.
Other ``--config.<field>=<value>`` arguments go to every run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import dataclasses
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import flags
from ml_collections import config_flags

from experiments import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Run:
  """One run of ``experiments.main``: where it goes and what it overrides."""
  method: str  # the row label in tables
  tag: str  # the column label / directory name
  seed: int
  overrides: list[str]
  workdir: str = ""
  config: Any = None  # the validated config as JSON (for the skip check)
  result: dict | None = None
  returncode: int | None = None
  seconds: float | None = None
  skipped: bool = False
  info: dict = dataclasses.field(default_factory=dict)  # e.g. target, λ


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PRCTL = None  # libc's ``prctl`` on Linux, looked up here (not in the child).
if sys.platform.startswith("linux"):
  with contextlib.suppress(OSError, AttributeError):
    _PRCTL = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                         use_errno=True).prctl


def spawn(cmd: Sequence[str], **kwargs) -> subprocess.Popen:
  """``subprocess.Popen`` whose child gets SIGTERM when this process dies
  (Linux), checking ``getppid`` after ``prctl`` (a parent dead before it)."""
  if _PRCTL is not None:
    parent = os.getpid()

    def preexec():
      _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
      if os.getppid() != parent:
        os._exit(1)  # pylint: disable=protected-access
    kwargs["preexec_fn"] = preexec
  return subprocess.Popen(cmd, **kwargs)  # pylint: disable=consider-using-with


def with_seed(args: Sequence[str], seed: int) -> list[str]:
  """``args`` with ``{seed}`` replaced (e.g. ``--config.init_from=.../seed{seed}``:
  each seed's post-training run starts from that seed's dense run)."""
  return [a.replace("{seed}", str(seed)) for a in args]


def run_one(run: Run, config_path: str, forwarded: Sequence[str]) -> Run:
  """Runs (or skips, when finished with the same config) one run."""
  final = os.path.join(run.workdir, "final.json")
  if os.path.exists(final):
    with open(final) as f:
      result = json.load(f)
    # Only a run of the same config is skipped; experiments.main refuses to
    # resume another, and the run is reported as failed.
    from experiments import train  # pylint: disable=g-import-not-at-top
    if run.config is None or not train.config_diff(result.get("config", {}),
                                                   run.config):
      run.result, run.skipped = result, True
      return run
  os.makedirs(run.workdir, exist_ok=True)
  cmd = [sys.executable, "-m", "experiments.main", f"--config={config_path}",
         *with_seed([*forwarded, *run.overrides], run.seed),
         f"--config.seed={run.seed}",
         f"--workdir={run.workdir}", "--resume", "--noprogress"]
  t0 = time.time()
  with open(os.path.join(run.workdir, "run.log"), "a") as log:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = spawn(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    proc.wait()
  run.returncode = proc.returncode
  run.seconds = round(time.time() - t0, 1)
  if proc.returncode == 0 and os.path.exists(final):
    with open(final) as f:
      run.result = json.load(f)
  return run


def validate_runs(runs: Sequence[Run], config_path: str,
                  forwarded: Sequence[str]) -> None:
  """Builds and validates every run's config here, failing fast on a bad one."""
  from experiments import train  # pylint: disable=g-import-not-at-top
  for r in runs:
    argv = ["sweep", f"--config={config_path}",
            *with_seed([*forwarded, *r.overrides], r.seed),
            f"--config.seed={r.seed}"]
    try:
      config = main_lib.parse_flags(argv, lambda fv: None, config_path,
                                    __doc__)["config"].value
      train.validate(config)
      r.config = train.config_json(config)
    except train.ConfigError as e:
      raise SystemExit(f"error: {r.method} {r.tag}: {e}") from None


def run_all(runs: list[Run], config_path: str, forwarded: Sequence[str],
            workers: int) -> list[Run]:
  """Runs everything, ``workers`` at a time, printing one line per run."""
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    futures = [pool.submit(run_one, r, config_path, forwarded) for r in runs]
    for i, fut in enumerate(concurrent.futures.as_completed(futures)):
      r = fut.result()
      res = r.result
      status = ("skipped (finished before)" if r.skipped else
                f"{r.seconds}s" if res else f"FAILED (exit {r.returncode})")
      acc = (f"test_accuracy={res['test_accuracy']:.4f} "
             f"sparsity={res['sparsity']:.4f}" if res else "")
      print(f"[{i + 1}/{len(runs)}] {r.method} {r.tag} seed{r.seed}: {acc} "
            f"{status}", flush=True)
  return runs


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (nan for one value)."""
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1
                                   else float("nan"))


def cell(values: Sequence[float], scale: float = 100.0) -> str:
  """``"m ± s"`` of ``scale * values`` (``"–"`` for none)."""
  if not values:
    return "–"
  m, s = mean_std([scale * v for v in values])
  return f"{m:.2f}" if math.isnan(s) else f"{m:.2f} ± {s:.2f}"


def table(runs: Sequence[Run], rows: Sequence[str], cols: Sequence[str],
          key: str = "test_accuracy", row_label: str = "method",
          scale: float = 100.0) -> str:
  """A Markdown table of ``result[key]`` (mean ± std over seeds) by
  ``run.method`` × ``run.tag``; marks cells where not every seed finished."""
  lines = [f"| {row_label} | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
  for row in rows:
    cells = []
    for col in cols:
      these = [r for r in runs if r.method == row and r.tag == col]
      vals = [r.result[key] for r in these if r.result]
      c = cell(vals, scale)
      if vals and len(vals) < len(these):
        c += f" (n={len(vals)})"
      cells.append(c)
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(runs: Sequence[Run], rows: Sequence[str], path: str,
         title: str) -> None:
  """Test accuracy (mean ± std over seeds) against the fraction of weights
  left (mean measured sparsity), one line per row, log scale."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for row in rows:
    points = []
    for tag in dict.fromkeys(r.tag for r in runs if r.method == row):
      res = [r.result for r in runs if r.method == row and r.tag == tag
             and r.result]
      if res:
        m, s = mean_std([100 * x["test_accuracy"] for x in res])
        left = 1 - sum(x["sparsity"] for x in res) / len(res)
        points.append((max(left, 1e-5), m, 0 if math.isnan(s) else s))
    if points:
      x, y, err = zip(*sorted(points))
      ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=row)
  ax.set(xscale="log", xlabel="fraction of weights left (1 − sparsity), log scale",
         ylabel="test accuracy (%)", title=title)
  ax.invert_xaxis()
  ax.grid(alpha=0.3, which="both")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_multi_string(
      "grid", [], "key=v1,v2,...: a config field and its values; the first "
      "grid key gives the table rows, the second its columns.", flag_values=fv)
  flags.DEFINE_list("seeds", ["42", "43", "44"], "Seeds.", flag_values=fv)
  flags.DEFINE_integer("workers", 2, "Runs in parallel.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
  flags.DEFINE_string("title", None, "Title of results.md.", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print the runs, run nothing.", flag_values=fv)


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
  grid = []
  for spec in specs:
    if "=" not in spec:
      raise SystemExit(f"error: --grid {spec!r}: expected key=v1,v2,...")
    key, values = spec.split("=", 1)
    grid.append((key, [v for v in values.split(",") if v]))
  if not grid:
    raise SystemExit("error: --grid: give at least one key=v1,v2,...")
  return grid


def plan(grid: list[tuple[str, list[str]]], seeds: Sequence[int],
         out: str) -> list[Run]:
  keys = [k for k, _ in grid]
  runs = []
  for values in itertools.product(*[v for _, v in grid]):
    point = dict(zip(keys, values))
    overrides = [f"--config.{k}={v}" for k, v in point.items()]
    row = point[keys[0]]
    col = point[keys[1]] if len(keys) > 1 else "result"
    sub = [f"{k}={v}" for k, v in point.items()]
    for seed in seeds:
      runs.append(Run(method=row, tag=col, seed=seed, overrides=overrides,
                      workdir=os.path.join(out, "runs", *sub, f"seed{seed}"),
                      info=point))
  return runs


def forwarded_overrides(argv: Sequence[str], swept) -> list[str]:
  """The ``--config.<field>=<value>`` arguments of ``argv`` (``--config.x v``
  joined), minus the fields in ``swept`` (said on stderr)."""
  out = []
  for i, arg in enumerate(argv):
    if not arg.startswith("--config."):
      continue
    if "=" not in arg and i + 1 < len(argv):  # "--config.x value" form.
      arg = f"{arg}={argv[i + 1]}"
    field = arg[len("--config."):].split("=", 1)[0]
    if field in swept or field.split(".")[0] in swept:
      print(f"note: --config.{field} is set by the sweep; ignoring {arg}",
            file=sys.stderr)
    else:
      out.append(arg)
  return out


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  fv = main_lib.parse_flags(argv, _define_flags, main_lib.DEFAULT_CONFIG, __doc__)
  config_path = config_flags.get_config_filename(fv["config"])
  name = main_lib.config_name(fv)
  out = os.path.abspath(fv["out"].value or
                        os.path.join(REPO, "experiments", "results", name))
  grid = parse_grid(fv["grid"].value)
  try:
    seeds = [int(v) for v in fv["seeds"].value]
  except ValueError as e:
    raise SystemExit(f"error: --seeds: {e}") from None
  forwarded = forwarded_overrides(argv[1:], {k for k, _ in grid} | {"seed"})
  runs = plan(grid, seeds, out)
  validate_runs(runs, config_path, forwarded)  # Fails fast on a bad config.
  workers = fv["workers"].value
  print(f"{len(runs)} runs, {workers} in parallel, into {out}", flush=True)
  if fv["dry_run"].value:
    for r in runs:
      print(" ".join(r.overrides + list(forwarded)), f"--config.seed={r.seed}")
    return
  os.makedirs(out, exist_ok=True)
  run_all(runs, config_path, forwarded, workers)
  rows, cols = grid[0][1], grid[1][1] if len(grid) > 1 else ["result"]
  command = "python -m experiments.sweep " + " ".join(
      a if " " not in a else repr(a) for a in argv[1:])
  plot(runs, rows, os.path.join(out, "accuracy_vs_sparsity.png"),
       fv["title"].value or name)
  text = "\n".join([
      f"# {fv['title'].value or name}", "",
      f"Test accuracy (%), mean ± std over seeds {', '.join(map(str, seeds))}.",
      f"Rows: `{grid[0][0]}`" + (f"; columns: `{grid[1][0]}`." if len(grid) > 1 else "."),
      "", table(runs, rows, cols, row_label=grid[0][0]), "",
      "Measured sparsity (%):", "",
      table(runs, rows, cols, key="sparsity", row_label=grid[0][0]), "",
      *(["Validation perplexity (text):", "", table(
          runs, rows, cols, "val_perplexity", grid[0][0], 1.0), ""]
        if any("val_perplexity" in (r.result or {}) for r in runs) else []),
      f"Command: `{command}`", ""])
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump([{k: v for k, v in dataclasses.asdict(r).items()
                if k not in ("overrides", "config")} for r in runs],
              f, indent=1, default=str)
  print(text)
  failed = sum(1 for r in runs if not r.result)
  if failed:
    raise SystemExit(f"error: {failed} of {len(runs)} runs failed; see "
                     "results.md and the run.log files")


if __name__ == "__main__":
  main()
