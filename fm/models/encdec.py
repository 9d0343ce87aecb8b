"""T5-style encoder-decoder: shared embeddings, rotary positions in self-attention (or T5's
relative attention bias: positions='relative').

The encoder is the decoder's block stack without the causal mask; each decoder layer adds
cross-attention to the encoder output. Dimensions: B batch, S encoder length, L decoder length,
D model dim, V vocab. `Model(model_cfg).apply(params, inputs_BS, decoder_in_BL, input_seg_BS,
target_seg_BL) -> logits_BLV`; segment ids keep packed examples apart (0 = padding).
Layer scan and remat options of the decoder's Config are not used here.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from fm import ConfigError
from fm.models import decoder, layers
from fm.sharding import constrain

Config = decoder.Config
# The published-architecture fields these blocks read, with the choices they compute (T5 1.1:
# relative positions, GEGLU, unscaled attention logits, an untied head).
CHOICES = {'positions': ('rope', 'relative'), 'mlp': tuple(layers.GATED)}
READS = ('relative_buckets', 'relative_max_distance', 'attention_scale', *CHOICES)
# The decoder's other published-architecture fields, which these blocks do not read: they
# compute the defaults.
DECODER_ONLY = {k: decoder.DEFAULTS[k] for k in decoder.ARCHITECTURE if k not in READS}
VARIANTS = {
  **{k: decoder.VARIANTS[k] for k in ('tiny', 'mini', 'small')},
  # T5 1.1 base shape (gated MLP), for planning.
  't5-base': dict(
    num_layers=12,
    d_model=768,
    num_heads=12,
    num_kv_heads=12,
    head_dim=64,
    mlp_dim=2048,
    max_len=512,
    vocab_size=32128,
  ),
}


POOL = 'mean'  # A classifier reads the encoder's states, each of which has seen the whole text.
SEQ2SEQ = 'encdec'  # The encoder reads the source; the decoder writes the target.


def inputs(model_cfg: Config, tokens_BL, segment_ids_BL=None, positions_BL=None) -> tuple:
  """`Model.apply`'s arguments that read `tokens_BL` as one text: the encoder alone for a
  classifier (model_cfg.num_classes > 0), else the same text on both sides."""
  del positions_BL  # Each side counts its own positions.
  if model_cfg.num_classes:
    return tokens_BL, None, segment_ids_BL
  return tokens_BL, tokens_BL, segment_ids_BL, segment_ids_BL


def param_count(model_cfg: Config) -> dict[str, int]:
  """num_layers encoder blocks, num_layers decoder blocks (with cross-attention), tied embed."""
  c = model_cfg
  D, K = c.d_model, c.head_dim
  attn = D * K * (2 * c.num_heads + 2 * c.num_kv_heads)
  block = attn + 3 * D * c.mlp_dim + 2 * D
  layers_total = c.num_layers * (2 * block + attn + D)
  layers_total += 2 * c.relative_buckets * c.num_heads * (c.positions == 'relative')
  embed = c.vocab_size * D * (1 if c.tie_embeddings else 2)
  return {
    'total': layers_total + embed + 2 * D,
    'non_embedding': layers_total + 2 * D,
    'embedding': embed,
  }


def _matmuls(c: Config, input_len: float, target_len: float) -> float:
  """Matmul params applied per row: each encoder token passes the encoder's layers and, when
  there is a decoder target, every decoder layer's cross-attention keys and values; each
  decoder token the decoder's layers (self-attention, cross-attention's queries and outputs,
  MLP) and the output projection. Without a target (a classifier) the encoder runs alone."""
  D, K, H = c.d_model, c.head_dim, c.num_heads
  mlp = (3 if c.mlp in layers.GATED else 2) * D * c.mlp_dim
  self_attn = D * K * (2 * H + 2 * c.num_kv_heads)
  encoder = c.num_layers * (self_attn + mlp + 2 * D * K * c.num_kv_heads * (target_len > 0))
  dec = c.num_layers * (self_attn + 2 * D * K * H + mlp) + c.vocab_size * D
  return input_len * encoder + target_len * dec


def _scores(c: Config, input_len: float, target_len: float) -> float:
  """QK^T and AV of encoder self-, decoder self- and cross-attention, per row (as
  decoder.flops_per_token counts them: the causal half fully)."""
  S, T = input_len, target_len
  return c.num_layers * 2 * c.num_heads * c.head_dim * (S * S + T * T + T * S)


def flops_per_row(model_cfg: Config, input_len: int, target_len: int) -> float:
  """Training FLOPs (forward + backward) of one row whose encoder reads `input_len` tokens and
  whose decoder writes `target_len` (0: a classifier, the encoder alone): 6 x (matmul params
  per token through them + scores)."""
  return 6.0 * (
    _matmuls(model_cfg, input_len, target_len) + _scores(model_cfg, input_len, target_len)
  )


# T5's default corruption (15% noise in spans of mean length 3): per text token, the encoder
# reads about 0.9 tokens and the decoder writes about 0.2.
T5_SHARES = (0.9, 0.2)


def flops_per_token(model_cfg: Config, seq_len: int) -> float:
  """Per text token of a `seq_len`-token window under T5's default corruption. An objective
  with other shapes states them (its `row_lengths`) and train.step_flops counts its rows
  with `flops_per_row` instead."""
  return 6.0 * (_matmuls(model_cfg, *T5_SHARES) + seq_len * _scores(model_cfg, *T5_SHARES))


class DecoderBlock(nn.Module):
  model_cfg: Config
  decode: bool = False  # Self-attention with a KV cache (see layers.Attention).
  relative: nn.Module | None = None  # The decoder stack's layers.RelativeBias.

  @nn.compact
  def __call__(self, y_BLD, positions_BL, self_mask_B1LL, enc_BSD, cross_mask_B1LS):
    c = self.model_cfg
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    attn_cfg = layers.AttentionConfig(
      c.num_heads,
      c.num_kv_heads,
      c.head_dim,
      c.rope_theta,
      c.attention_impl,
      rope=c.positions == 'rope',
      scale=c.attention_scale,
    )
    self_attn = layers.Attention(
      attn_cfg, dt, pdt, c.lora, self.decode, self.relative, name='self_attn'
    )
    h = layers.RMSNorm(c.norm_eps, dt, pdt, name='self_norm')(y_BLD)
    y_BLD = y_BLD + self_attn(h, positions_BL, self_mask_B1LL)
    h = layers.RMSNorm(c.norm_eps, dt, pdt, name='cross_norm')(y_BLD)
    y_BLD = y_BLD + layers.Attention(attn_cfg, dt, pdt, c.lora, name='cross_attn')(
      h, positions_BL, cross_mask_B1LS, kv_BSD=enc_BSD
    )
    h = layers.RMSNorm(c.norm_eps, dt, pdt, name='mlp_norm')(y_BLD)
    y_BLD = y_BLD + layers.MLP(c.mlp_dim, dt, pdt, c.lora, c.mlp, name='mlp')(h)
    return constrain(y_BLD, layers.BLD)


class Model(nn.Module):
  model_cfg: Config
  decode: bool = False  # Generation with a KV cache in the decoder: see fm/decoding.py.

  @nn.compact
  def __call__(
    self,
    inputs_BS,
    decoder_in_BL=None,
    input_seg_BS=None,
    target_seg_BL=None,
    encoded_BSD=None,
    encode_only=False,
  ):
    """Decoder logits (B, L, V); with model_cfg.num_classes > 0, class logits (B, C) from the pooled
    encoder output (the decoder is not used: call with the inputs alone).

    For generation: `encode_only` returns the encoder output; passing it back as `encoded_BSD`
    skips the encoder. With `decode`, the decoder tokens are appended to the KV cache."""
    c = dataclasses.replace(self.model_cfg, scan_layers=False)  # Blocks return plain activations.
    for name, default in DECODER_ONLY.items():
      if getattr(c, name) != default:
        raise ConfigError(
          f'config.model.{name}={getattr(c, name)!r} is a decoder option the encoder-decoder does '
          f'not compute; leave it at {default!r}.'
        )
    for name, choices in CHOICES.items():
      if getattr(c, name) not in choices:
        raise ConfigError(
          f'config.model.{name}={getattr(c, name)!r} is not computed by the encoder-decoder; '
          f'choose one of: {", ".join(choices)}.'
        )
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    input_seg_BS = jnp.ones_like(inputs_BS) if input_seg_BS is None else input_seg_BS
    positions = lambda t: jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape)
    embed = layers.Embed(c.vocab_size, c.d_model, dt, pdt, name='embed')
    relative = lambda bidirectional, name: (
      layers.RelativeBias(
        c.num_heads, c.relative_buckets, c.relative_max_distance, bidirectional, pdt, name=name
      )
      if c.positions == 'relative'
      else None
    )

    enc_BSD = encoded_BSD
    if enc_BSD is None:
      x_BSD = constrain(embed(inputs_BS), layers.BLD)
      enc_mask = layers.attention_mask(input_seg_BS, causal=False)
      encoder_relative = relative(True, 'encoder_relative')
      for i in range(c.num_layers):
        x_BSD = decoder.Block(c, relative=encoder_relative, name=f'encoder_{i}')(
          x_BSD, positions(inputs_BS), enc_mask
        )
      enc_BSD = layers.RMSNorm(c.norm_eps, dt, pdt, name='encoder_norm')(x_BSD)
    if c.num_classes:
      return layers.ClassifierHead(c.num_classes, c.pool, pdt, name='head')(enc_BSD, input_seg_BS)
    if encode_only:
      return enc_BSD

    target_seg_BL = jnp.ones_like(decoder_in_BL) if target_seg_BL is None else target_seg_BL
    y_BLD = constrain(embed(decoder_in_BL), layers.BLD)
    self_mask = layers.attention_mask(target_seg_BL, causal=True)
    cross_mask = (target_seg_BL[:, :, None] == input_seg_BS[:, None, :])[:, None]
    dec_positions = positions(decoder_in_BL)
    if self.decode:  # The cache builds the self-attention mask; positions count from the cache.
      self_mask = None
      cross_mask = ((target_seg_BL > 0)[:, :, None] & (input_seg_BS > 0)[:, None, :])[:, None]
      creating = not self.has_variable('cache', 'position')
      position = self.variable('cache', 'position', lambda: jnp.zeros((), jnp.int32))
      start = position.value
      if not creating:
        position.value = start + decoder_in_BL.shape[1]
      dec_positions = jnp.broadcast_to(
        start + jnp.arange(decoder_in_BL.shape[1]), decoder_in_BL.shape
      )
    decoder_relative = relative(False, 'decoder_relative')
    for i in range(c.num_layers):
      y_BLD = DecoderBlock(c, self.decode, decoder_relative, name=f'decoder_{i}')(
        y_BLD, dec_positions, self_mask, enc_BSD, cross_mask
      )
    y_BLD = layers.RMSNorm(c.norm_eps, dt, pdt, name='decoder_norm')(y_BLD)
    if c.tie_embeddings:  # Scaled as T5's tied head is.
      logits_BLV = embed.attend(y_BLD) * (c.d_model**-0.5 if c.scale_tied_logits else 1.0)
    else:
      logits_BLV = layers.lm_head(self, y_BLD, c.vocab_size, dt, pdt)
    return constrain(logits_BLV.astype(jnp.float32), ('act_batch', 'act_length', 'act_vocab'))
