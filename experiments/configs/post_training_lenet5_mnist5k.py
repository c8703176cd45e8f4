"""Post-training sparsity on LeNet-5, mnist_5k: magnitude, Wanda, SparseGPT, OWL.

The UniPTS table's dense teachers (`unipts_lenet5_mnist5k.py`, ~97.8 %) pruned
once, no fine-tuning, from `--config.init_from=<teacher workdir>`:
"magnitude_uniform" (|θ| per layer), "wanda" (|W|·‖X‖ per output),
"sparsegpt" (with weight reconstruction) and their OWL allocations
"wanda_owl", "sparsegpt_owl" (λ = 0.08, M = 5); layers pruned sequentially on
512 train images drawn by the seed. The table's command is in
experiments/results/post_training_lenet5_mnist5k/results.md.
"""

from experiments.configs import unipts_lenet5_mnist5k


def get_config(model: str = "lenet5"):
  c = unipts_lenet5_mnist5k.get_config(model)
  c.presets.wanda_owl = dict(method="wanda", allocation="owl")
  c.presets.sparsegpt_owl = dict(method="sparsegpt", allocation="owl")
  return c
