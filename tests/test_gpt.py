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
