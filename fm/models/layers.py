"""Transformer building blocks shared by the model families.

Dimensions: B batch, L query length, S key length, D model dim, H heads, G kv heads,
K head dim, F MLP dim, V vocab. Every param carries logical axis names; activations are
constrained by logical `act_*` names at block boundaries.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fm import ConfigError, sharding
from fm.sharding import constrain

Dtype = Any
BLD = ('act_batch', 'act_length', 'act_embed')


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def dense_init(fan_in: int):
  return nn.initializers.normal(stddev=fan_in**-0.5)


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Low-rank adapters (Hu et al. 2021) on the projections named in `targets`."""

  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = ('query', 'key', 'value', 'out', 'gate', 'up', 'down')


LORA_SUFFIXES = ('_lora_a', '_lora_b')


def project(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
  """`x`'s last `n_in` dims contracted with `w`'s first `n_in`: one 2-D matmul over `x`'s
  leading dims flattened (`x` (..., *IN) and `w` (*IN, *OUT) give (..., *OUT)).

  The same FLOPs and values as the einsum, but XLA:CPU gives a contraction with batch dims
  ('BLD,DF->BLF') a weight gradient that first copies the activations' gradient transposed, in
  the loop fused with their elementwise producers: measured on a SwiGLU MLP of 512 x 2048 on
  8 x 256 tokens, 2-D is 1.5x faster forward and backward (README: the step-speed log). Where
  the mesh splits activations along their length, merging batch and length would reshard them
  (all-gathers and all-to-alls), so there the contraction keeps its dims.
  """
  if sharding.split('act_length'):
    return jnp.tensordot(x, w, axes=n_in)
  lead, inner, outer = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :], w.shape[n_in:]
  x_ND = x.reshape(math.prod(lead), math.prod(inner))
  y_NF = x_ND @ w.reshape(math.prod(inner), math.prod(outer))
  return y_NF.reshape(*lead, *outer)


def dense_weight(
  module: nn.Module,
  name: str,
  shape: tuple[int, ...],
  axes: tuple,
  n_in: int,
  dtype,
  param_dtype,
  lora: LoRA | None = None,
) -> jax.Array:
  """A projection weight whose first `n_in` dims are its inputs, in the compute dtype.

  With LoRA on `name` it is W + (alpha / rank) * A.B, A (inputs x rank, random) and B (rank x
  outputs, zero), so training starts from W exactly; A and B carry W's logical axes on their
  input/output dims and are sharded like it.
  """
  fan_in = int(math.prod(shape[:n_in]))
  w = param_with_axes(module, name, dense_init(fan_in), shape, axes, param_dtype)
  if lora is not None and lora.rank and name in lora.targets:
    r = lora.rank
    a = param_with_axes(
      module,
      name + '_lora_a',
      dense_init(fan_in),
      (*shape[:n_in], r),
      (*axes[:n_in], None),
      param_dtype,
    )
    b = param_with_axes(
      module,
      name + '_lora_b',
      nn.initializers.zeros,
      (r, *shape[n_in:]),
      (None, *axes[n_in:]),
      param_dtype,
    )
    w = w + (lora.alpha / r) * jnp.tensordot(a, b, axes=1)
  return w.astype(dtype)


def merge_lora(params: Any, lora: LoRA, stacked: bool = False) -> Any:
  """Params with every adapter folded into its weight (W + alpha/rank A.B) and removed.

  `stacked`: the params of scanned layers carry a leading layer axis.
  """
  product = (
    jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))
    if stacked
    else (lambda a, b: jnp.tensordot(a, b, axes=1))
  )

  def merge(tree):
    if not isinstance(tree, dict):
      return tree
    out = {}
    for k, v in tree.items():
      if k.endswith(LORA_SUFFIXES):
        continue
      if f'{k}_lora_a' in tree:
        a, b = tree[f'{k}_lora_a'], tree[f'{k}_lora_b']
        v = (v + (lora.alpha / lora.rank) * product(a, b)).astype(v.dtype)
      out[k] = merge(v)
    return out

  return merge(params)


POOLS = ('last', 'mean', 'first')


