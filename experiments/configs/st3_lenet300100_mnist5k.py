"""ST-3 / ST-3σ on LeNet-300-100, mnist_5k: the FlipOut main job's recipe.

CPU scale (issue 4): the data, epochs and optimizer of
`flipout_lenet300100_mnist5k.py` (rows compare with its table), weight decay on
the raw weights, no gradient clipping; sparsity `target` (1 − 0.5^N) or
`sparsity`. The cubic ramp follows the reference's proportions (epoch 5 → 80 of
160): epochs 2.5 → 40; the last 5 fine-tune under the frozen mask (the
reference's 10 after 160). The table's command:
experiments/results/st3_lenet300100/results.md.
"""

from experiments.configs import _base


def get_config(model: str = "lenet300100", **kw):
  """``kw``: ``_base.mnist5k_config``'s (the LeNet-5 file's epochs and ramp)."""
  c = _base.mnist5k_config(model, method="st3", **{
      "start_epoch": 2.5, "end_epoch": 40.0, "freeze_epoch": 75.0, **kw})
  c.target = 99.61  # 1 - 0.5^8, the FlipOut main job's sparsity
  # The FlipOut family on this config: the paper's events from epoch 0.
  for name in ("flipout", "global_magnitude"):
    c.presets[name] = dict(c.presets.get(name, {}), start_epoch=0.0, end_epoch=None)
  return c
