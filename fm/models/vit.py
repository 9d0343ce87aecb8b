"""Vision Transformer (Dosovitskiy et al. 2021): an image cut into patches, each patch a token.

Patches (P x P x C pixels, row-major over the grid) are embedded by one linear map, a CLS token
may lead them, positions are added (learned, or fixed 2-D sine-cosine as in MAE), and the
decoder's pre-norm blocks run without a causal mask (LayerNorm, GELU MLP, biases: the
decoder's Config fields norm='layer', mlp='gelu', positions='learned', bias=True). Dimensions:
B batch, H W image height and width, C channels, P patch size, N patches, D model dim.

`Model(model_cfg).apply(params, images_BHWC[, keep_BK, restore_BN]) -> class logits (B,
num_classes)`, or with num_classes=0 the final states (B, [1 +] N, D). Images are floats (see
`pixels`). `keep_BK` (patch indices) passes only those patches to the blocks: a masked
autoencoder's encoder never sees the others. With `restore_BN` (where each patch sits in
kept-then-masked order) a light decoder fills the masked patches with a learned token and
predicts every patch's pixels: (B, N, P * P * C) (MAE, He et al. 2022).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fm import ConfigError
from fm.models import decoder, layers
from fm.sharding import constrain

VARIANTS = {
  # Unit tests and smoke runs.
  'tiny': dict(
    num_layers=2,
    d_model=64,
    num_heads=4,
    mlp_dim=128,
    decoder_dim=32,
    decoder_layers=1,
    decoder_heads=2,
  ),
  # Fashion-MNIST on a CPU: 28 x 28 images in 49 patches of 4 x 4 (0.45M params).
  'mini': dict(num_layers=6, d_model=96, num_heads=4, mlp_dim=192),
  # Published shapes (ViT-B/16, ViT-L/16 at 224 x 224), for planning on pods.
  'B/16': dict(
    image_size=224,
    patch_size=16,
    channels=3,
    num_layers=12,
    d_model=768,
    num_heads=12,
    mlp_dim=3072,
  ),
  'L/16': dict(
    image_size=224,
    patch_size=16,
    channels=3,
    num_layers=24,
    d_model=1024,
    num_heads=16,
    mlp_dim=4096,
  ),
}
MODALITY = 'image'
POOL = 'first'  # The CLS token (with cls_token=False the head should pool the mean).
SEQ2SEQ = ''
POSITIONS = ('learned', 'sincos2d')


@dataclasses.dataclass(frozen=True)
class Config:
  image_size: int = 28
  patch_size: int = 4
  channels: int = 1
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  mlp_dim: int = 128
  positions: str = 'learned'  # 'learned', or 'sincos2d' (fixed; MAE).
  cls_token: bool = True  # A learned token before the patches (what pool='first' reads).
  norm_eps: float = 1e-6
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention_impl: str = 'xla'
  num_classes: int = 0  # > 0: a classification head on pooled states.
  pool: str = 'first'  # How the head pools: 'first' (the CLS token) or 'mean' (of the patches).
  # A masked autoencoder's light decoder (fm/objectives/mae.py): its width (0: no decoder),
  # blocks and heads (its MLP 4x wide); run when the model is called with `restore_BN`.
  decoder_dim: int = 0
  decoder_layers: int = 2
  decoder_heads: int = 4
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = layers.LoRA.targets

  def __post_init__(self):
    object.__setattr__(self, 'lora_targets', tuple(self.lora_targets))
    if self.image_size % self.patch_size:
      raise ConfigError(
        f'config.model.image_size={self.image_size} is not a multiple of config.model.'
        f'patch_size={self.patch_size}; choose a patch size that divides it.'
      )
    if self.d_model % self.num_heads:
      raise ConfigError(
        f'config.model.d_model={self.d_model} is not a multiple of config.model.num_heads='
        f'{self.num_heads}.'
      )
    layers.check_choices(self, {'positions': POSITIONS, 'pool': ('first', 'mean')})
    if self.pool == 'first' and not self.cls_token:
      raise ConfigError(
        "config.model.pool='first' reads the CLS token, and cls_token is False; set "
        "pool='mean' or cls_token=True."
      )

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def patch_dim(self) -> int:
    return self.patch_size**2 * self.channels

  @property
  def blocks(self) -> decoder.Config:
    """The fields of the decoder's blocks these run."""
    return self._blocks(self.num_layers, self.d_model, self.num_heads, self.mlp_dim)

  @property
  def mae_blocks(self) -> decoder.Config:
    """The fields of the masked autoencoder's decoder blocks."""
    D = self.decoder_dim
    return self._blocks(self.decoder_layers, D, self.decoder_heads, 4 * D)

  def _blocks(self, num_layers: int, d_model: int, heads: int, mlp_dim: int) -> decoder.Config:
    return decoder.Config(
      num_layers=num_layers,
      d_model=d_model,
      num_heads=heads,
      num_kv_heads=heads,
      head_dim=d_model // heads,
      mlp_dim=mlp_dim,
      max_len=self.num_patches + 1,
      norm='layer',
      mlp='gelu',
      positions='learned',
      bias=True,
      qkv_bias=True,
      norm_eps=self.norm_eps,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      attention_impl=self.attention_impl,
      lora_rank=self.lora_rank,
      lora_alpha=self.lora_alpha,
      lora_targets=self.lora_targets,
    )

  @property
  def lora(self) -> layers.LoRA | None:
    return self.blocks.lora


