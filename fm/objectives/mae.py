"""Masked autoencoding (He et al. 2022): most patches hidden, the rest encoded, all predicted.

A host-side transform draws, per image, a random order of its patches (seeded by the image's
position in the stream: deterministic, resumable, the same for any number of processes) and
keeps the first (1 - mask_ratio) share: the ViT's encoder sees only those (`keep`); a light
decoder (the model's decoder_* fields) puts a learned mask token at every other patch (`restore`
gives each patch's place) and predicts every patch's pixels. The loss is the mean squared error
on the masked patches only, of pixels normalised per patch (norm_pix_loss) or raw.
"""

import jax.numpy as jnp
import ml_collections
import numpy as np

from fm import ConfigError
from fm.models import vit

MODALITY = 'image'
COMPATIBLE_MODELS = ('vit',)
ARGS = dict(
  mask_ratio=0.75,  # Share of each image's patches hidden from the encoder.
  norm_pix_loss=True,  # Targets: each patch's pixels minus their mean, over their std.
)


def validate(args: ml_collections.ConfigDict) -> None:
  if not 0 < args.mask_ratio < 1:
    raise ConfigError(
      f'config.objective_args.mask_ratio={args.mask_ratio} must lie in (0, 1): some patches '
      f'hidden, some seen.'
    )


def host_transform(num_patches: int, args: ml_collections.ConfigDict):
  """example, rng -> example with `keep` (indices of the seen patches), `restore` (each
  patch's place in kept-then-masked order) and `mask` (1 where hidden)."""
  kept = max(1, round(num_patches * (1 - args.mask_ratio)))

  def choose(example: dict, rng: np.random.Generator) -> dict:
    order = rng.permutation(num_patches)
    mask = np.ones(num_patches, np.float32)
    mask[order[:kept]] = 0
    return {
      **example,
      'keep': order[:kept].astype(np.int32),
      'restore': np.argsort(order).astype(np.int32),
      'mask': mask,
    }

  return choose


def loss_fn(apply_fn, params, batch, rng, args):
  """Mean squared error per masked patch (of normalised pixels), over real images."""
  del rng
  images = vit.pixels(batch['image'])
  predicted_BNX = apply_fn(params, images, batch['keep'], batch['restore'])
  patch = predicted_BNX.shape[-1]
  P = int(round((patch / images.shape[-1]) ** 0.5))
  target_BNX = vit.patchify(images, P)
  if args.norm_pix_loss:
    mean = target_BNX.mean(-1, keepdims=True)
    var = target_BNX.var(-1, keepdims=True)
    target_BNX = (target_BNX - mean) / jnp.sqrt(var + 1e-6)
  error_BN = jnp.mean((predicted_BNX.astype(jnp.float32) - target_BNX) ** 2, axis=-1)
  weight_BN = batch['mask'] * batch.get('weight', jnp.ones(error_BN.shape[0]))[:, None]
  metrics = {'loss_sum': jnp.sum(error_BN * weight_BN), 'count': jnp.sum(weight_BN)}
  return metrics['loss_sum'] / jnp.maximum(metrics['count'], 1.0), metrics


def summarize(sums: dict) -> dict[str, float]:
  return {'loss': float(sums['loss_sum']) / max(float(sums['count']), 1.0)}
