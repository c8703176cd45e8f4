"""UniPTS post-training sparsity of a dense LeNet-5 on the embedded `mnist_5k`.

One file, two uses:

* the **teacher recipe** (the base fields: method "dense", model, dataset,
  epochs, optimizer): `python -m experiments.main --config <this file>` trains
  the dense model (30 epochs of SGD, cosine lr from 0.05; ~98 % test
  accuracy, about a minute on 2 CPU cores);
* the **UniPTS fields** read by `experiments.unipts`, which takes the model,
  width and data set from the dense run's own `config.json`, not from here:

  sparsity            the global target P in [0, 1) over the prunable weights.
  seed                the calibration draw, the search and the batch order.
  calibration_size    images drawn from the train split (paper: 10,240
                      ImageNet images; here 512 of mnist_5k's 4,000).
  calibration_labels  "teacher" (the dense model's argmax: no labels needed)
                      or "true" (the data set's labels, as the paper).
  search              run the reducing-regrowing search (False: P in every
                      layer, the "uniform" ablation; sparse training still
                      runs).
  unipts.*            every field of `flipout_jax.unipts.UniPTSConfig` (CPU
                      defaults), except `redistribute`, which is True here
                      (below).

`unipts.redistribute=True`: the paper's decoding loses the regrowth budget of
layers clamped at sparsity 0 (LeNet-5's 150-weight conv1 always is), so its
models end sparser than P; redistributing it makes the achieved sparsity P
(up to ⌊p_l·n_l⌋ per layer), a like-for-like comparison with global magnitude
pruning at the same P. `--config.unipts.redistribute=False` is the paper's.

    python -m experiments.main --config experiments/configs/unipts_lenet5_mnist5k.py \
        --workdir runs/dense_lenet5/seed42
    python -m experiments.unipts --config experiments/configs/unipts_lenet5_mnist5k.py \
        --dense_workdir runs/dense_lenet5/seed42 --config.sparsity=0.95
"""

from ml_collections import config_dict

from experiments.configs import _base


def unipts_fields() -> config_dict.ConfigDict:
  """`flipout_jax.unipts.UniPTSConfig`'s defaults (kept equal by a test;
  written out so that loading a config does not import JAX)."""
  u = config_dict.ConfigDict()
  u.temperature = 4.0
  u.tau0 = 8.0
  u.tau_decay = 0.99
  u.regrow = 0.05
  u.redistribute = False
  u.population_size = 12
  u.generations = 8
  u.num_parents = 5
  u.crossover_children = 6
  u.mutation_children = 6
  u.mutation_prob = 0.1
  u.crossover_prob = 1.0
  u.fitness_samples = config_dict.placeholder(int)
  u.bn_batch_size = 64
  u.eval_batch_size = 512
  u.epochs = 20
  u.batch_size = 64
  u.learning_rate = 0.01
  u.momentum = 0.9
  u.weight_decay = 1e-4
  u.warmup_epochs = 1.0
  u.decay = 5e-5
  u.recalibrate_final = True
  return u


def add_unipts_fields(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  c.sparsity = 0.9
  c.calibration_size = 512
  c.calibration_labels = "teacher"
  c.search = True
  c.unipts = unipts_fields()
  c.unipts.redistribute = True
  return c


def get_config():
  # The teacher recipe (experiments.main).
  c = _base.mnist5k_config("lenet5", method="dense", num_epochs=30,
                           lr_schedule="cosine",
                           # lr_decay_epochs: only for --config.lr_schedule=piecewise
                           lr_decay_epochs=(20, 25))
  # Unused by "dense"; set so that the file also validates with the pruning
  # methods at sparsity <= 0.96875 (events at epochs 5, 10, ..., 25).
  c.prune_every_epochs = 5.0
  c.hoyer_lambda = 3e-5
  # UniPTS (experiments.unipts).
  return add_unipts_fields(c)
