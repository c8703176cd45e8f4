"""Experiments: configs (`get_config()`), the train loop, sweeps and figures."""


def one_line(text) -> str:
  """``text`` (an exception) on one line, for one-line errors."""
  return " ".join(str(text).split())
