"""The README's main job: FlipOut on LeNet-300-100 on the embedded `mnist_5k`.

4,000 training / 1,000 test images, 31 steps per epoch at batch 128. 80
epochs of SGD (lr 0.05, momentum 0.9, coupled weight decay 5e-4); a pruning
event every 9 epochs halves the surviving weights: events at epochs 9, 18,
..., 72 (8 halvings, none at the last epoch) give 1 - 0.5^8 = 99.61 %
sparsity. The lr drops x0.1 at epochs 74 and 78, after the last event (also
after the last event of every paper target, see --config.target), so the
pruned network recovers at the full rate first. About a minute on 2 CPU
cores; ~91 % test accuracy at 99.61 % (dense: ~95 %).

    python -m experiments.main
    python -m experiments.main --config.method=global_magnitude
    python -m experiments.main --config.sparsity=0.99      # 7 events, exactly 99 %
    python -m experiments.main --config.target=99.9        # the paper's schedule, scaled

The FlipOut table (experiments/results/flipout_lenet300100_mnist5k): the sweep
``--grid method=flipout,global_magnitude,noisy_global_magnitude,random,snip
--grid target=75,93.75,98.44,99.61,99.9``, Hoyer-Square's
``--grid method=hoyer_square --grid presets.hoyer_square.strength=...`` (its
sparsity follows from λ) and ``--grid method=dense``; the commands are in
its results.md.
"""

from experiments.configs import _base


def get_config():
  # sparsity None: 1 - 0.5^8 from the events at epochs 9, 18, ..., 72.
  c = _base.mnist5k_config("lenet300100", method="flipout",
                           every_epochs=9.0)
  # Hoyer-Square (--config.method=hoyer_square): 80 epochs + 20 fine-tune.
  c.presets.hoyer_square.update(strength=3e-5, finetune_epochs=20,
                                finetune_lr=0.005)
  return c
