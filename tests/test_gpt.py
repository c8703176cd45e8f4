"""Tests for flipout_jax.models.gpt: the GPT-style decoder.

Every model here is tiny (d_model 16, 2 heads, vocabulary 29), so the whole
file runs in seconds on CPU.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as fj
from flipout_jax import models

TINY = dict(vocab_size=29, d_model=16, num_heads=2, num_layers=2, mlp_dim=24,
            max_len=12)
BATCH, SEQ = 3, 10


def _tokens(key=1, batch=BATCH, seq=SEQ, vocab=TINY["vocab_size"]):
  return jax.random.randint(jax.random.key(key), (batch, seq), 0, vocab,
                            dtype=jnp.int32)


def _init(model, tokens=None):
  tokens = _tokens() if tokens is None else tokens
  return jax.jit(model.init)(jax.random.key(0), tokens)


@pytest.fixture(scope="module")
def tiny():
  """(model, tokens, variables, jitted apply) of the TINY model, built once."""
  model = models.GPT(**TINY)
  tokens = _tokens()
  variables = _init(model, tokens)
  apply = jax.jit(lambda v, t: model.apply(v, t, train=False))
  return model, tokens, variables, apply


def _expected_num_params(vocab_size, d_model, num_layers, mlp_dim, max_len,
                         num_heads=None):
  del num_heads  # The heads split d_model: no parameters of their own.
  d, m = d_model, mlp_dim
  dense = lambda n_in, n_out: n_in * n_out + n_out
  layer_norm = 2 * d
  block = (2 * layer_norm + 4 * dense(d, d) + dense(d, m) + dense(m, d))
  return (vocab_size * d + max_len * d + num_layers * block + layer_norm
          + dense(d, vocab_size))


# ---------------------------------------------------------------- forward pass


def test_output_shape_dtype_and_train_flag(tiny):
  model, tokens, variables, apply = tiny
  assert set(variables) == {"params"}
  logits = apply(variables, tokens)
  chex.assert_shape(logits, (BATCH, SEQ, TINY["vocab_size"]))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  # Deterministic: train=True computes the same logits.
  train = jax.jit(lambda v, t: model.apply(v, t, train=True))(variables, tokens)
  np.testing.assert_array_equal(train, logits)
  # Shorter sequences use the first rows of the position table.
  short = jax.eval_shape(lambda: model.apply(variables, tokens[:, :4]))
  assert (short.shape, short.dtype) == ((BATCH, 4, TINY["vocab_size"]),
                                        jnp.float32)


def test_causal_exactly(tiny):
  _, tokens, variables, apply = tiny
  base = np.asarray(apply(variables, tokens))
  for t in (0, 4, SEQ - 1):
    changed = tokens.at[:, t].set((tokens[:, t] + 7) % TINY["vocab_size"])
    out = np.asarray(apply(variables, changed))
    # Positions before t are bit-identical; t itself (and so the ones after,
    # which attend to it) does change.
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-6


def test_positions_matter(tiny):
  # The same token at two positions gives different logits (the position
  # embedding is used), so causality above is not trivially true.
  _, _, variables, apply = tiny
  tokens = jnp.full((BATCH, SEQ), 3, jnp.int32)
  logits = np.asarray(apply(variables, tokens))
  assert np.abs(logits[0, 0] - logits[0, 1]).max() > 1e-6


# ------------------------------------------------------------ parameter counts


@pytest.mark.parametrize("cfg", [
    TINY,
    dict(TINY, num_layers=3, mlp_dim=None),
    dict(vocab_size=7, d_model=12, num_heads=3, num_layers=1, mlp_dim=5,
         max_len=4),
])
def test_param_count_matches_formula(cfg):
  model = models.GPT(**cfg)
  seq = min(SEQ, cfg["max_len"])
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jnp.zeros((1, seq), jnp.int32)))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
  mlp_dim = cfg["mlp_dim"] or 4 * cfg["d_model"]
  assert n == _expected_num_params(**dict(cfg, mlp_dim=mlp_dim))


def test_gpt_tiny_param_count():
  model = models.get_gpt("gpt_tiny")
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32)))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
  # V=1000, T=64, d=128, m=512, L=4.
  assert n == (1000 * 128 + 64 * 128
               + 4 * (4 * 128 + 4 * (128 * 128 + 128) + 2 * 128 * 512 + 512
                      + 128)
               + 2 * 128 + 128 * 1000 + 1000) == 1_058_536


# ---------------------------------------------------- names seen by the pruner


def test_default_prunable_leaves_are_kernels_and_embeddings(tiny):
  params = tiny[2]["params"]
  prunable = fj.trees.prunable_tree(params)
  chosen = {p for p, s in fj.trees.leaves_with_paths(prunable) if s}
  kernels = {f"block{i}/{name}/kernel" for i in range(TINY["num_layers"])
             for name in ("attn/query", "attn/key", "attn/value", "attn/out",
                          "fc1", "fc2")}
  embeddings = {"token_embed/embedding", "pos_embed/embedding"}
  # The default filter (ndim >= 2) takes the embedding tables too.
  assert chosen == kernels | {"head/kernel"} | embeddings
  assert len(chosen) == 6 * TINY["num_layers"] + 3
  # Everything else is a 1-D bias or LayerNorm scale/offset.
  for path, leaf in fj.trees.leaves_with_paths(params):
    if path not in chosen:
      assert leaf.ndim == 1 and path.rsplit("/", 1)[-1] in ("bias", "scale"), path
  # The untied head is its own (d_model, vocab) matrix.
  chex.assert_shape(params["head"]["kernel"],
                    (TINY["d_model"], TINY["vocab_size"]))
  chex.assert_shape(params["token_embed"]["embedding"],
                    (TINY["vocab_size"], TINY["d_model"]))
  # The filter the docstring gives keeps the embeddings dense.
  dense_embed = fj.trees.prunable_tree(
      params, lambda path, leaf: leaf.ndim >= 2 and "embed" not in path)
  assert {p for p, s in fj.trees.leaves_with_paths(dense_embed) if s} == (
      kernels | {"head/kernel"})


# --------------------------------------------------------- pruning end to end


def test_global_magnitude_prunes_exactly_and_trains(tiny):
  model, tokens, variables, _ = tiny
  params = variables["params"]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def loss_fn(p):
    logits = model.apply({"params": p}, inputs, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  tx = fj.global_magnitude(optax.adamw(1e-3), sparsity=0.5, every=1)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  losses = []
  for _ in range(26):
    params, state, loss = step(params, state)  # loss before this update
    losses.append(float(loss))
  # The one event (count 1) prunes half of the weights; training on the
  # repeated batch must still bring the loss below where it started.
  assert losses[-1] < losses[0] - 0.2, losses

  masks = fj.get_masks(state)
  mask_leaves = fj.trees.prunable_leaves(masks, masks)
  param_leaves = fj.trees.prunable_leaves(masks, params)
  assert len(mask_leaves) == 6 * TINY["num_layers"] + 3
  n = sum(m.size for m in mask_leaves)
  pruned = sum(int((~m).sum()) for m in mask_leaves)
  assert pruned == round(0.5 * n)
  for m, p in zip(mask_leaves, param_leaves):
    p = np.asarray(p)
    assert np.all(p[~np.asarray(m)] == 0.0)  # pruned weights exactly 0.0
  zeros = sum(int((np.asarray(p) == 0.0).sum()) for p in param_leaves)
  assert zeros == round(0.5 * n)  # and no kept weight landed on 0.0


# -------------------------------------------------------------- configuration


@pytest.mark.parametrize("field,value,match", [
    ("d_model", 15, "d_model must be a multiple of num_heads"),
    ("num_heads", 0, "num_heads must be an int >= 1"),
    ("num_layers", 0, "num_layers must be an int >= 1"),
    ("vocab_size", -3, "vocab_size must be an int >= 1"),
    ("max_len", 2.0, "max_len must be an int >= 1"),
    ("mlp_dim", 0, "mlp_dim must be an int >= 1"),
    ("d_model", True, "d_model must be an int >= 1"),
])
def test_bad_config_raises_at_construction(field, value, match):
  with pytest.raises(ValueError, match=match):
    models.GPT(**dict(TINY, **{field: value}))


def test_bad_tokens_raise(tiny):
  model, _, variables, _ = tiny
  with pytest.raises(ValueError, match="max_len=12"):
    jax.eval_shape(lambda: model.apply(variables, _tokens(seq=13)))
  with pytest.raises(ValueError, match="integer"):
    jax.eval_shape(lambda: model.apply(variables, jnp.zeros((1, 4))))


def test_named_config_and_image_registry_untouched():
  m = models.get_gpt("gpt_tiny", num_layers=12)
  assert isinstance(m, models.GPT)
  assert (m.d_model, m.num_heads, m.mlp_dim, m.vocab_size, m.max_len,
          m.num_layers) == (128, 4, 512, 1000, 64, 12)
  assert "gpt_tiny" in models.GPT_NAMES
  assert not set(models.GPT_NAMES) & set(models.MODEL_NAMES)
  with pytest.raises(ValueError, match="get_gpt"):
    models.get_model("gpt_tiny")
  with pytest.raises(ValueError, match="gpt_huge"):
    models.get_gpt("gpt_huge")
  with pytest.raises(ValueError, match="width: not a field"):
    models.get_gpt("gpt_tiny", width=2.0)
  with pytest.raises(ValueError, match="num_heads"):
    models.get_gpt("gpt_tiny", num_heads=3)


# ------------------------------------------------- UniPTS on a sequence model

ONE_BLOCK = dict(TINY, num_layers=1)
UNIPTS_TINY = dict(epochs=2, batch_size=8, population_size=4, generations=1,
                   num_parents=2, crossover_children=2, mutation_children=2)


@pytest.fixture(scope="module")
def unipts_gpt():
  """A one-block GPT, 8 int windows, UniPTS searched and uniform at 50 %;
  ``seen``: the dtypes of every input the model was called with."""
  model = models.GPT(**ONE_BLOCK)
  tokens = _tokens(key=4, batch=8)
  variables = _init(model, tokens[:2])
  seen = []

  def apply(v, x, train=False, **kw):
    seen.append(x.dtype)
    return model.apply(v, x, train=train, **kw)

  # The uniform run skips sparse training (epochs 0): compiling dominates.
  runs = {a: fj.post_training.prune(apply, variables, tokens, sparsity=0.5,
                                    method="unipts", allocation=a, seed=3,
                                    unipts_kw=dict(UNIPTS_TINY, epochs=e))
          for a, e in (("search", UNIPTS_TINY["epochs"]), ("uniform", 0))}
  return model, tokens, variables, seen, runs


def test_unipts_runs_on_gpt_with_int_inputs_and_dense_embeddings(unipts_gpt):
  model, tokens, variables, seen, runs = unipts_gpt
  assert seen and all(d == jnp.int32 for d in seen), set(seen)  # never cast
  one_shot = fj.post_training.prune(
      lambda v, x: model.apply(v, x), variables, tokens, sparsity=0.5,
      method="magnitude")
  flat0 = dict(fj.trees.leaves_with_paths(variables["params"]))
  logits = jax.jit(model.apply)
  for allocation, r in runs.items():
    # The prunable set is the one-shot methods': the 7 kernels, not the
    # embedding tables: no mask, no zero (sparse training updates them,
    # as every parameter; without it they come back bit-identical).
    kernels = {f"block0/{n}/kernel" for n in ("attn/query", "attn/key",
                                              "attn/value", "attn/out", "fc1",
                                              "fc2")} | {"head/kernel"}
    assert set(r.sparsities) == set(one_shot.report["order"]) == kernels
    assert sorted(r.report["dense"]) == sorted(one_shot.report["dense"]) == [
        "pos_embed/embedding", "token_embed/embedding"]
    flat = dict(fj.trees.leaves_with_paths(r.variables["params"]))
    masks = dict(fj.trees.leaves_with_paths(r.masks, is_leaf=lambda m: m is None))
    for path in r.report["dense"]:
      assert masks[path] is None and np.all(np.asarray(flat[path]) != 0)
      if allocation == "uniform":
        np.testing.assert_array_equal(flat[path], flat0[path])
    # Exact counts: the report's per-layer count is the zeros of the kernel,
    # round(p_l·n_l) of its target, and the mask's zeros.
    for path, layer in r.report["layers"].items():
      w = np.asarray(flat[path])
      assert layer["pruned"] == int(np.sum(w == 0)) == int(
          np.sum(~np.asarray(masks[path]))), (allocation, path)
      assert layer["pruned"] == round(layer["target"] * w.size)
      if allocation == "uniform":
        assert layer["pruned"] == round(0.5 * w.size)
    n = sum(layer["size"] for layer in r.report["layers"].values())
    assert n == sum(flat0[p].size for p in one_shot.report["order"])
    if allocation == "uniform":
      assert r.report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    # Accuracy is the agreement with the teacher over all n·T positions.
    student = np.argmax(logits(r.variables, tokens), -1)
    teacher = np.argmax(logits(variables, tokens), -1)
    assert r.report["accuracy"]["final"] == pytest.approx(
        float(np.mean(student == teacher)), abs=1e-6)
    assert r.report["accuracy"]["dense"] == 1.0
    assert len(r.report["train"]["epoch_loss"]) == (
        UNIPTS_TINY["epochs"] if allocation == "search" else 0)


def test_unipts_sequence_labels_and_filter_are_checked(unipts_gpt):
  model, tokens, variables, _, _ = unipts_gpt
  with pytest.raises(ValueError, match=r"calibration_y.*leading shape"):
    fj.unipts.run(model.apply, variables, tokens, sparsity=0.5,
                  calibration_y=np.zeros(tokens.shape[0], np.int32),
                  search=False, epochs=0)
  # A filter selecting the (gathered, not multiplied) embedding table: the
  # one-shot methods' error, naming it.
  with pytest.raises(ValueError,
                     match=r"filter_fn: .*token_embed/embedding.* not used"):
    fj.unipts.run(model.apply, variables, tokens, sparsity=0.5,
                  filter_fn=lambda p, x: x.ndim == 2, search=False, epochs=0)


def test_sequence_distillation_loss_equals_a_per_position_reference():
  rng = np.random.default_rng(0)
  b, t, v, temp, tau = 3, 5, 7, 4.0, 7.92
  student = rng.normal(size=(b, t, v)).astype(np.float32) * 3
  teacher = rng.normal(size=(b, t, v)).astype(np.float32) * 3
  total = 0.0
  for i in range(b):
    for j in range(t):
      zt = teacher[i, j].astype(np.float64) / temp
      p = np.exp(zt - zt.max())
      p /= p.sum()
      zs = student[i, j].astype(np.float64)
      log_q = zs - zs.max() - np.log(np.sum(np.exp(zs - zs.max())))
      total += np.sum(p * (np.log(p) - log_q / tau))
  reference = temp ** 2 * total / (b * t)  # every position is an example
  got = fj.unipts.distillation_loss(jnp.asarray(student), jnp.asarray(teacher),
                                    tau, temperature=temp)
  np.testing.assert_allclose(float(got), reference, rtol=1e-5)
  flat = fj.unipts.distillation_loss(jnp.asarray(student.reshape(-1, v)),
                                     jnp.asarray(teacher.reshape(-1, v)), tau,
                                     temperature=temp)
  np.testing.assert_allclose(float(got), float(flat), rtol=1e-6)
