"""Two towers, one embedding space (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023): a ViT
reads images, fm's encoder reads texts, each pooled and projected to `embed_dim`.

`Model(model_cfg).apply(params, images_BHWC, tokens_BL[, segment_ids_BL]) -> (image_BE,
text_BE, scale, bias)`: L2-normalised embeddings of both (float32) and the learned logit scale
(exp of a log-temperature) and bias a contrastive loss (fm/objectives/contrastive.py) reads.
`encode_image` and `encode_text` (as `method=` of apply) embed one side. With num_classes > 0
the model is an image classifier: a head (`head`, where the projections are the towers' own
`head`s) on the image tower's pooled states (fine-tuning; the text tower is left out).

Fields: the image tower's as vit.Config's (image_size, patch_size, channels, num_layers,
d_model, num_heads, mlp_dim, positions, cls_token, pool), the text tower's prefixed `text_`
(its vocabulary `vocab_size`, its length `max_len`); texts are pooled over their real tokens.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fm import ConfigError
from fm.models import decoder, encoder, layers, vit

MODALITY = 'image_text'
POOL = 'mean'
SEQ2SEQ = ''

VARIANTS = {
  # Unit tests and smoke runs: 32x32 colour images.
  'tiny': dict(
    image_size=32,
    patch_size=8,
    channels=3,
    num_layers=2,
    d_model=64,
    num_heads=4,
    mlp_dim=128,
    text_layers=2,
    text_d_model=64,
    text_heads=4,
    text_mlp_dim=128,
    max_len=32,
    embed_dim=32,
  ),
  # Emoji on a CPU: 64x64 images in 64 patches of 8x8, captions of up to 80 bytes.
  'mini': dict(
    image_size=64,
    patch_size=8,
    channels=3,
    num_layers=4,
    d_model=96,
    num_heads=4,
    mlp_dim=192,
    text_layers=2,
    text_d_model=96,
    text_heads=4,
    text_mlp_dim=192,
    max_len=80,
    embed_dim=96,
  ),
  # SigLIP B/16's shapes at 224x224 (for planning on pods).
  'B/16': dict(
    image_size=224,
    patch_size=16,
    channels=3,
    num_layers=12,
    d_model=768,
    num_heads=12,
    mlp_dim=3072,
    text_layers=12,
    text_d_model=768,
    text_heads=12,
    text_mlp_dim=3072,
    max_len=64,
    vocab_size=32000,
    embed_dim=768,
  ),
}


@dataclasses.dataclass(frozen=True)
class Config:
  # The image tower (vit.Config's fields).
  image_size: int = 32
  patch_size: int = 8
  channels: int = 3
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  mlp_dim: int = 128
  positions: str = 'learned'
  cls_token: bool = False
  pool: str = 'mean'  # How the image tower pools: 'mean' (of the patches) or 'first' (CLS).
  # The text tower (fm's encoder: RMSNorm, RoPE, SwiGLU), pooled by the mean of real tokens.
  text_layers: int = 2
  text_d_model: int = 64
  text_heads: int = 4
  text_mlp_dim: int = 128
  vocab_size: int = 384
  max_len: int = 32  # Tokens a text may have.
  embed_dim: int = 32  # The shared embedding space.
  # The logit scale starts at exp(log(scale_init)), the bias at bias_init (SigLIP: 10, -10).
  scale_init: float = 10.0
  bias_init: float = -10.0
  num_classes: int = 0  # > 0: an image classifier (fine-tuning), a head on the image tower.
  norm_eps: float = 1e-6
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention_impl: str = 'xla'
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = layers.LoRA.targets

  def __post_init__(self):
    object.__setattr__(self, 'lora_targets', tuple(self.lora_targets))
    _ = self.image_tower, self.text_tower  # Their own checks.
    if self.scale_init <= 0:
      raise ConfigError(f'config.model.scale_init={self.scale_init} must be > 0.')

  @property
  def image_tower(self) -> vit.Config:
    return vit.Config(
      image_size=self.image_size,
      patch_size=self.patch_size,
      channels=self.channels,
      num_layers=self.num_layers,
      d_model=self.d_model,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      positions=self.positions,
      cls_token=self.cls_token,
      pool=self.pool,
      norm_eps=self.norm_eps,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      attention_impl=self.attention_impl,
      # Its head projects the pooled states; a classifier reads the states themselves.
      num_classes=0 if self.num_classes else self.embed_dim,
      lora_rank=self.lora_rank,
      lora_alpha=self.lora_alpha,
      lora_targets=self.lora_targets,
    )

  @property
  def text_tower(self) -> decoder.Config:
    if self.text_d_model % self.text_heads:
      raise ConfigError(
        f'config.model.text_d_model={self.text_d_model} is not a multiple of config.model.'
        f'text_heads={self.text_heads}.'
      )
    return decoder.Config(
      num_layers=self.text_layers,
      d_model=self.text_d_model,
      num_heads=self.text_heads,
      num_kv_heads=self.text_heads,
      head_dim=self.text_d_model // self.text_heads,
      mlp_dim=self.text_mlp_dim,
      vocab_size=self.vocab_size,
      max_len=self.max_len,
      num_classes=self.embed_dim,  # The head projects the pooled states.
      pool='mean',
      norm_eps=self.norm_eps,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      attention_impl=self.attention_impl,
      lora_rank=self.lora_rank,
      lora_alpha=self.lora_alpha,
      lora_targets=self.lora_targets,
    )

  @property
  def num_patches(self) -> int:
    return self.image_tower.num_patches

  @property
  def lora(self) -> layers.LoRA | None:
    return self.image_tower.lora


def inputs(model_cfg: Config, images_BHWC, *_) -> tuple:
  """The image classifier's arguments (a batch of images)."""
  return vit.inputs(model_cfg.image_tower, images_BHWC)


