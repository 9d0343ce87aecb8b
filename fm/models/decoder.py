"""Llama-style decoder-only transformer: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Dimensions: B batch, L length, D model dim, V vocab (see layers.py for the rest).
`Model(model_cfg).apply(params, tokens_BL, segment_ids_BL, positions_BL[, prefix_BL]) -> logits_BLV`.
Packed documents (segment ids) never attend to each other; a prefix (prefix LM) attends
bidirectionally within itself. `Model(model_cfg, causal=False)` is the encoder (see encoder.py).
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from fm import ConfigError
from fm.models import layers
from fm.sharding import constrain

VARIANTS = {
  # Unit tests and smoke runs.
  'tiny': dict(
    num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=192, max_len=512
  ),
  # About 6M params with a 4k vocab: the CPU default, trains to a useful loss in minutes.
  'mini': dict(
    num_layers=4, d_model=256, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=768, max_len=1024
  ),
  # About 20M params with a 4k vocab.
  'small': dict(
    num_layers=6, d_model=512, num_heads=8, num_kv_heads=8, head_dim=64, mlp_dim=1408, max_len=1024
  ),
  # Published shapes (Llama 3.2 1B, Llama 3.1 8B), for planning on pods.
  'llama-1b': dict(
    num_layers=16,
    d_model=2048,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
    max_len=8192,
    vocab_size=128256,
    rope_theta=500000.0,
    tie_embeddings=True,
  ),
  'llama-8b': dict(
    num_layers=32,
    d_model=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    mlp_dim=14336,
    max_len=8192,
    vocab_size=128256,
    rope_theta=500000.0,
    tie_embeddings=False,
  ),
}


POOL = 'last'  # The last real token has read the whole text.
POSITIONS = ('rope', 'learned', 'relative')  # relative: T5's bias (the encoder-decoder's).
SEQ2SEQ = 'prefix_lm'  # Reads the source as a bidirectional prefix, then writes the target.


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int = 256
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 256
  max_len: int = 512
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  scale_tied_logits: bool = True  # Tied logits times d_model**-0.5 (published models: False).
  qkv_bias: bool = False  # Biases on the query, key and value projections (Qwen2).
  # Llama 3.1 RoPE scaling: (factor, low_freq_factor, high_freq_factor, original_max_len).
  rope_scaling: tuple[float, ...] = ()
  norm: str = 'rms'  # 'rms' (RMSNorm) or 'layer' (LayerNorm with a bias: GPT-2).
  mlp: str = 'swiglu'  # 'swiglu', 'geglu' (T5 1.1), or 'gelu_tanh' / 'gelu': up, GELU, down
  # with biases (GPT-2, BERT).
  positions: str = 'rope'  # 'rope', 'learned': an embedding per position added (GPT-2), or
  # 'relative': T5's bias per head and offset bucket on self-attention's logits (encoder-decoder).
  relative_buckets: int = 32  # With positions='relative': T5's buckets and largest distance.
  relative_max_distance: int = 128
  attention_scale: float = 0.0  # Of the query-key logits; 0: head_dim**-0.5 (T5: 1.0).
  bias: bool = False  # Biases on the query, key, value and output projections (GPT-2).
  norm_position: str = 'pre'  # 'pre' (norm, sublayer, add) or 'post' (add, then norm: BERT).
  embed_norm: bool = False  # A norm after the embeddings (BERT).
  token_types: int = 0  # > 0: a token-type embedding table; every token is type 0 (BERT).
  mlm_head: bool = False  # Dense, GELU and norm before the tied logits, plus a bias (BERT).
  norm_eps: float = 1e-6
  dtype: str = 'float32'  # Compute dtype.
  param_dtype: str = 'float32'  # Storage dtype of params (and so of the optimizer state).
  scan_layers: bool = False  # nn.scan over layers: params stacked on a `layers` axis.
  remat: str = 'none'  # One of layers.REMAT_POLICIES.
  attention_impl: str = 'xla'  # jax.nn.dot_product_attention implementation: xla or cudnn.
  num_classes: int = 0  # > 0: a classification head on pooled states replaces the LM head.
  pool: str = 'last'  # How the head pools: one of layers.POOLS.
  lora_rank: int = 0  # > 0: LoRA adapters of this rank on `lora_targets`.
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = layers.LoRA.targets

  def __post_init__(self):
    for name in ('rope_scaling', 'lora_targets'):  # Tuples, also when read back from JSON.
      object.__setattr__(self, name, tuple(getattr(self, name)))
    layers.check_choices(
      self,
      {
        'norm': tuple(layers.NORMS),
        'mlp': layers.MLPS,
        'positions': POSITIONS,
        'norm_position': ('pre', 'post'),
      },
    )

  @property
  def lora(self) -> layers.LoRA | None:
    return (
      layers.LoRA(self.lora_rank, self.lora_alpha, tuple(self.lora_targets))
      if (self.lora_rank)
      else None
    )


# Fields that published architectures set (fm/convert); their defaults are fm's own models.
ARCHITECTURE = (
  'norm',
  'mlp',
  'positions',
  'bias',
  'qkv_bias',
  'rope_scaling',
  'norm_position',
  'embed_norm',
  'token_types',
  'mlm_head',
  'relative_buckets',
  'relative_max_distance',
  'attention_scale',
)
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}


def inputs(model_cfg: Config, tokens_BL, segment_ids_BL=None, positions_BL=None) -> tuple:
  """`Model.apply`'s arguments that read `tokens_BL` as one text (by default a single document)."""
  del model_cfg  # The same for every size.
  if segment_ids_BL is None:
    segment_ids_BL = jnp.ones_like(tokens_BL)
  if positions_BL is None:
    positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
  return tokens_BL, segment_ids_BL, positions_BL