def pool(x_BLD: jax.Array, segment_ids_BL: jax.Array, how: str) -> jax.Array:
  """One vector per row from its real (segment id > 0, left-aligned) positions: the last one
  (a decoder's summary of the whole text), the first, or their mean."""
  real_BL = segment_ids_BL > 0
  if how == 'mean':
    w_BL = real_BL.astype(jnp.float32)
    return jnp.einsum('BLD,BL->BD', x_BLD.astype(jnp.float32), w_BL) / jnp.maximum(
      w_BL.sum(1, keepdims=True), 1.0
    )
  index_B = (
    jnp.maximum(real_BL.sum(1) - 1, 0) if how == 'last' else jnp.zeros(x_BLD.shape[0], jnp.int32)
  )
  return jnp.take_along_axis(x_BLD, index_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)


class ClassifierHead(nn.Module):
  """Pooled hidden states -> class logits (float32)."""

  num_classes: int
  how: str = 'last'
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL):
    pooled_BD = pool(x_BLD, segment_ids_BL, self.how)
    D = pooled_BD.shape[-1]
    w_DC = param_with_axes(
      self, 'kernel', dense_init(D), (D, self.num_classes), ('embed', None), self.param_dtype
    )
    b_C = param_with_axes(
      self, 'bias', nn.initializers.zeros, (self.num_classes,), (None,), self.param_dtype
    )
    return pooled_BD @ w_DC.astype(jnp.float32) + b_C.astype(jnp.float32)[None]


class Norm(nn.Module):
  """RMSNorm (a scale); with `center`, LayerNorm (the mean removed first, and a bias)."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  center: bool = False

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    D = x_BLD.shape[-1]
    scale_D = param_with_axes(
      self, 'scale', nn.initializers.ones, (D,), ('norm',), self.param_dtype
    )
    x = x_BLD.astype(jnp.float32)
    if self.center:
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    x = x * scale_D.astype(jnp.float32)[None, None]
    if self.center:
      x = x + bias(self, 'bias', (D,), ('norm',), self.param_dtype).astype(jnp.float32)[None, None]
    return x.astype(self.dtype)


RMSNorm = Norm
LayerNorm = functools.partial(Norm, center=True)  # GPT-2, BERT.
NORMS = {'rms': RMSNorm, 'layer': LayerNorm}


def bias(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple, param_dtype):
  return param_with_axes(module, name, nn.initializers.zeros, shape, axes, param_dtype)


def lm_head_kernel(module: nn.Module, dim: int, vocab_size: int, param_dtype) -> jax.Array:
  """`module`'s untied output projection, its param `lm_head` (D, V)."""
  return param_with_axes(
    module, 'lm_head', dense_init(dim), (dim, vocab_size), ('embed', 'vocab'), param_dtype
  )


def lm_head(module: nn.Module, x_BLD: jax.Array, vocab_size: int, dtype, param_dtype):
  """Logits from an untied output projection, `module`'s param `lm_head` (D, V)."""
  w_DV = lm_head_kernel(module, x_BLD.shape[-1], vocab_size, param_dtype)
  return project(x_BLD, w_DV.astype(dtype))


class Embed(nn.Module):
  vocab_size: int
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding_VD = param_with_axes(
      self,
      'embedding',
      nn.initializers.normal(1.0),
      (self.vocab_size, self.dim),
      ('vocab', 'embed'),
      self.param_dtype,
    )

  def __call__(self, tokens_BL: jax.Array) -> jax.Array:
    return jnp.take(self.embedding_VD, tokens_BL, axis=0).astype(self.dtype)

  def attend(self, x_BLD: jax.Array) -> jax.Array:
    """Tied output projection: logits against the embedding table."""
    return project(x_BLD, self.embedding_VD.astype(self.dtype).T)


def rope_frequencies(head_dim: int, theta: float, scaling: tuple = ()) -> jax.Array:
  """RoPE's angular frequencies, (head_dim // 2,). `scaling` = (factor, low_freq_factor,
  high_freq_factor, original_max_len) applies Llama 3.1's rule: wavelengths longer than
  original_max_len / low_freq_factor are stretched by `factor`, shorter than original_max_len /
  high_freq_factor kept, and those between interpolated."""
  half = head_dim // 2
  freqs_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if not scaling:
    return freqs_K
  factor, low, high, original = scaling
  wavelen_K = 2 * math.pi / freqs_K
  smooth_K = (original / wavelen_K - low) / (high - low)
  blended_K = (1 - smooth_K) * freqs_K / factor + smooth_K * freqs_K
  return jnp.where(
    wavelen_K > original / low,
    freqs_K / factor,
    jnp.where(wavelen_K < original / high, freqs_K, blended_K),
  )


