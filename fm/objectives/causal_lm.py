"""Causal language modelling: predict token t+1 from tokens <= t within the same document.

A batch holds packed windows: `tokens`, `segment_ids` (0 = padding, documents numbered from 1)
and `positions`. The target of position t is token t+1 when both lie in the same document; the
last position and document boundaries carry zero weight.
"""
import math

import jax.numpy as jnp
import ml_collections
import optax

COMPATIBLE_MODELS = ('decoder',)
LN2 = math.log(2.0)


def targets_and_weights(batch):
  tokens_BL, seg_BL = batch['tokens'], batch['segment_ids']
  targets_BL = jnp.roll(tokens_BL, -1, axis=1)
  next_seg_BL = jnp.roll(seg_BL, -1, axis=1)
  last_BL = jnp.arange(tokens_BL.shape[1]) == tokens_BL.shape[1] - 1
  weights_BL = (seg_BL > 0) & (next_seg_BL == seg_BL) & ~last_BL
  return targets_BL, weights_BL.astype(jnp.float32)


def loss_fn(apply_fn, params, batch, rng, cfg: ml_collections.ConfigDict):
  """Mean next-token cross-entropy over weighted targets, plus summable metric parts.

  Metrics are returned as sums and counts so that averages over many batches and devices are
  exact; the batch's `token_bytes` (UTF-8 bytes each token stands for) gives bits per byte.
  """
  del rng, cfg  # Deterministic objective.
  targets_BL, weights_BL = targets_and_weights(batch)
  logits_BLV = apply_fn(params, batch['tokens'], batch['segment_ids'], batch['positions'])
  token_loss_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
  count = jnp.sum(weights_BL)
  loss_sum = jnp.sum(token_loss_BL * weights_BL)
  loss = loss_sum / jnp.maximum(count, 1.0)
  correct = jnp.sum((jnp.argmax(logits_BLV, -1) == targets_BL) * weights_BL)
  metrics = {'loss_sum': loss_sum, 'correct_sum': correct, 'count': count}
  if 'token_bytes' in batch:
    metrics['bytes'] = jnp.sum(jnp.roll(batch['token_bytes'], -1, axis=1) * weights_BL)
  return loss, metrics


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Turns accumulated sums into loss, perplexity, accuracy and bits per byte."""
  count = max(sums['count'], 1.0)
  loss = sums['loss_sum'] / count
  out = {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
         'accuracy': sums['correct_sum'] / count}
  if sums.get('bytes'):
    out['bits_per_byte'] = sums['loss_sum'] / LN2 / sums['bytes']
  return out
