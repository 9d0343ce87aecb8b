"""Image-text contrastive pretraining of a two-tower model: SigLIP's sigmoid loss (Zhai et al.
2023) or CLIP's softmax loss (Radford et al. 2021), `objective_args.loss`.

Every image of the global batch is scored against every text: logits = scale * <image, text> +
bias over normalised embeddings (the model's learned scale and bias; CLIP's loss ignores the
bias, which shifts a row's logits alike). Sigmoid: each pair is a binary problem, its own
caption positive, every other text negative, summed over the pairs and divided by the images.
Softmax: the cross-entropy of each image over all texts and of each text over all images, the
mean of both directions.

Exact on a sharded batch, with memory per device that does not grow with the global batch
squared (SigLIP's chunked form): when the batch is split over the mesh's batch axes, each device
keeps its b = B / n images and passes the text embeddings round a ring of the n devices, scoring
one b x b block per hop (a rematerialised block, so the backward pass keeps the b x E text
chunks, not the blocks). The softmax's per-text log-sum-exp travels round with its texts. The
result equals the plain B x B computation (`reference`) up to float rounding.

Rows of weight 0 (an evaluation's padding) take part in nothing. The loss couples the rows of a
batch, so config.train.microbatches must be 1.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections

from fm import ConfigError, sharding
from fm.models import vit

MODALITY = 'image_text'
COMPATIBLE_MODELS = ('two_tower',)
WHOLE_BATCH = True
LOSSES = ('sigmoid', 'softmax')
ARGS = dict(loss='sigmoid')  # 'sigmoid' (SigLIP) or 'softmax' (CLIP).
_FAR = -1e9  # A logit that weighs nothing in a log-sum-exp (padding rows and columns).


def validate(args: ml_collections.ConfigDict) -> None:
  if args.loss not in LOSSES:
    raise ConfigError(
      f'config.objective_args.loss={args.loss!r} is unknown; choose one of: {", ".join(LOSSES)}.'
    )


def loss_fn(apply_fn, params, batch, rng, args):
  """The batch's contrastive loss (per image) and its summable parts."""
  del rng
  image_BE, text_BE, scale, bias = apply_fn(params, vit.pixels(batch['image']), batch['tokens'])
  weight_B = batch.get('weight', jnp.ones(image_BE.shape[0], jnp.float32))
  sums = pairwise(image_BE, text_BE, scale, bias, weight_B, args.loss)
  return sums['loss_sum'] / jnp.maximum(sums['count'], 1.0), sums


def summarize(sums: dict) -> dict[str, float]:
  return {'loss': float(sums['loss_sum']) / max(float(sums['count']), 1.0)}


def batch_axes() -> tuple[str, ...]:
  """The mesh axes (of more than one device) the batch is split over, in the mesh in effect."""
  mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return ()
  return tuple(a for a in sharding.batch_axes(rules) if mesh.shape[a] > 1)


def pairwise(image_BE, text_BE, scale, bias, weight_B, loss: str) -> dict:
  """{'loss_sum', 'count'} over the global batch: chunked round a ring of devices when the
  batch is sharded, in one block otherwise."""
  axes = batch_axes()
  if not axes:
    return _ring(image_BE, text_BE, scale, bias, weight_B, loss, None, 1)
  mesh = jax.sharding.get_abstract_mesh()
  n = math.prod(mesh.shape[a] for a in axes)
  if image_BE.shape[0] % n:
    raise ConfigError(
      f'config.train.global_batch: {image_BE.shape[0]} rows do not split over the {n} devices '
      f'of the batch axes; use a multiple of {n}.'
    )
  rows = P(axes)
  fn = jax.shard_map(
    functools.partial(_ring, loss=loss, axes=axes, n=n),
    mesh=mesh,
    in_specs=(rows, rows, P(), P(), rows),
    out_specs=P(),
    axis_names=frozenset(axes),
  )
  return fn(image_BE, text_BE, scale, bias, weight_B)


