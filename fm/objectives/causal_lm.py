"""Causal language modelling: predict token t+1 from tokens <= t within the same document.

A batch holds packed windows: `tokens`, `segment_ids` (0 = padding, documents numbered from 1)
and `positions`. The target of position t is token t+1 when both lie in the same document; the
last position and document boundaries carry zero weight.
"""

import jax.numpy as jnp

from fm import ConfigError
from fm.objectives._losses import chunked_cross_entropy, summarize, weighted_cross_entropy

COMPATIBLE_MODELS = ('decoder',)
# vocab_chunk: > 0 computes the cross-entropy that many vocabulary entries at a time, so the
# float32 logits of the whole batch never exist at once (the same loss); 0: all at once.
ARGS = {'vocab_chunk': 0}
__all__ = [
  'ARGS',
  'COMPATIBLE_MODELS',
  'cross_entropy',
  'loss_fn',
  'summarize',
  'targets_and_weights',
  'validate',
]


def validate(args) -> None:
  if args.vocab_chunk < 0:
    raise ConfigError(
      f'config.objective_args.vocab_chunk={args.vocab_chunk} must be >= 0 (0: the whole '
      f'vocabulary at once).'
    )


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


def cross_entropy(apply_fn, params, inputs: tuple, targets_BL, weights_BL, batch, args):
  """The weighted cross-entropy of the model's logits for `inputs`: whole, or (with
  args.vocab_chunk) from the logits' parts, a chunk of the vocabulary at a time."""
  chunk = args.get('vocab_chunk', 0) if args else 0
  if chunk:
    x_BLD, w_VD, scale = apply_fn(params, *inputs, hidden=True)
    return chunked_cross_entropy(
      x_BLD, w_VD, scale, targets_BL, weights_BL, target_bytes(batch), chunk
    )
  logits_BLV = apply_fn(params, *inputs)
  return weighted_cross_entropy(logits_BLV, targets_BL, weights_BL, target_bytes(batch))


def loss_fn(apply_fn, params, batch, rng, args):
  """Mean next-token cross-entropy; metrics for loss, perplexity, accuracy and bits per byte."""
  del rng  # Deterministic.
  targets_BL, weights_BL = targets_and_weights(batch)
  inputs = (batch['tokens'], batch['segment_ids'], batch['positions'])
  return cross_entropy(apply_fn, params, inputs, targets_BL, weights_BL, batch, args)
