"""UniPTS post-training sparsity of a dense LeNet-5 on the embedded `mnist_5k`.

One file, two phases of the harness:

* the **dense teacher** (`method=dense`): 30 epochs of SGD, cosine lr from
  0.05; ~98 % test accuracy, about a minute on 2 CPU cores;
* the **post-training methods** from the teacher's final params
  (`--config.init_from=<its workdir>`): "unipts" (search + sparse training
  with distillation, `fj.unipts.run`; `method_kw` holds its arguments and
  any `UniPTSConfig` field), "unipts_uniform" (no search: P in every layer),
  "magnitude" (one-shot global |θ|) and "magnitude_uniform" (per layer), on
  `calibration_size` = 512 train images drawn by the seed, labelled by the
  teacher.

`redistribute=True`: the paper's decoding loses the regrowth budget of
layers clamped at sparsity 0 (LeNet-5's 150-weight conv1 always is), so its
models end sparser than P; redistributing it makes the achieved sparsity P,
a like-for-like comparison with magnitude pruning at the same P.

    python -m experiments.sweep --config experiments/configs/unipts_lenet5_mnist5k.py \
        --grid method=dense --seeds 42,43,44 --workers 1 \
        --out experiments/results/unipts_lenet5_mnist5k/dense
    python -m experiments.sweep --config experiments/configs/unipts_lenet5_mnist5k.py \
        --grid method=magnitude,magnitude_uniform,unipts_uniform,unipts \
        --grid sparsity=0.9,0.95 --seeds 42,43,44 --workers 1 \
        --config.init_from=experiments/results/unipts_lenet5_mnist5k/dense/runs/method=dense/seed{seed} \
        --out experiments/results/unipts_lenet5_mnist5k
"""

from experiments.configs import _base


def get_config(model: str = "lenet5"):
  c = _base.mnist5k_config(model, method="dense", num_epochs=30,
                           lr_schedule="cosine", lr_decay_epochs=(20, 25),
                           sparsity=0.9, redistribute=True)
  return c