def rope(
  x_BLHK: jax.Array, positions_BL: jax.Array, theta: float, scaling: tuple = ()
) -> jax.Array:
  """Rotary position embedding (rotate-half form) applied to queries or keys."""
  freqs_K = rope_frequencies(x_BLHK.shape[-1], theta, scaling)
  angles_BLK = positions_BL[..., None].astype(jnp.float32) * freqs_K[None, None]
  sin, cos = jnp.sin(angles_BLK)[:, :, None, :], jnp.cos(angles_BLK)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)


def attention_mask(
  segment_ids_BL: jax.Array, causal: bool = True, prefix_BL: jax.Array | None = None
) -> jax.Array:
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
  qkv_bias: bool = False  # Biases on the query, key and value projections.
  rope_scaling: tuple = ()  # (factor, low_freq_factor, high_freq_factor, original_max_len).
  rope: bool = True  # False: positions come from elsewhere (learned embeddings).
  out_bias: bool = False  # A bias on the output projection.
  scale: float = 0.0  # Of the query-key logits; 0: head_dim**-0.5 (T5: 1, folded into the init).


def relative_bucket(relative_BLS: jax.Array, bidirectional: bool, buckets: int, max_distance: int):
  """T5's bucket of each key-minus-query offset: half the buckets exact for small offsets, the
  rest logarithmic up to max_distance (beyond it, the last bucket); bidirectional splits them
  between keys before and after the query, else keys after the query share bucket 0."""
  out = jnp.zeros_like(relative_BLS)
  if bidirectional:
    buckets //= 2
    out = out + (relative_BLS > 0).astype(relative_BLS.dtype) * buckets
    distance = jnp.abs(relative_BLS)
  else:
    distance = -jnp.minimum(relative_BLS, 0)
  exact = buckets // 2
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(
    max_distance / exact
  )
  large = exact + (log_ratio * (buckets - exact)).astype(relative_BLS.dtype)
  large = jnp.minimum(large, buckets - 1)
  return out + jnp.where(distance < exact, distance, large)


class RelativeBias(nn.Module):
  """T5's relative attention bias: a learned scalar per head and offset bucket, added to the
  attention logits; one table shared by every layer of a stack."""

  num_heads: int
  buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query_positions_BL: jax.Array, key_positions_BS: jax.Array) -> jax.Array:
    """The (B, H, L, S) float32 bias of each query over each key."""
    table_RH = param_with_axes(
      self,
      'embedding',
      nn.initializers.normal(1.0),
      (self.buckets, self.num_heads),
      (None, 'heads'),
      self.param_dtype,
    )
    relative_BLS = key_positions_BS[:, None, :] - query_positions_BL[:, :, None]
    bucket_BLS = relative_bucket(
      relative_BLS.astype(jnp.int32), self.bidirectional, self.buckets, self.max_distance
    )
    bias_BLSH = jnp.take(table_RH.astype(jnp.float32), bucket_BLS, axis=0)
    return jnp.transpose(bias_BLSH, (0, 3, 1, 2))


