"""Transformer building blocks shared by the model families.

Dimensions: B batch, L query length, S key length, D model dim, H heads, G kv heads,
K head dim, F MLP dim, V vocab. Every param carries logical axis names; activations are
constrained by logical `act_*` names at block boundaries.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fm.sharding import constrain

Dtype = Any
BLD = ('act_batch', 'act_length', 'act_embed')


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def dense_init(fan_in: int):
  return nn.initializers.normal(stddev=fan_in ** -0.5)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    scale_D = param_with_axes(self, 'scale', nn.initializers.ones, (x_BLD.shape[-1],), ('norm',),
                              self.param_dtype)
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
  vocab_size: int
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding_VD = param_with_axes(self, 'embedding', nn.initializers.normal(1.0),
                                        (self.vocab_size, self.dim), ('vocab', 'embed'),
                                        self.param_dtype)

  def __call__(self, tokens_BL: jax.Array) -> jax.Array:
    return jnp.take(self.embedding_VD, tokens_BL, axis=0).astype(self.dtype)

  def attend(self, x_BLD: jax.Array) -> jax.Array:
    """Tied output projection: logits against the embedding table."""
    return jnp.einsum('BLD,VD->BLV', x_BLD, self.embedding_VD.astype(self.dtype))


def rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form) applied to queries or keys."""
  half = x_BLHK.shape[-1] // 2
  freqs_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BLK = positions_BL[..., None].astype(jnp.float32) * freqs_K
  sin, cos = jnp.sin(angles_BLK)[:, :, None, :], jnp.cos(angles_BLK)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)


def attention_mask(segment_ids_BL: jax.Array, causal: bool = True,
                   prefix_BL: jax.Array | None = None) -> jax.Array:
  """Boolean (B, 1, L, L) mask: query and key in the same packed document, and

  - causal: no look-ahead, except that tokens of a prefix (prefix_BL True) see the whole prefix
    (prefix LM: bidirectional over the prefix, causal after it);
  - not causal: every token of the document (encoder).
  """
  same_doc_BLS = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  if causal:
    length = segment_ids_BL.shape[1]
    allowed_BLS = jnp.tril(jnp.ones((length, length), bool))[None]
    if prefix_BL is not None:
      allowed_BLS = allowed_BLS | (prefix_BL[:, :, None] & prefix_BL[:, None, :])
    same_doc_BLS &= allowed_BLS
  return same_doc_BLS[:, None]


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  implementation: str = 'xla'  # jax.nn.dot_product_attention: xla or cudnn.


class Attention(nn.Module):
  """Multi-head attention with grouped-query option (num_kv_heads < num_heads) and RoPE.

  Self-attention by default; given `kv_BSD` (an encoder's output) it is cross-attention, whose
  keys carry no positions.
  """
  cfg: AttentionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, positions_BL, mask_B1LS, kv_BSD=None):
    c, D = self.cfg, x_BLD.shape[-1]
    cross = kv_BSD is not None
    kv_BSD = x_BLD if kv_BSD is None else kv_BSD
    w = lambda name, shape, axes, fan_in: param_with_axes(
        self, name, dense_init(fan_in), shape, axes, self.param_dtype).astype(self.dtype)
    wq_DHK = w('query', (D, c.num_heads, c.head_dim), ('embed', 'heads', 'head_dim'), D)
    wk_DGK = w('key', (D, c.num_kv_heads, c.head_dim), ('embed', 'kv_heads', 'head_dim'), D)
    wv_DGK = w('value', (D, c.num_kv_heads, c.head_dim), ('embed', 'kv_heads', 'head_dim'), D)
    wo_HKD = w('out', (c.num_heads, c.head_dim, D), ('heads', 'head_dim', 'embed'),
               c.num_heads * c.head_dim)
    q_BLHK = jnp.einsum('BLD,DHK->BLHK', x_BLD, wq_DHK)
    k_BLGK = jnp.einsum('BSD,DGK->BSGK', kv_BSD, wk_DGK)
    v_BLGK = jnp.einsum('BSD,DGK->BSGK', kv_BSD, wv_DGK)
    if not cross:
      q_BLHK = rope(q_BLHK, positions_BL, c.rope_theta)
      k_BLGK = rope(k_BLGK, positions_BL, c.rope_theta)
    q_BLHK = constrain(q_BLHK, ('act_batch', 'act_length', 'act_heads', None))
    k_BLGK = constrain(k_BLGK, ('act_batch', 'act_length', 'act_kv_heads', None))
    v_BLGK = constrain(v_BLGK, ('act_batch', 'act_length', 'act_kv_heads', None))
    out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BLGK, v_BLGK, mask=mask_B1LS,
                                            implementation=c.implementation)
    return jnp.einsum('BLHK,HKD->BLD', out_BLHK, wo_HKD)


class SwiGLU(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD):
    D, F = x_BLD.shape[-1], self.mlp_dim
    w = lambda name, shape, axes, fan_in: param_with_axes(
        self, name, dense_init(fan_in), shape, axes, self.param_dtype).astype(self.dtype)
    gate_BLF = jnp.einsum('BLD,DF->BLF', x_BLD, w('gate', (D, F), ('embed', 'mlp'), D))
    up_BLF = jnp.einsum('BLD,DF->BLF', x_BLD, w('up', (D, F), ('embed', 'mlp'), D))
    h_BLF = constrain(nn.silu(gate_BLF) * up_BLF, ('act_batch', 'act_length', 'act_mlp'))
    return jnp.einsum('BLF,FD->BLD', h_BLF, w('down', (F, D), ('mlp', 'embed'), F))


REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