def _ring(image_bE, text_bE, scale, bias, weight_b, loss, axes, n) -> dict:
  """This device's b images against every device's texts, passed round the ring; summed over
  devices when `axes` names them."""
  image_bE, text_bE = image_bE.astype(jnp.float32), text_bE.astype(jnp.float32)
  shift = [(i, (i + 1) % n) for i in range(n)]
  own_b = scale * jnp.sum(image_bE * text_bE, -1) + bias  # Each image with its own caption.
  texts = (text_bE, weight_b, own_b, jnp.full_like(own_b, _FAR))  # The last: texts' LSE so far.
  row_lse_b = jnp.full_like(own_b, _FAR)
  # Hop 0 scores the own texts (the positives); each later hop the texts of device me - hop.
  carry, pair_loss = _block(image_bE, weight_b, scale, bias, (row_lse_b, texts), loss, True)
  if n > 1:

    def hop(carry, _):
      row_lse_b, texts = carry
      texts = jax.tree.map(lambda x: jax.lax.ppermute(x, axes, shift), texts)
      return _block(image_bE, weight_b, scale, bias, (row_lse_b, texts), loss, False)

    # One block at a time (a scan, not n blocks in flight), recomputed in the backward pass.
    carry, parts = jax.lax.scan(jax.checkpoint(hop), carry, length=n - 1)
    pair_loss = pair_loss + jnp.sum(parts)
  row_lse_b, texts = carry
  count = jnp.sum(weight_b)
  if loss == 'sigmoid':
    loss_sum = pair_loss
  else:  # Both directions' cross-entropy, wherever the texts ended up.
    _, text_weight_b, text_own_b, text_lse_b = texts
    loss_sum = 0.5 * (
      jnp.sum(weight_b * (row_lse_b - own_b)) + jnp.sum(text_weight_b * (text_lse_b - text_own_b))
    )
  sums = {'loss_sum': loss_sum, 'count': count}
  return jax.lax.psum(sums, axes) if axes else sums


def _block(image_bE, weight_b, scale, bias, carry, loss, positives):
  """One b x b block of logits: ((row LSE, texts with their LSE), its sigmoid pair losses);
  for the softmax the block's share of both log-sum-exps instead."""
  row_lse_b, (text_cE, text_weight_c, text_own_c, text_lse_c) = carry
  logits_bc = scale * image_bE @ text_cE.T + bias
  valid_bc = (weight_b[:, None] > 0) & (text_weight_c[None, :] > 0)
  if loss == 'sigmoid':
    sign_bc = 2.0 * jnp.eye(*logits_bc.shape) - 1.0 if positives else -1.0
    pair = -jnp.sum(jnp.where(valid_bc, jax.nn.log_sigmoid(sign_bc * logits_bc), 0.0))
    return carry, pair
  masked_bc = jnp.where(valid_bc, logits_bc, _FAR)
  row_lse_b = jnp.logaddexp(row_lse_b, jax.nn.logsumexp(masked_bc, axis=1))
  text_lse_c = jnp.logaddexp(text_lse_c, jax.nn.logsumexp(masked_bc, axis=0))
  return (row_lse_b, (text_cE, text_weight_c, text_own_c, text_lse_c)), jnp.zeros(())


def reference(image_BE, text_BE, scale, bias, weight_B, loss: str) -> jax.Array:
  """The loss per image computed plainly on the whole B x B matrix (tests compare with it)."""
  logits = scale * image_BE @ text_BE.T + bias
  real = weight_B > 0
  valid = real[:, None] & real[None, :]
  count = jnp.maximum(jnp.sum(real), 1)
  if loss == 'sigmoid':
    labels = 2.0 * jnp.eye(len(logits)) - 1.0
    return -jnp.sum(jnp.where(valid, jax.nn.log_sigmoid(labels * logits), 0.0)) / count
  masked = jnp.where(valid, logits, -jnp.inf)
  own = jnp.diagonal(logits)
  i2t = jnp.where(real, jax.nn.logsumexp(masked, axis=1) - own, 0.0)
  t2i = jnp.where(real, jax.nn.logsumexp(masked, axis=0) - own, 0.0)
  return 0.5 * (jnp.sum(i2t) + jnp.sum(t2i)) / count


def retrieval(image_NE, text_NE, ks=(1, 5)) -> dict[str, float]:
  """Recall@k both ways over N pairs (row i of each is a pair): the share of images whose own
  caption ranks in the top k of all N captions (image_to_text), and of captions whose image
  does (text_to_image); chance is k / N."""
  similarity = jnp.asarray(image_NE, jnp.float32) @ jnp.asarray(text_NE, jnp.float32).T
  own = jnp.diagonal(similarity)
  # Rank of the own pair: how many candidates score strictly higher.
  i2t_rank = jnp.sum(similarity > own[:, None], axis=1)
  t2i_rank = jnp.sum(similarity > own[None, :], axis=0)
  out = {}
  for k in ks:
    out[f'image_to_text_recall@{k}'] = float(jnp.mean(i2t_rank < k))
    out[f'text_to_image_recall@{k}'] = float(jnp.mean(t2i_rank < k))
    out[f'chance@{k}'] = k / len(own)
  return out