def sequence_length(model_cfg: Config) -> int:
  """Tokens both towers read for one pair: the patches (and CLS), and a text."""
  return vit.sequence_length(model_cfg.image_tower) + model_cfg.max_len


def sample_inputs(model_cfg: Config, batch_size: int, length: int = 0) -> tuple:
  del length
  images = vit.sample_inputs(model_cfg.image_tower, batch_size)
  return images + (jnp.zeros((batch_size, model_cfg.max_len), jnp.int32),)


def param_count(model_cfg: Config) -> dict[str, int]:
  """Both towers, their projections, scale and bias; an image classifier: its image tower
  (like every family's count, without the classification head)."""
  image = vit.param_count(model_cfg.image_tower)
  if model_cfg.num_classes:
    return image
  text = decoder.param_count(model_cfg.text_tower)
  E = model_cfg.embed_dim
  heads = (model_cfg.d_model + 1) * E + (model_cfg.text_d_model + 1) * E + 2
  return {
    'total': image['total'] + text['total'] + heads,
    'non_embedding': image['non_embedding'] + text['non_embedding'] + heads,
    'embedding': image['embedding'] + text['embedding'],
  }


def flops_per_token(model_cfg: Config, seq_len: int) -> float:
  """Training FLOPs per token of a pair's `sequence_length` tokens (both towers' shares); an image
  classifier (num_classes > 0) runs the image tower alone."""
  del seq_len
  patches = vit.sequence_length(model_cfg.image_tower)
  image = vit.flops_per_token(model_cfg.image_tower, patches) * patches
  if model_cfg.num_classes:
    return image / sequence_length(model_cfg)
  text = decoder.flops_per_token(model_cfg.text_tower, model_cfg.max_len) * model_cfg.max_len
  return (image + text) / sequence_length(model_cfg)


def normalize(x_BE: jax.Array) -> jax.Array:
  return x_BE / jnp.sqrt(jnp.sum(x_BE * x_BE, axis=-1, keepdims=True) + 1e-12)


class Model(nn.Module):
  model_cfg: Config

  def setup(self):
    c = self.model_cfg
    self.image = vit.Model(c.image_tower)
    self.text = encoder.Model(c.text_tower)
    if c.num_classes:
      self.head = layers.ClassifierHead(c.num_classes, c.pool, jnp.dtype(c.param_dtype))
    else:
      self.log_scale = layers.param_with_axes(
        self, 'log_scale', nn.initializers.constant(jnp.log(c.scale_init)), (), (), jnp.float32
      )
      self.bias = layers.param_with_axes(
        self, 'bias', nn.initializers.constant(c.bias_init), (), (), jnp.float32
      )

  def __call__(self, images_BHWC, tokens_BL=None, segment_ids_BL=None):
    c = self.model_cfg
    if c.num_classes:  # An image classifier: a head on the image tower's states.
      x_BND = self.image(images_BHWC)
      if c.pool == 'mean' and c.cls_token:
        x_BND = x_BND[:, 1:]
      return self.head(x_BND, jnp.ones(x_BND.shape[:2], jnp.int32))
    return (
      self.encode_image(images_BHWC),
      self.encode_text(tokens_BL, segment_ids_BL),
      jnp.exp(self.log_scale),
      self.bias,
    )

  def encode_image(self, images_BHWC) -> jax.Array:
    return normalize(self.image(images_BHWC))

  def encode_text(self, tokens_BL, segment_ids_BL=None) -> jax.Array:
    if segment_ids_BL is None:
      segment_ids_BL = (tokens_BL > 0).astype(jnp.int32)  # Id 0 pads.
    return normalize(self.text(tokens_BL, segment_ids_BL))
