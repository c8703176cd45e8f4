"""Registry entries of the gradient-flow importance measures (and GraSP)."""

from experiments import methods  # pylint: disable=unused-import
