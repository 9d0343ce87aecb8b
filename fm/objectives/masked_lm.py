"""BERT masked language modelling: 15% of tokens chosen, 80% masked, 10% random, 10% kept.

Masking is a host-side transform (`host_transform`), applied in the grain pipeline with a
per-window random generator, so it is deterministic per seed, identical for any number of
processes, and resumes with the iterator state. The loss covers the chosen positions only.
"""

import ml_collections
import numpy as np

from fm.objectives._losses import summarize, weighted_cross_entropy

COMPATIBLE_MODELS = ('encoder',)
__all__ = ['ARGS', 'COMPATIBLE_MODELS', 'EXTRA_TOKENS', 'host_transform', 'loss_fn', 'summarize']
ARGS = dict(mask_rate=0.15)  # Share of the tokens chosen for prediction.
EXTRA_TOKENS = 1  # The [MASK] id, placed right after the tokenizer's vocabulary.
FIRST_TEXT_ID = 4  # Random replacements avoid pad/unk/bos/eos.


def host_transform(vocab_size: int, args: ml_collections.ConfigDict):
  """window, rng -> window with corrupted `tokens`, original `targets` and `target_weights`."""
  rate = args.mask_rate
  mask_id = vocab_size

  def corrupt(window: dict, rng: np.random.Generator) -> dict:
    tokens = window['tokens']
    chosen = (rng.random(tokens.shape) < rate) & (window['segment_ids'] > 0)
    action = rng.random(tokens.shape)
    corrupted = np.where(chosen & (action < 0.8), mask_id, tokens)
    random_ids = rng.integers(FIRST_TEXT_ID, vocab_size, tokens.shape)
    corrupted = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, corrupted)
    return {
      **window,
      'tokens': corrupted.astype(np.int32),
      'targets': tokens,
      'target_weights': chosen.astype(np.float32),
    }

  return corrupt


def loss_fn(apply_fn, params, batch, rng, args):
  """Cross-entropy on the chosen positions; accuracy and perplexity over them too."""
  del rng, args
  logits_BLV = apply_fn(params, batch['tokens'], batch['segment_ids'], batch['positions'])
  return weighted_cross_entropy(logits_BLV, batch['targets'], batch['target_weights'])
