"""pytest options: ``--runslow`` also runs the tests marked ``slow`` (the full
conformance matrix); without it they are skipped, to keep the suite within
CI's time.

The tests compile hundreds of small programs and run each for a few steps,
so compiling is most of their CPU time, and XLA:CPU compiles them with
``COMPILE_FAST``:

* ``--xla_backend_optimization_level=0``: LLVM codegen without optimisation
  (about 25 % less wall time on 2 cores);
* ``--xla_cpu_use_fusion_emitters=false``: fusions emitted by the classic
  elemental IR emitter rather than the MLIR fusion emitters, whose lowering
  pipeline is most of what is left of a small program's compile (about half
  the CPU time of the conformance setups);
* ``--xla_cpu_parallel_codegen_split_count=1``: the module's LLVM IR in one
  piece, not split for threads that two busy cores cannot run in parallel
  anyway (about 15 % less CPU on top).

Results are still deterministic (the same flags everywhere in a session:
the subprocesses the tests start inherit them), and benchmarks and
experiments, which run in their own processes, are unaffected. A jaxlib
that does not know a flag would abort at its first compile, so the flags
are tried once, in a subprocess, by the process that starts the session
(its pytest-xdist workers inherit the outcome); unknown ones are left out
with a warning.
"""

import os
import subprocess
import sys
import warnings

import pytest

COMPILE_FAST = ("--xla_backend_optimization_level=0",
                "--xla_cpu_use_fusion_emitters=false",
                "--xla_cpu_parallel_codegen_split_count=1")
_TRIED = "FLIPOUT_JAX_TEST_XLA_FLAGS_TRIED"


def _known(flags):
  """Whether XLA:CPU starts with ``flags`` (a fresh process: XLA parses
  XLA_FLAGS once, when the backend starts)."""
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                        env=env, capture_output=True, timeout=300, check=False)
  return proc.returncode == 0


def _add_compile_flags():
  if os.environ.get(_TRIED):  # tried by the process that started the session
    return
  os.environ[_TRIED] = "1"
  current = os.environ.get("XLA_FLAGS", "").split()
  names = {f.split("=")[0] for f in current}
  new = [f for f in COMPILE_FAST if f.split("=")[0] not in names]
  if not new:
    return
  if not _known(current + new):  # keep the ones this jaxlib knows
    unknown = [f for f in new if not _known(current + [f])]
    warnings.warn(f"conftest: XLA does not know {unknown}; compiling without")
    new = [f for f in new if f not in unknown]
  os.environ["XLA_FLAGS"] = " ".join(current + new)


_add_compile_flags()


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False,
                   help="also run the tests marked slow")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: the full conformance matrix; run with --runslow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
