"""Train one config: `python -m experiments.main [--config path.py] [--config.key=value ...]`.

    python -m experiments.main                       # FlipOut, LeNet-300-100, mnist_5k
    python -m experiments.main --config.method=global_magnitude --config.seed=43
    python -m experiments.main --config experiments/configs/flipout_vgg19_cifar10.py \
        --config.target=99.61 --workdir runs/vgg19_99.61
    python -m experiments.main --resume              # continue (or skip) a run

Writes to --workdir (default runs/<config name>/seed<seed>): checkpoints/,
metrics.jsonl, sparsity.md, curves.png, final_params.npz, final.json, and
ends with the line `final test_accuracy=<float> sparsity=<float>`.
Bad config values stop the run with a one-line `error: ...` (exit status 1).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "configs", "flipout_lenet300100_mnist5k.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Path to a config file (get_config()); override "
    "fields with --config.<field>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default runs/<config name>/seed<seed>).")
_RESUME = flags.DEFINE_bool(
    "resume", False, "Continue from the latest checkpoint in --workdir; skip "
    "the run if it finished (final.json exists).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Delete a previous run in --workdir and start over.")
_PROGRESS = flags.DEFINE_bool(
    "progress", True, "Show a progress bar (only when stderr is a terminal).")


def config_name(flag_name: str = "config") -> str:
  path = config_flags.get_config_filename(flags.FLAGS[flag_name])
  return os.path.splitext(os.path.basename(path.split(":")[0]))[0]


def default_workdir(config, name: str) -> str:
  return os.path.join("runs", name, f"seed{config.seed}")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  # Imported here so that --help and flag errors do not pay for JAX.
  from experiments import train  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(config, config_name())
  try:
    train.run(config, workdir, resume=_RESUME.value, overwrite=_OVERWRITE.value,
              progress=_PROGRESS.value)
  except train.ConfigError as e:
    raise SystemExit(f"error: {' '.join(str(e).split())}") from None


def run_main(argv=None) -> None:
  """Entry point; ``argv`` (with argv[0]) lets tests call it in-process."""
  app.run(main, argv=argv if argv is not None else sys.argv)


if __name__ == "__main__":
  run_main()
