"""Registry entries of the sparse-training methods: ST-3 and DST (DST-EE, RigL, SET)."""

from experiments import methods  # pylint: disable=unused-import
