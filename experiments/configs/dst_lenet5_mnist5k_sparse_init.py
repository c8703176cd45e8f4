"""`dst_lenet5_mnist5k.py` with a sparse-aware start (`dst_sparse_init=True`).

The random ERK start of the DST methods (and of static_random) keeps the
dense init's values on the kept weights, so each layer's pre-activations
shrink with its density: at 98 % sparsity LeNet-5's initial logits are
~3,500x smaller than dense and no method trains in 12 epochs (test accuracy
10 %). Here the first update rescales each output unit's kept weights by
sqrt(fan_in / kept fan_in) (Evci et al.'s sparse init); everything else is
as in `dst_lenet5_mnist5k.py`.

    python -m experiments.sweep --config experiments/configs/dst_lenet5_mnist5k_sparse_init.py \
        --grid method=dst_ee,rigl,set,static_random --grid sparsity=0.95,0.98 \
        --seeds 42,43,44 --workers 1 --out experiments/results/dst_lenet5_sparse_init
"""

from experiments.configs import dst_lenet5_mnist5k


def get_config():
  c = dst_lenet5_mnist5k.get_config()
  c.sparse_init = True
  return c
