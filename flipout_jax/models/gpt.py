"""A GPT-style decoder-only language model (Radford et al. 2018/2019).

    model = GPT(vocab_size=1000, d_model=128, num_heads=4, num_layers=4,
                mlp_dim=512, max_len=64)
    variables = model.init(key, tokens)               # int32 (batch, seq)
    logits = model.apply(variables, tokens, train=True)  # f32 (batch, seq, V)

Architecture (pre-LayerNorm, GPT-2 style, no dropout):

    x = token_embed(tokens) + pos_embed(0..seq-1)
    num_layers x:  x = x + attn(ln1(x));  x = x + mlp(ln2(x))
    logits = head(ln_f(x))

``attn`` is causal multi-head self-attention with four separate Dense layers
``query``/``key``/``value``/``out`` (each ``d_model -> d_model``, kernel and
bias), ``mlp`` is ``fc1`` (``d_model -> mlp_dim``), exact GELU, ``fc2``
(``mlp_dim -> d_model``). The LM head is its own Dense layer (kernel and
bias): it is *not* tied to the token embedding, so the head kernel is an
ordinary weight matrix that is pruned (or not) independently of the
embedding table.

What the library prunes by default (float leaves with ``ndim >= 2``,
:func:`flipout_jax.trees.default_filter`): the six kernels of every block,
the head kernel *and the two embedding tables* (``token_embed/embedding``,
``(vocab_size, d_model)``, and ``pos_embed/embedding``, ``(max_len,
d_model)``), i.e. ``6·num_layers + 3`` leaves. Biases and LayerNorm
scales/offsets (ndim 1) stay dense. To keep the embeddings dense, pass e.g.
``filter_fn=lambda path, leaf: leaf.ndim >= 2 and "embed" not in path``.

Parameters: ``V·d + T·d`` (embeddings) ``+ L·(4d + 4(d² + d) + 2dm + m + d)``
(blocks) ``+ 2d`` (final LayerNorm) ``+ d·V + V`` (head), with ``V =
vocab_size``, ``T = max_len``, ``d = d_model``, ``m = mlp_dim``, ``L =
num_layers``.

This model does not fit the image models' ``get_model(name, num_classes=,
width=)`` contract (token inputs, a vocabulary instead of classes, no width
multiplier), so it is not in that registry: build it directly or by a named
config with :func:`get_gpt` (``GPT_CONFIGS``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from flipout_jax.models.lenet import Widths, check_layer_widths

_INIT = nn.initializers.normal(stddev=0.02)  # GPT-2's weight init.


def _check_int(value: Any, name: str, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")
  return value


def check_gpt_config(vocab_size: int, d_model: int, num_heads: int,
                     num_layers: int, mlp_dim: int | None,
                     max_len: int) -> int:
  """Validates a GPT's hyperparameters.

  Args:
    vocab_size: number of token ids, an int >= 1.
    d_model: width of the residual stream, an int >= 1 divisible by
      ``num_heads``.
    num_heads: attention heads, an int >= 1.
    num_layers: number of blocks, an int >= 1.
    mlp_dim: hidden units of the MLP, an int >= 1, or None for
      ``4·d_model``.
    max_len: longest sequence (rows of the position table), an int >= 1.

  Returns:
    The MLP width in force (``mlp_dim`` or ``4·d_model``).

  Raises:
    ValueError: naming the argument and its valid range.
  """
  _check_int(vocab_size, "vocab_size", 1)
  _check_int(d_model, "d_model", 1)
  _check_int(num_heads, "num_heads", 1)
  _check_int(num_layers, "num_layers", 1)
  _check_int(max_len, "max_len", 1)
  if d_model % num_heads:
    raise ValueError(
        f"d_model must be a multiple of num_heads, got d_model={d_model} "
        f"and num_heads={num_heads}")
  if mlp_dim is None:
    return 4 * d_model
  return _check_int(mlp_dim, "mlp_dim", 1)


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention in which position t sees positions <= t only.

  Separate ``query``/``key``/``value``/``out`` Dense layers (``d_model ->
  num_heads·head_dim -> d_model``, with bias); the heads split the last
  axis. ``head_dim`` None means ``d_model // num_heads``; ``value_dim``
  (the per-head size of the values, None: ``head_dim``) may be smaller in a
  compacted block, which also keeps the query/key head size and may have
  fewer heads.
  """

  d_model: int
  num_heads: int
  head_dim: int | None = None
  value_dim: int | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    batch, seq, _ = x.shape
    head_dim = (self.d_model // self.num_heads if self.head_dim is None
                else self.head_dim)
    value_dim = head_dim if self.value_dim is None else self.value_dim

    def heads(name, size):
      y = nn.Dense(self.num_heads * size, kernel_init=_INIT, name=name)(x)
      return y.reshape(batch, seq, self.num_heads, size)

    q, k = heads("query", head_dim), heads("key", head_dim)
    v = heads("value", value_dim)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((seq, seq), jnp.bool_))
    # -inf, not a large negative number: exp gives exactly 0 at the future
    # positions, so they cannot leak into the past even by a rounding. The
    # diagonal is always visible, so no row is all -inf.
    logits = jnp.where(causal, logits, -jnp.inf)
    weights = nn.softmax(logits, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    y = y.reshape(batch, seq, self.num_heads * value_dim)
    return nn.Dense(self.d_model, kernel_init=_INIT, name="out")(y)


class Block(nn.Module):
  """One pre-LayerNorm transformer block: attention, then a GELU MLP."""

  d_model: int
  num_heads: int
  mlp_dim: int
  head_dim: int | None = None
  value_dim: int | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x + CausalSelfAttention(self.d_model, self.num_heads, self.head_dim,
                                self.value_dim, name="attn")(
        nn.LayerNorm(name="ln1")(x))
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.Dense(self.mlp_dim, kernel_init=_INIT, name="fc1")(h)
    h = nn.gelu(h, approximate=False)
    return x + nn.Dense(self.d_model, kernel_init=_INIT, name="fc2")(h)


class GPT(nn.Module):
  """GPT-style decoder: int32 tokens ``(batch, seq)`` -> float32 logits
  ``(batch, seq, vocab_size)``; see the module docstring.

  The arguments are checked when the module is constructed
  (:func:`check_gpt_config`); a sequence longer than ``max_len`` or
  non-integer tokens raise when it is called.

  Attributes:
    vocab_size: number of token ids (rows of the embedding, head outputs).
    d_model: width of the residual stream, divisible by ``num_heads``.
    num_heads: attention heads per block.
    num_layers: number of blocks (the depth), ``>= 1``.
    mlp_dim: hidden units of each MLP; None means ``4·d_model``.
    max_len: longest sequence the position table covers.
    layer_widths: optional per-layer widths (what
      :func:`flipout_jax.compact` returns as ``widths``):
      ``"block{i}/attn/query"`` (and an equal ``key``) is the number of
      heads of block ``i`` times ``d_model // num_heads`` (the query/key
      head size is kept), ``"block{i}/attn/value"`` the heads times the
      value size per head, ``"block{i}/fc1"`` the MLP width; the residual
      stream, the embeddings and the head keep ``d_model`` and
      ``vocab_size``.
  """

  vocab_size: int = 1000
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 4
  mlp_dim: int | None = None
  max_len: int = 64
  layer_widths: Mapping[str, int] | None = None

  def __post_init__(self):
    check_gpt_config(self.vocab_size, self.d_model, self.num_heads,
                     self.num_layers, self.mlp_dim, self.max_len)
    check_layer_widths(self.layer_widths)
    super().__post_init__()

  @property
  def hidden_dim(self) -> int:
    """The MLP width in force (``mlp_dim`` or ``4·d_model``)."""
    return 4 * self.d_model if self.mlp_dim is None else self.mlp_dim

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Logits of the next token at every position.

    Args:
      tokens: integer token ids in ``[0, vocab_size)``, shape ``(batch,
        seq)`` with ``1 <= seq <= max_len``.
      train: accepted for the same call as the other models
        (``model.apply(variables, x, train=...)``); the model is
        deterministic (no dropout), so it changes nothing.

    Returns:
      float32 logits, shape ``(batch, seq, vocab_size)``.

    Raises:
      ValueError: for tokens that are not a 2-D integer array or whose
        sequence is longer than ``max_len``.
    """
    del train  # No dropout: deterministic in both modes.
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f"tokens must be an integer array of shape (batch, seq), got "
          f"shape {tokens.shape} and dtype {tokens.dtype}")
    seq = tokens.shape[1]
    if not 1 <= seq <= self.max_len:
      raise ValueError(
          f"tokens: sequence length must be in [1, max_len={self.max_len}], "
          f"got {seq}")
    w = Widths(self.layer_widths)
    d = self.d_model
    residual = "the residual stream"
    x = nn.Embed(self.vocab_size, w("token_embed", d, residual),
                 embedding_init=_INIT, name="token_embed")(tokens)
    positions = jnp.arange(seq)[None, :]
    x = x + nn.Embed(self.max_len, w("pos_embed", d, residual),
                     embedding_init=_INIT, name="pos_embed")(positions)
    head_dim = d // self.num_heads
    for i in range(self.num_layers):
      attn = f"block{i}/attn/"
      width = w(attn + "query", d)
      if width % head_dim:
        raise ValueError(
            f"layer_widths[{attn + 'query'!r}]: must be a multiple of the "
            f"head size {head_dim}, got {width}")
      w(attn + "key", width, f"the width of {attn}query")
      heads = width // head_dim
      values = w(attn + "value", width)
      if values % heads:
        raise ValueError(
            f"layer_widths[{attn + 'value'!r}]: must be a multiple of the "
            f"{heads} heads of {attn}query, got {values}")
      w(attn + "out", d, residual)
      w(f"block{i}/fc2", d, residual)
      x = Block(d, heads, w(f"block{i}/fc1", self.hidden_dim),
                head_dim=head_dim, value_dim=values // heads,
                name=f"block{i}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    logits = nn.Dense(w("head", self.vocab_size, "the vocabulary"),
                      kernel_init=_INIT, name="head")(x)
    w.done()
    return logits.astype(jnp.float32)


# Named configurations. gpt_tiny is the model of the transformer benchmarks
# (benchmarks/compile.py: d_model 128, 4 heads, MLP 512, vocab 1000,
# sequences of 64) at 4 blocks; pass num_layers= to change the depth.
GPT_CONFIGS: dict[str, dict[str, int]] = {
    "gpt_tiny": dict(vocab_size=1000, d_model=128, num_heads=4, num_layers=4,
                     mlp_dim=512, max_len=64),
}

GPT_NAMES: tuple[str, ...] = tuple(GPT_CONFIGS)


def get_gpt(name: str = "gpt_tiny", **overrides: Any) -> GPT:
  """The GPT of the named config ``name`` (one of ``GPT_NAMES``).

  Args:
    name: a key of ``GPT_CONFIGS``.
    **overrides: fields of :class:`GPT` to change (e.g. ``num_layers=12``,
      ``vocab_size=256``).

  Returns:
    The :class:`GPT` module.

  Raises:
    ValueError: for an unknown ``name`` or field, or an invalid value
      (:func:`check_gpt_config`).
  """
  if name not in GPT_CONFIGS:
    raise ValueError(f"Unknown GPT config {name!r}; valid names are: "
                     f"{', '.join(GPT_NAMES)}")
  fields = ("vocab_size", "d_model", "num_heads", "num_layers", "mlp_dim",
            "max_len", "layer_widths")
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"{unknown[0]}: not a field of GPT; valid fields are "
                     f"{', '.join(fields)}")
  return GPT(**{**GPT_CONFIGS[name], **overrides})