def param_count(model_cfg: Config) -> dict[str, int]:
  """Parameter counts from the shapes alone (no init)."""
  c = model_cfg
  D, F, K = c.d_model, c.mlp_dim, c.head_dim
  attn = D * K * (2 * c.num_heads + 2 * c.num_kv_heads)
  attn += K * (c.num_heads + 2 * c.num_kv_heads) * (c.qkv_bias or c.bias) + D * c.bias
  mlp = 3 * D * F if c.mlp in layers.GATED else 2 * D * F + F + D
  norm = D * (2 if c.norm == 'layer' else 1)
  block = attn + mlp + 2 * norm
  embed = c.vocab_size * D * (1 if c.tie_embeddings else 2)
  embed += (c.max_len * (c.positions == 'learned') + c.token_types) * D
  rest = norm * ((c.norm_position == 'pre') + c.embed_norm)
  rest += (D * D + D + norm + c.vocab_size) * c.mlm_head
  return {
    'total': c.num_layers * block + embed + rest,
    'non_embedding': c.num_layers * block + rest,
    'embedding': embed,
  }


def flops_per_token(model_cfg: Config, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward): 6 x matmul params + attention scores. A
  classifier (num_classes > 0) has no output projection: its head reads one pooled state per row
  (num_classes x d_model, left out like the norms)."""
  D, K, H = model_cfg.d_model, model_cfg.head_dim, model_cfg.num_heads
  mlp = (3 if model_cfg.mlp in layers.GATED else 2) * D * model_cfg.mlp_dim
  matmul = model_cfg.num_layers * (D * K * (2 * H + 2 * model_cfg.num_kv_heads) + mlp)
  if not model_cfg.num_classes:  # Output projection (and BERT's transform before it).
    matmul += model_cfg.vocab_size * D + model_cfg.mlm_head * D * D
  attention = model_cfg.num_layers * 2 * H * K * seq_len  # QK^T and AV, causal half counted fully.
  return 6.0 * matmul + 6.0 * attention


class Block(nn.Module):
  model_cfg: Config
  decode: bool = False  # Self-attention with a KV cache (see layers.Attention).
  relative: nn.Module | None = None  # The stack's layers.RelativeBias (positions='relative').

  @nn.compact
  def __call__(self, x_BLD, positions_BL, mask_B1LS):
    c = self.model_cfg
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    attn_cfg = layers.AttentionConfig(
      c.num_heads,
      c.num_kv_heads,
      c.head_dim,
      c.rope_theta,
      c.attention_impl,
      c.qkv_bias or c.bias,
      tuple(c.rope_scaling),
      c.positions == 'rope',
      c.bias,
      c.attention_scale,
    )
    norm = lambda name: layers.NORMS[c.norm](c.norm_eps, dt, pdt, name=name)
    attn = layers.Attention(attn_cfg, dt, pdt, c.lora, self.decode, self.relative, name='attn')
    mlp = layers.MLP(c.mlp_dim, dt, pdt, c.lora, c.mlp, name='mlp')
    if c.norm_position == 'post':
      x_BLD = norm('attn_norm')(x_BLD + attn(x_BLD, positions_BL, mask_B1LS))
      x_BLD = norm('mlp_norm')(x_BLD + mlp(x_BLD))
    else:
      x_BLD = x_BLD + attn(norm('attn_norm')(x_BLD), positions_BL, mask_B1LS)
      x_BLD = x_BLD + mlp(norm('mlp_norm')(x_BLD))
    x_BLD = constrain(x_BLD, layers.BLD)
    return (x_BLD, None) if c.scan_layers else x_BLD


class Model(nn.Module):
  model_cfg: Config
  causal: bool = True
  decode: bool = False  # Generation with a KV cache: see fm/decoding.py.

  @nn.compact
  def __call__(
    self, tokens_BL, segment_ids_BL=None, positions_BL=None, prefix_BL=None, hidden=False
  ):
    """Logits for every position, or (model_cfg.num_classes > 0) class logits (B, C) from the pooled
    final states. `prefix_BL` (bool) marks a prefix that attends bidirectionally within itself
    (prefix LM); the rest stays causal. With `decode`, the tokens are appended to the KV cache
    (segment id 0 marks padding) and attend to everything cached before them. With `hidden`,
    the logits' parts instead: (final states x_BLD, output projection w_VD, scale), logits being
    x_BLD @ w_VD.T * scale, for a loss that never holds all of them at once."""
    c = self.model_cfg
    if c.positions == 'relative':
      raise ConfigError(
        "config.model.positions='relative' (T5's relative attention bias) is computed by the "
        "encoder-decoder (model.name='encdec'); a decoder or encoder takes rope or learned."
      )
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones_like(tokens_BL)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    mask_B1LS = layers.attention_mask(segment_ids_BL, self.causal, prefix_BL)
    if self.decode:  # The cache builds its own mask; padding is marked by position -1.
      positions_BL = jnp.where(segment_ids_BL > 0, positions_BL, -1)
      mask_B1LS = (
        None if prefix_BL is None else (prefix_BL[:, :, None] & prefix_BL[:, None, :])[:, None]
      )

    embed = layers.Embed(c.vocab_size, c.d_model, dt, pdt, name='embed')
    x_BLD = embed(tokens_BL)
    table = lambda name, rows: layers.param_with_axes(
      self, name, nn.initializers.normal(0.02), (rows, c.d_model), (None, 'embed'), pdt
    ).astype(dt)
    if c.positions == 'learned':
      x_BLD = x_BLD + jnp.take(table('pos_embed', c.max_len), jnp.maximum(positions_BL, 0), axis=0)
    if c.token_types:  # Every token is of type 0.
      x_BLD = x_BLD + table('type_embed', c.token_types)[0][None, None]
    if c.embed_norm:
      x_BLD = layers.NORMS[c.norm](c.norm_eps, dt, pdt, name='embed_norm')(x_BLD)
    x_BLD = constrain(x_BLD, layers.BLD)

    block = Block
    if c.remat != 'none':
      block = nn.remat(Block, policy=layers.REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    if c.scan_layers:
      x_BLD, _ = nn.scan(
        block,
        variable_axes={'params': 0, 'cache': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=c.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )(c, self.decode, name='layers')(x_BLD, positions_BL, mask_B1LS)
    else:
      for i in range(c.num_layers):
        x_BLD = block(c, self.decode, name=f'layer_{i}')(x_BLD, positions_BL, mask_B1LS)

    if c.norm_position == 'pre':
      x_BLD = layers.NORMS[c.norm](c.norm_eps, dt, pdt, name='final_norm')(x_BLD)
    if c.num_classes:
      return layers.ClassifierHead(c.num_classes, c.pool, pdt, name='head')(x_BLD, segment_ids_BL)
    if hidden:
      if c.mlm_head:
        raise ValueError('hidden=True: an MLM head adds a bias and a transform to the logits.')
      if c.tie_embeddings:
        scale = c.d_model**-0.5 if c.scale_tied_logits else 1.0
        return x_BLD, embed.embedding_VD.astype(dt), scale
      w_DV = layers.lm_head_kernel(self, c.d_model, c.vocab_size, pdt)
      return x_BLD, w_DV.astype(dt).T, 1.0
    if c.mlm_head:
      x_BLD = layers.MLMTransform(c.norm, c.norm_eps, c.mlp, dt, pdt, name='mlm')(x_BLD)
    if c.tie_embeddings:
      # Scaled so tied logits start near unit variance like an untied head.
      logits_BLV = embed.attend(x_BLD) * (c.d_model**-0.5 if c.scale_tied_logits else 1.0)
      if c.mlm_head:
        logits_BLV = (
          logits_BLV
          + layers.bias(self, 'mlm_bias', (c.vocab_size,), ('vocab',), pdt).astype(dt)[None, None]
        )
    else:
      logits_BLV = layers.lm_head(self, x_BLD, c.vocab_size, dt, pdt)
    return constrain(logits_BLV.astype(jnp.float32), ('act_batch', 'act_length', 'act_vocab'))
