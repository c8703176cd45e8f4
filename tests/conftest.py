"""pytest options: ``--runslow`` also runs the tests marked ``slow`` (the full
conformance matrix); without it they are skipped, to keep the suite within
CI's time."""

import pytest


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