class Attention(nn.Module):
  """Multi-head attention with grouped-query option (num_kv_heads < num_heads) and RoPE.

  Self-attention by default; given `kv_BSD` (an encoder's output) it is cross-attention, whose
  keys carry no positions.

  `decode=True` (self-attention) keeps a KV cache in the `cache` collection: the first call,
  with inputs as long as the cache should be, only creates it (zeros); each later call writes
  its new keys and values at the cache index and attends to everything cached so far, causally.
  In decode mode padding tokens carry position -1, and `mask_B1LS` (None, or a mask among the
  new tokens) adds pairs beyond the causal ones: a prefix LM's prompt read bidirectionally.

  `relative` (a RelativeBias its parent owns, shared by the layers) adds T5's bias of each
  query position over each key position (cached keys: positions 0 to the cache length) to
  self-attention's logits.
  """

  attn_cfg: AttentionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRA | None = None
  decode: bool = False
  relative: nn.Module | None = None

  @nn.compact
  def __call__(self, x_BLD, positions_BL, mask_B1LS, kv_BSD=None):
    c, D = self.attn_cfg, x_BLD.shape[-1]
    cross = kv_BSD is not None
    kv_BSD = x_BLD if kv_BSD is None else kv_BSD
    w = lambda name, shape, axes, n_in: dense_weight(
      self, name, shape, axes, n_in, self.dtype, self.param_dtype, self.lora
    )
    wq_DHK = w('query', (D, c.num_heads, c.head_dim), ('embed', 'heads', 'head_dim'), 1)
    wk_DGK = w('key', (D, c.num_kv_heads, c.head_dim), ('embed', 'kv_heads', 'head_dim'), 1)
    wv_DGK = w('value', (D, c.num_kv_heads, c.head_dim), ('embed', 'kv_heads', 'head_dim'), 1)
    wo_HKD = w('out', (c.num_heads, c.head_dim, D), ('heads', 'head_dim', 'embed'), 2)
    q_BLHK = project(x_BLD, wq_DHK)
    k_BSGK = project(kv_BSD, wk_DGK)
    v_BSGK = project(kv_BSD, wv_DGK)
    if c.qkv_bias:
      b = lambda name, heads, axis: bias(
        self, name, (heads, c.head_dim), (axis, 'head_dim'), self.param_dtype
      ).astype(self.dtype)[None, None]
      q_BLHK = q_BLHK + b('query_bias', c.num_heads, 'heads')
      k_BSGK = k_BSGK + b('key_bias', c.num_kv_heads, 'kv_heads')
      v_BSGK = v_BSGK + b('value_bias', c.num_kv_heads, 'kv_heads')
    if not cross and c.rope:
      q_BLHK = rope(q_BLHK, positions_BL, c.rope_theta, c.rope_scaling)
      k_BSGK = rope(k_BSGK, positions_BL, c.rope_theta, c.rope_scaling)
    q_BLHK = constrain(q_BLHK, ('act_batch', 'act_length', 'act_heads', None))
    k_BSGK = constrain(k_BSGK, ('act_batch', 'act_length', 'act_kv_heads', None))
    v_BSGK = constrain(v_BSGK, ('act_batch', 'act_length', 'act_kv_heads', None))
    if self.decode and not cross:
      k_BSGK, v_BSGK, mask_B1LS = self._cached(k_BSGK, v_BSGK, positions_BL >= 0, mask_B1LS)
    bias_BHLS = None
    if self.relative is not None and not cross:
      key_positions_BS = positions_BL
      if self.decode:  # The cache's keys: positions 0 to its length.
        S = k_BSGK.shape[1]
        key_positions_BS = jnp.broadcast_to(jnp.arange(S), (positions_BL.shape[0], S))
      bias_BHLS = self.relative(positions_BL, key_positions_BS).astype(q_BLHK.dtype)
    out_BLHK = jax.nn.dot_product_attention(
      q_BLHK,
      k_BSGK,
      v_BSGK,
      bias=bias_BHLS,
      mask=mask_B1LS,
      scale=c.scale or None,
      implementation=c.implementation,
    )
    out_BLD = project(out_BLHK, wo_HKD, 2)
    if c.out_bias:
      out_BLD = (
        out_BLD
        + bias(self, 'out_bias', (D,), ('embed',), self.param_dtype).astype(self.dtype)[None, None]
      )
    return out_BLD

  def _cached(self, k_BLGK, v_BLGK, valid_BL, extra_B1LL=None):
    """(cached keys, cached values, mask of the new queries over the cache) after writing the
    new tokens' keys and values at the cache index; `extra_B1LL` allows more pairs among the
    new tokens than the causal ones."""
    creating = not self.has_variable('cache', 'key')
    key = self.variable('cache', 'key', jnp.zeros, k_BLGK.shape, k_BLGK.dtype)
    value = self.variable('cache', 'value', jnp.zeros, v_BLGK.shape, v_BLGK.dtype)
    valid = self.variable('cache', 'valid', jnp.zeros, valid_BL.shape, bool)
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    if creating:
      return k_BLGK, v_BLGK, None
    i, L, S = index.value, k_BLGK.shape[1], key.value.shape[1]
    key.value = jax.lax.dynamic_update_slice(
      key.value, k_BLGK.astype(key.value.dtype), (0, i, 0, 0)
    )
    value.value = jax.lax.dynamic_update_slice(
      value.value, v_BLGK.astype(value.value.dtype), (0, i, 0, 0)
    )
    valid.value = jax.lax.dynamic_update_slice(valid.value, valid_BL, (0, i))
    index.value = i + L
    allowed_BLS = jnp.broadcast_to(
      jnp.arange(S)[None, :] <= (i + jnp.arange(L))[:, None], (valid_BL.shape[0], L, S)
    )
    if extra_B1LL is not None:
      allowed_BLS |= jax.lax.dynamic_update_slice(
        jnp.zeros_like(allowed_BLS), extra_B1LL[:, 0], (0, 0, i)
      )
    mask_B1LS = (valid.value[:, None, :] & allowed_BLS)[:, None]
    return key.value, value.value, mask_B1LS


