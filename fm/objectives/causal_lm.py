"""Causal language modelling: predict token t+1 from tokens <= t within the same document.

A batch holds packed windows: `tokens`, `segment_ids` (0 = padding, documents numbered from 1)
and `positions`. The target of position t is token t+1 when both lie in the same document; the
last position and document boundaries carry zero weight.
"""

import jax.numpy as jnp

from fm.objectives._losses import summarize, weighted_cross_entropy

COMPATIBLE_MODELS = ('decoder',)
__all__ = ['COMPATIBLE_MODELS', 'loss_fn', 'summarize', 'targets_and_weights']


def targets_and_weights(batch):
  tokens_BL, seg_BL = batch['tokens'], batch['segment_ids']
  targets_BL = jnp.roll(tokens_BL, -1, axis=1)
  next_seg_BL = jnp.roll(seg_BL, -1, axis=1)
  last_1L = (jnp.arange(tokens_BL.shape[1]) == tokens_BL.shape[1] - 1)[None]
  weights_BL = (seg_BL > 0) & (next_seg_BL == seg_BL) & ~last_1L
  return targets_BL, weights_BL.astype(jnp.float32)


def target_bytes(batch):
  """UTF-8 bytes of each position's target (the next token), for bits per byte."""
  return jnp.roll(batch['token_bytes'], -1, axis=1) if 'token_bytes' in batch else None


def loss_fn(apply_fn, params, batch, rng, args):
  """Mean next-token cross-entropy; metrics for loss, perplexity, accuracy and bits per byte."""
  del rng, args  # Deterministic, without options.
  targets_BL, weights_BL = targets_and_weights(batch)
  logits_BLV = apply_fn(params, batch['tokens'], batch['segment_ids'], batch['positions'])
  return weighted_cross_entropy(logits_BLV, targets_BL, weights_BL, target_bytes(batch))
