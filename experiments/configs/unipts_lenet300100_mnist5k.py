"""UniPTS post-training sparsity of a dense LeNet-300-100 on `mnist_5k`.

The same two uses and fields as `unipts_lenet5_mnist5k.py` (read its
docstring): the base fields are the teacher recipe for `experiments.main`
(30 epochs of SGD, cosine lr from 0.05), the UniPTS fields are read by
`experiments.unipts`.

    python -m experiments.main --config experiments/configs/unipts_lenet300100_mnist5k.py \
        --workdir runs/dense_lenet300100/seed42
    python -m experiments.unipts --config experiments/configs/unipts_lenet300100_mnist5k.py \
        --dense_workdir runs/dense_lenet300100/seed42
"""

from experiments.configs import _base
from experiments.configs import unipts_lenet5_mnist5k


def get_config():
  c = _base.mnist5k_config("lenet300100", method="dense", num_epochs=30,
                           lr_schedule="cosine",
                           # lr_decay_epochs: only for --config.lr_schedule=piecewise
                           lr_decay_epochs=(20, 25))
  c.prune_every_epochs = 5.0  # unused by "dense" (see the LeNet-5 file)
  c.hoyer_lambda = 3e-5
  return unipts_lenet5_mnist5k.add_unipts_fields(c)
