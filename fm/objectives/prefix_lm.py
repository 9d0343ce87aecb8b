"""Prefix language modelling: a random split point per sequence; the prefix is read
bidirectionally and the loss covers only the tokens after it.

The split is drawn inside the step from the step's rng (deterministic and resumable); evals use
a fixed key, so they score the same splits every time.
"""

import jax
import jax.numpy as jnp

from fm.objectives import causal_lm
from fm.objectives._losses import summarize, weighted_cross_entropy

COMPATIBLE_MODELS = ('decoder',)
__all__ = ['COMPATIBLE_MODELS', 'loss_fn', 'summarize', 'split']


def split(rng, batch):
  """prefix_BL: True for positions before a uniform split point in [1, L-1] per row."""
  B, L = batch['tokens'].shape
  split_B = jax.random.randint(rng, (B,), 1, L)
  return jnp.arange(L)[None, :] < split_B[:, None]


def loss_fn(apply_fn, params, batch, rng, args):
  del args  # No options.
  prefix_BL = split(rng, batch)
  targets_BL, weights_BL = causal_lm.targets_and_weights(batch)
  # Position t predicts token t+1: it counts when t+1 lies after the prefix.
  weights_BL = weights_BL * ~jnp.roll(prefix_BL, -1, axis=1)
  logits_BLV = apply_fn(
    params, batch['tokens'], batch['segment_ids'], batch['positions'], prefix_BL
  )
  return weighted_cross_entropy(logits_BLV, targets_BL, weights_BL, causal_lm.target_bytes(batch))
