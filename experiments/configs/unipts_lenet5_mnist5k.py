"""UniPTS post-training sparsity of a dense LeNet-5 on the embedded `mnist_5k`.

Two phases: the **dense teacher** (`method=dense`: 30 epochs of SGD, cosine lr
from 0.05; ~98 %, about a minute), then from its final params
(`--config.init_from=<its workdir>`) "unipts" (search + sparse training with
distillation, `fj.unipts.run`; `method_kw`: any `UniPTSConfig` field),
"unipts_uniform" (P in every layer), "magnitude" (one-shot global |θ|) and
"magnitude_uniform" (per layer), on 512 train images labelled by the teacher.
`redistribute=True`: the paper's decoding loses the regrowth budget of layers
clamped at sparsity 0 (LeNet-5's conv1), ending sparser than P; redistributed,
the sparsity is P. The tables' commands:
experiments/results/unipts_lenet5_mnist5k/{dense/,}results.md.
"""

from experiments.configs import _base


def get_config(model: str = "lenet5"):
  return _base.mnist5k_config(model, method="dense", num_epochs=30,
                              lr_schedule="cosine", lr_decay_epochs=(20, 25),
                              sparsity=0.9, redistribute=True)