def patchify(images_BHWC: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, N, P * P * C): patches in row-major grid order, each row-major."""
  B, H, W, C = images_BHWC.shape
  P = patch_size
  x = images_BHWC.reshape(B, H // P, P, W // P, P, C).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, (H // P) * (W // P), P * P * C)


def unpatchify(patches_BNX: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """`patchify`'s inverse (a square grid)."""
  B, N, _ = patches_BNX.shape
  g, P = math.isqrt(N), patch_size
  x = patches_BNX.reshape(B, g, g, P, P, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, g * P, g * P, channels)


def sincos2d(grid: int, dim: int) -> jax.Array:
  """Fixed 2-D sine-cosine positions (grid * grid, dim): half the dims encode the row, half
  the column, each as sines and cosines of geometric frequencies (MAE's)."""
  if dim % 4:
    raise ConfigError(f'config.model.d_model={dim} must be a multiple of 4 for sincos2d.')
  omega = 1.0 / 10000 ** (jnp.arange(dim // 4, dtype=jnp.float32) / (dim // 4))
  rows, cols = jnp.meshgrid(jnp.arange(grid), jnp.arange(grid), indexing='ij')
  parts = []
  for coordinate in (rows, cols):
    angles = coordinate.reshape(-1, 1).astype(jnp.float32) * omega[None]
    parts += [jnp.sin(angles), jnp.cos(angles)]
  return jnp.concatenate(parts, axis=1)


def pixels(images_BHWC) -> jax.Array:
  """uint8 images -> the floats the model reads, in [-1, 1]."""
  return images_BHWC.astype(jnp.float32) / 127.5 - 1.0


def inputs(model_cfg: Config, images_BHWC, *_) -> tuple:
  """`Model.apply`'s arguments for a batch of images (uint8 ones become `pixels`)."""
  del model_cfg
  return (pixels(images_BHWC) if images_BHWC.dtype == jnp.uint8 else images_BHWC,)


def sequence_length(model_cfg: Config) -> int:
  """Tokens the blocks read: the patches and the CLS token."""
  return model_cfg.num_patches + model_cfg.cls_token


def sample_inputs(model_cfg: Config, batch_size: int, length: int = 0) -> tuple:
  """Zero images of the model's shape (the sample of an initialisation)."""
  del length
  c = model_cfg
  return (jnp.zeros((batch_size, c.image_size, c.image_size, c.channels), jnp.float32),)


def param_count(model_cfg: Config) -> dict[str, int]:
  c = model_cfg
  D, F = c.d_model, c.mlp_dim
  block = 4 * D * D + 4 * D + 2 * D * F + F + D + 4 * D
  embed = c.patch_dim * D + D + D * c.cls_token
  embed += c.num_patches * D * (c.positions == 'learned')
  E = c.decoder_dim  # A masked autoencoder's decoder, when it has one.
  mae = D * E + E + E + c.decoder_layers * (4 * E * E + 4 * E + 8 * E * E + 5 * E + 4 * E)
  mae = (mae + 2 * E + E * c.patch_dim + c.patch_dim) if E else 0
  return {
    'total': c.num_layers * block + embed + 2 * D + mae,
    'non_embedding': c.num_layers * block + 2 * D + mae,
    'embedding': embed,
  }


def flops_per_token(model_cfg: Config, seq_len: int) -> float:
  """Training FLOPs per patch token: 6 x matmul params + attention over `seq_len` tokens."""
  c = model_cfg
  matmul = c.num_layers * (4 * c.d_model**2 + 2 * c.d_model * c.mlp_dim) + c.patch_dim * c.d_model
  return 6.0 * matmul + 6.0 * c.num_layers * 2 * c.d_model * seq_len


class Model(nn.Module):
  model_cfg: Config

  @nn.compact
  def __call__(self, images_BHWC, keep_BK=None, restore_BN=None):
    c = self.model_cfg
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    if images_BHWC.shape[1:] != (c.image_size, c.image_size, c.channels):
      raise ConfigError(
        f'images of shape {tuple(images_BHWC.shape[1:])} do not fit config.model (image_size='
        f'{c.image_size}, channels={c.channels}); set them to the data.'
      )
    patches_BNX = patchify(images_BHWC.astype(dt), c.patch_size)
    w_XD = layers.dense_weight(
      self, 'patch_embed', (c.patch_dim, c.d_model), (None, 'embed'), 1, dt, pdt
    )
    b_D = layers.bias(self, 'patch_bias', (c.d_model,), ('embed',), pdt).astype(dt)
    x_BND = layers.project(patches_BNX, w_XD) + b_D[None, None]
    grid = c.image_size // c.patch_size
    if c.positions == 'learned':
      pos_ND = layers.param_with_axes(
        self,
        'pos_embed',
        nn.initializers.normal(0.02),
        (c.num_patches, c.d_model),
        (None, 'embed'),
        pdt,
      ).astype(dt)
    else:
      pos_ND = sincos2d(grid, c.d_model).astype(dt)
    x_BND = x_BND + pos_ND[None]
    if keep_BK is not None:  # Only the kept patches go on (MAE's encoder).
      x_BND = jnp.take_along_axis(x_BND, keep_BK[:, :, None], axis=1)
    if c.cls_token:
      cls_D = layers.param_with_axes(
        self, 'cls', nn.initializers.zeros, (c.d_model,), ('embed',), pdt
      ).astype(dt)
      x_BND = jnp.concatenate(
        [jnp.broadcast_to(cls_D, (x_BND.shape[0], 1, c.d_model)), x_BND], axis=1
      )
    x_BND = constrain(x_BND, layers.BLD)
    blocks = c.blocks
    positions_BN = jnp.zeros(x_BND.shape[:2], jnp.int32)  # Unused: positions are added above.
    for i in range(c.num_layers):
      x_BND = decoder.Block(blocks, name=f'layer_{i}')(x_BND, positions_BN, None)
    x_BND = layers.LayerNorm(c.norm_eps, dt, pdt, name='final_norm')(x_BND)
    if restore_BN is not None and not c.decoder_dim:
      raise ConfigError(
        'config.model.decoder_dim=0: this ViT has no decoder to reconstruct patches with; set '
        'decoder_dim (and decoder_layers, decoder_heads) for a masked autoencoder.'
      )
    if restore_BN is None and c.decoder_dim and self.is_initializing():
      restore_BN = jnp.broadcast_to(jnp.arange(c.num_patches), x_BND.shape[:1] + (c.num_patches,))
      self.reconstruct(x_BND, restore_BN)  # The decoder's params are part of the model's.
      restore_BN = None
    if restore_BN is not None:
      return self.reconstruct(x_BND, restore_BN)
    if not c.num_classes:
      return x_BND
    if c.pool == 'mean' and c.cls_token:
      x_BND = x_BND[:, 1:]  # The patches' mean.
    segments_BN = jnp.ones(x_BND.shape[:2], jnp.int32)
    return layers.ClassifierHead(c.num_classes, c.pool, pdt, name='head')(x_BND, segments_BN)

  def reconstruct(self, x_BKD, restore_BN):
    """MAE's decoder: the encoded kept patches (after the CLS token, if any) and a learned mask
    token for each other patch, put back in grid order, fixed positions added, decoder blocks,
    then each patch's pixels."""
    c = self.model_cfg
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    E = c.decoder_dim
    w_DE = layers.dense_weight(self, 'mae_embed', (c.d_model, E), ('embed', None), 1, dt, pdt)
    y_BKE = layers.project(x_BKD, w_DE)
    y_BKE = y_BKE + layers.bias(self, 'mae_embed_bias', (E,), (None,), pdt).astype(dt)[None, None]
    lead, y_BKE = (y_BKE[:, :1], y_BKE[:, 1:]) if c.cls_token else (None, y_BKE)
    B, N = restore_BN.shape
    mask_E = layers.param_with_axes(
      self, 'mask_token', nn.initializers.normal(0.02), (E,), (None,), pdt
    ).astype(dt)
    y_BNE = jnp.concatenate([y_BKE, jnp.broadcast_to(mask_E, (B, N - y_BKE.shape[1], E))], axis=1)
    y_BNE = jnp.take_along_axis(y_BNE, restore_BN[:, :, None], axis=1)
    y_BNE = y_BNE + sincos2d(c.image_size // c.patch_size, E).astype(dt)[None]
    if lead is not None:
      y_BNE = jnp.concatenate([lead, y_BNE], axis=1)
    blocks = c.mae_blocks
    positions = jnp.zeros(y_BNE.shape[:2], jnp.int32)
    for i in range(c.decoder_layers):
      y_BNE = decoder.Block(blocks, name=f'mae_layer_{i}')(y_BNE, positions, None)
    y_BNE = layers.LayerNorm(c.norm_eps, dt, pdt, name='mae_norm')(y_BNE)
    w_EX = layers.dense_weight(self, 'mae_pred', (E, c.patch_dim), (None, None), 1, dt, pdt)
    out_BNX = layers.project(y_BNE, w_EX)
    out_BNX = (
      out_BNX
      + layers.bias(self, 'mae_pred_bias', (c.patch_dim,), (None,), pdt).astype(dt)[None, None]
    )
    return out_BNX[:, 1:] if lead is not None else out_BNX
