"""Structured vs unstructured gradual magnitude pruning, mnist_5k (issue 17).

`structure="coupled:l2"`: whole traced dependency groups by L2 norm, the same
fraction of every group's units; events halve them at epochs 1, 2, 3, 4 (as
`sparsity` needs), then fine-tuning to epoch 12 (cosine lr). Baseline and
commands (VGG-11: `--config.model=vgg11 --config.width=0.125`):
experiments/results/structured_mnist5k/results.md."""

from experiments.configs import _base


def get_config():
  return _base.mnist5k_config("lenet5", "global_magnitude", num_epochs=12,
                              lr_schedule="cosine", lr_decay_epochs=None,
                              every_epochs=1.0, distribution="uniform",
                              structure="coupled:l2")
