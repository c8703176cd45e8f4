"""The README's main job: FlipOut on LeNet-300-100 on the embedded `mnist_5k`.

The mnist5k recipe (`_base.mnist5k_config`: 80 epochs of SGD, lr ×0.1 at 74
and 78); an event every 9 epochs halves the surviving weights: events at 9,
18, ..., 72 give 1 - 0.5^8 = 99.61 % sparsity, before the lr drops (as for
every paper target, see --config.target). About a minute on 2 CPU cores; ~91 %
test accuracy at 99.61 % (dense: ~95 %).

    python -m experiments.main
    python -m experiments.main --config.method=global_magnitude
    python -m experiments.main --config.sparsity=0.99      # 7 events, exactly 99 %
    python -m experiments.main --config.target=99.9        # the paper's schedule, scaled

The FlipOut table's sweeps: experiments/results/flipout_lenet300100_mnist5k/results.md.
"""

from experiments.configs import _base


def get_config():
  c = _base.mnist5k_config("lenet300100", method="flipout", every_epochs=9.0)
  # Hoyer-Square (--config.method=hoyer_square): 80 epochs + 20 fine-tune.
  c.presets.hoyer_square.update(strength=3e-5, finetune_epochs=20, finetune_lr=0.005)
  return c
