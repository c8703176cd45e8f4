"""pytest options: ``--runslow`` also runs the tests marked ``slow`` (the full
conformance matrix); without it they are skipped, to keep the suite within
CI's time.

The tests compile hundreds of small programs and run each for a few steps,
so XLA:CPU's backend optimisation is turned down for them (about 25 % less
wall time on 2 cores); results are still deterministic, and benchmarks and
experiments, which run in their own processes, are unaffected.
"""

import os

import pytest

_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()


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