class MLP(nn.Module):
  """SwiGLU (`kind` 'swiglu': gate, up, down; Llama), GEGLU ('geglu': the gate through GELU's
  tanh approximation; T5 1.1), or up, GELU, down with biases ('gelu_tanh', its tanh
  approximation: GPT-2; 'gelu', exact: BERT)."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRA | None = None
  kind: str = 'swiglu'

  @nn.compact
  def __call__(self, x_BLD):
    D, F = x_BLD.shape[-1], self.mlp_dim
    w = lambda name, shape, axes: dense_weight(
      self, name, shape, axes, 1, self.dtype, self.param_dtype, self.lora
    )
    b = lambda name, n, axis: bias(self, name, (n,), (axis,), self.param_dtype).astype(self.dtype)
    gated = self.kind in GATED
    if gated:
      gate_BLF = project(x_BLD, w('gate', (D, F), ('embed', 'mlp')))
      up_BLF = project(x_BLD, w('up', (D, F), ('embed', 'mlp')))
      h_BLF = GATED[self.kind](gate_BLF) * up_BLF
    else:
      up_BLF = project(x_BLD, w('up', (D, F), ('embed', 'mlp')))
      h_BLF = nn.gelu(up_BLF + b('up_bias', F, 'mlp')[None, None], self.kind == 'gelu_tanh')
    h_BLF = constrain(h_BLF, ('act_batch', 'act_length', 'act_mlp'))
    out_BLD = project(h_BLF, w('down', (F, D), ('mlp', 'embed')))
    return out_BLD if gated else out_BLD + b('down_bias', D, 'embed')[None, None]


SwiGLU = MLP
GATED = {'swiglu': nn.silu, 'geglu': functools.partial(nn.gelu, approximate=True)}


class MLMTransform(nn.Module):
  """BERT's masked-LM transform before the tied output: dense with a bias, GELU, norm."""

  norm: str = 'layer'
  eps: float = 1e-12
  activation: str = 'gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD):
    D = x_BLD.shape[-1]
    w_DE = dense_weight(self, 'dense', (D, D), ('embed', 'mlp'), 1, self.dtype, self.param_dtype)
    h_BLE = project(x_BLD, w_DE)
    h_BLE = (
      h_BLE
      + bias(self, 'dense_bias', (D,), ('mlp',), self.param_dtype).astype(self.dtype)[None, None]
    )
    h_BLE = nn.gelu(h_BLE, self.activation == 'gelu_tanh')
    return NORMS[self.norm](self.eps, self.dtype, self.param_dtype, name='norm')(h_BLE)


MLPS = ('swiglu', 'geglu', 'gelu_tanh', 'gelu')


REMAT_POLICIES = {
  'none': None,
  'full': jax.checkpoint_policies.nothing_saveable,
  'dots_saveable': jax.checkpoint_policies.dots_saveable,
  'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTION_IMPLS = ('xla', 'cudnn')  # jax.nn.dot_product_attention's implementations.


# The fields every family's Config may have, with their known values.
COMMON_CHOICES = {
  'dtype': DTYPES,
  'param_dtype': DTYPES,
  'remat': tuple(REMAT_POLICIES),
  'attention_impl': ATTENTION_IMPLS,
}


def check_choices(cfg, choices: dict[str, tuple]) -> None:
  """Each named field of a model Config that `cfg` has holds one of its `choices`."""
  for name, known in choices.items():
    value = getattr(cfg, name, known[0])
    if value not in known:
      raise ConfigError(
        f'config.model.{name}={value!r} is unknown; choose one of: {", ".join(known)}.'
      )
