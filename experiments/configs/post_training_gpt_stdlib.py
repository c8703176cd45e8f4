"""Post-training sparsity (50 %; `--config.structure=2:4`) of `gpt_stdlib.py`'s
GPT from `--config.init_from`, 128 train windows; "unstructured" keeps the
embeddings dense for magnitude too. UniPTS: 10 epochs, batch 32, teacher T = 1
(T = 4 flattens 256-way targets). experiments/results/post_training_gpt_stdlib.
"""

from experiments.configs import gpt_stdlib


def get_config():
  c = gpt_stdlib.get_config()
  c.method_kw.update(sparsity=0.5, structure="unstructured", epochs=10,
                     batch_size=32, redistribute=True, temperature=1.0)
  c.calibration_size = 128
  return c
