"""Structured vs unstructured gradual magnitude pruning on mnist_5k (issue 17).

`global_magnitude` with `structure="coupled:l2"`: whole dependency groups
(`fj.coupled` of the traced model: a filter/neuron with the next layer's
rows), scored by the L2 norm of their weights, the same fraction of units of
every group ("uniform"); events halve the units at epochs 1, 2, 3, 4 (as
many as `sparsity` needs), then fine-tuning to epoch 12, cosine lr. The
unstructured baseline (`structure=unstructured`, `distribution=global`) keeps
the same number of weights. VGG-11: `--config.model=vgg11
--config.width=0.125`. The commands: experiments/results/structured_mnist5k/results.md.
"""

from experiments.configs import _base


def get_config():
  return _base.mnist5k_config("lenet5", "global_magnitude", num_epochs=12,
                              lr_schedule="cosine", lr_decay_epochs=None,
                              every_epochs=1.0, distribution="uniform",
                              structure="coupled:l2")
