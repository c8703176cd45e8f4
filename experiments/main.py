r"""Train one config: `python -m experiments.main [--config path.py] [--config.key=value ...]`.

    python -m experiments.main                       # FlipOut, LeNet-300-100, mnist_5k
    python -m experiments.main --config.method=global_magnitude --config.seed=43
    python -m experiments.main --config experiments/configs/flipout_vgg19_cifar10.py \
        --config.target=99.61 --workdir runs/vgg19_99.61
    python -m experiments.main --resume              # continue (or skip) a run

Writes the run into --workdir (default runs/<config name>/seed<seed>) and ends
with `final test_accuracy=<float> sparsity=<float>` (at once for a finished
workdir; an unfinished one needs --resume or --overwrite). Errors (a bad flag or
value, a busy workdir, a non-finite loss, a full disk): one `error: ...` line.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import one_line

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "configs", "flipout_lenet300100_mnist5k.py")
HELP = ("--help", "-h", "--helpfull", "--helpshort", "-?")


def _define_main_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Run directory (default "
                      "runs/<config name>/seed<seed>).", flag_values=fv)
  flags.DEFINE_bool("resume", False, "Continue from the newest checkpoint in "
                    "--workdir that restores (or start fresh).", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Delete a previous run in --workdir "
                    "and start over.", flag_values=fv)
  flags.DEFINE_bool("progress", True, "A progress bar (when stderr is a "
                    "terminal).", flag_values=fv)


def _aliased(argv: Sequence[str], config) -> list[str]:
  """``--config.<key>`` of a key in ``method_kw`` (sparsity, measure, ...) or
  of a renamed field (``legacy.FLAGS``) as the field it sets."""
  from experiments import legacy  # pylint: disable=g-import-not-at-top
  out = []
  for a in argv:
    m = re.match(r"^(--?(?:no)?config\.)([^=.]+)(.*)$", a)
    if m and m.group(2) not in config:
      key = m.group(2)
      if key in legacy.FLAGS:
        key = legacy.FLAGS[key]
      elif key in config.get("method_kw", {}):
        key = "method_kw." + key
      a = m.group(1) + key + m.group(3)
    out.append(a)
  return out


def parse_flags(argv: Sequence[str],
                define: Callable[[flags.FlagValues], None] = _define_main_flags,
                default_config: str = DEFAULT_CONFIG,
                doc: str | None = None) -> flags.FlagValues:
  """Parses ``argv`` (argv[0] is the program) into a fresh FlagValues (not
  absl's global FLAGS: the CLI runs in-process many times in tests). Raises
  SystemExit: a one-line ``error: ...`` for a bad flag, an unknown config
  field or an unreadable config file; status 0 after --help."""
  argv = list(argv)
  overrides = [a for a in argv if re.match(r"^--?(no)?config\.", a)]

  def parse(args, help_only=False):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", default_config, "Config file (get_config()); override its "
        "fields with --config.<field>=<value>.", flag_values=fv,
        sys_argv=args, lock_config=True)
    define(fv)
    if help_only:  # Without loading the config.
      print((doc or __doc__).strip() + "\n\n" + fv.get_help())
      raise SystemExit(0)
    fv(args)
    fv["config"].value.keys()  # A config that failed to load raises here.
    return fv

  try:
    if any(a in HELP for a in argv[1:]):
      parse(argv, help_only=True)
    base = parse([a for a in argv if a not in overrides])
    config = base["config"].value
    argv = _aliased(argv, config)
    try:
      return parse(argv) if overrides else base
    except (KeyError, AttributeError) as e:  # A field the config lacks.
      unknown = [m.group(1) for a in argv
                 for m in [re.match(r"^--?(?:no)?config\.([^=]+)", a)]
                 if m and m.group(1).split(".")[0] not in config]
      names = unknown or [one_line(e).strip("\"'")]
      raise SystemExit(
          f"error: config: unknown field {', '.join(names)}; valid fields: "
          f"{', '.join(sorted(config.keys()))} (and method_kw."
          f"{', method_kw.'.join(sorted(config.get('method_kw', {})))})") from None
  except flags.Error as e:
    raise SystemExit(f"error: {one_line(e)}") from None
  except (OSError, ImportError, SyntaxError, TypeError, ValueError, KeyError,
          AttributeError) as e:
    raise SystemExit(f"error: config: {one_line(e)}") from None


def config_name(fv: flags.FlagValues) -> str:
  path = config_flags.get_config_filename(fv["config"])
  return os.path.splitext(os.path.basename(path.split(":")[0]))[0]


def run_main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  """The CLI: parses ``argv`` (default sys.argv), trains, returns the result;
  SystemExit ``error: ...`` (one line) for bad flags or config values."""
  argv = list(sys.argv if argv is None else argv)
  fv = parse_flags(argv)
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  # Imported after parsing so that --help and flag errors do not pay for JAX.
  from experiments import train  # pylint: disable=g-import-not-at-top

  config = fv["config"].value
  workdir = fv["workdir"].value or os.path.join("runs", config_name(fv),
                                               f"seed{config.seed}")
  try:
    return train.run(config, workdir, resume=fv["resume"].value,
                     overwrite=fv["overwrite"].value,
                     progress=fv["progress"].value)
  except (train.ConfigError, train.RunError) as e:
    raise SystemExit(f"error: {one_line(e)}") from None


if __name__ == "__main__":
  run_main()
