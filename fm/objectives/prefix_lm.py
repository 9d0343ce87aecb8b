"""Prefix language modelling: a random split point per sequence; the prefix is read
bidirectionally and the loss covers only the tokens after it.

The split is drawn inside the step from the step's rng (deterministic and resumable); evals use
a fixed key, so they score the same splits every time.
"""

import jax
import jax.numpy as jnp

from fm.objectives import causal_lm
from fm.objectives._losses import summarize

COMPATIBLE_MODELS = ('decoder',)
ARGS = causal_lm.ARGS  # vocab_chunk, as in causal LM.
validate = causal_lm.validate
__all__ = ['ARGS', 'COMPATIBLE_MODELS', 'loss_fn', 'summarize', 'split', 'validate']


def split(rng, batch):
  """prefix_BL: True for positions before a uniform split point in [1, L-1] per row."""
  B, L = batch['tokens'].shape
  split_B = jax.random.randint(rng, (B,), 1, L)
  return jnp.arange(L)[None, :] < split_B[:, None]


def loss_fn(apply_fn, params, batch, rng, args):
  prefix_BL = split(rng, batch)
  targets_BL, weights_BL = causal_lm.targets_and_weights(batch)
  # Position t predicts token t+1: it counts when t+1 lies after the prefix.
  weights_BL = weights_BL * ~jnp.roll(prefix_BL, -1, axis=1)
  inputs = (batch['tokens'], batch['segment_ids'], batch['positions'], prefix_BL)
  return causal_lm.cross_entropy(apply_fn, params, inputs, targets_BL, weights_BL, batch, args)
