"""Post-training sparsity (50 %) of the byte-level GPT of `gpt_stdlib.py`.

magnitude (global / `magnitude_uniform`), wanda, sparsegpt from
`--config.init_from=<a dense run>`, on 128 train windows; `structure`
"unstructured" sends magnitude through `fj.post_training` too, so every
method keeps the embeddings dense; `--config.structure=2:4` for 2:4.
`unipts` / `unipts_uniform`: 10 epochs in batches of 32, the sparsity P, the
teacher at T = 1 (the paper's T = 4 flattens 256-way predictions).
Commands and numbers: experiments/results/post_training_gpt_stdlib/results.md.
"""

from experiments.configs import gpt_stdlib


def get_config():
  c = gpt_stdlib.get_config()
  c.method_kw.update(sparsity=0.5, structure="unstructured", epochs=10,
                     batch_size=32, redistribute=True, temperature=1.0)
  c.calibration_size = 128
  return c
