"""T5 span corruption: 15% of tokens in spans of mean length 3 become sentinels.

The encoder reads the window with each noise span replaced by its own sentinel; the decoder
predicts each sentinel followed by the tokens it hid (Raffel et al. 2020, section 3.1.4). Spans
are drawn on the host (grain `random_map`, seeded per window), so inputs and targets have fixed
lengths for a given window length. Sentinel ids follow the tokenizer's vocabulary, so they never
collide with text.
"""

import ml_collections
import numpy as np

from fm.objectives._losses import summarize, weighted_cross_entropy

COMPATIBLE_MODELS = ('encdec',)
EXTRA_TOKENS = 100  # Sentinels.
ARGS = dict(
  noise_density=0.15,  # Share of a window's tokens hidden in spans.
  mean_span=3.0,  # Mean length of a hidden span.
)
__all__ = [
  'ARGS',
  'COMPATIBLE_MODELS',
  'EXTRA_TOKENS',
  'corrupt_tokens',
  'host_transform',
  'lengths',
  'loss_fn',
  'summarize',
  'reassemble',
  'row_lengths',
]


def lengths(seq_len: int, density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int, int]:
  """(noise tokens, spans, encoder input length) for a window of `seq_len` tokens: fixed, so
  inputs (input length) and targets (noise tokens + spans) have fixed shapes."""
  num_noise = min(max(int(round(seq_len * density)), 1), seq_len - 1)
  num_spans = max(int(round(num_noise / mean_span)), 1)
  return num_noise, num_spans, seq_len - num_noise + num_spans


def row_lengths(seq_len: int, args: ml_collections.ConfigDict) -> tuple[int, int]:
  """(encoder input length, decoder target length) of a window's row."""
  num_noise, num_spans, input_len = lengths(seq_len, args.noise_density, args.mean_span)
  return input_len, num_noise + num_spans


def noise_mask(seq_len: int, density: float, mean_span: float, rng: np.random.Generator):
  """T5's random_spans_noise_mask: alternating non-noise / noise runs, starting with non-noise."""
  num_noise, num_spans, _ = lengths(seq_len, density, mean_span)

  def partition(n, k):  # n items into k non-empty runs, uniformly.
    cuts = np.sort(rng.choice(np.arange(1, n), k - 1, replace=False))
    return np.diff(np.r_[0, cuts, n])

  runs = np.stack([partition(seq_len - num_noise, num_spans), partition(num_noise, num_spans)], 1)
  return np.repeat(np.tile([False, True], num_spans), runs.reshape(-1))


def corrupt_tokens(
  tokens: np.ndarray,
  density: float,
  mean_span: float,
  rng: np.random.Generator,
  first_sentinel: int,
) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets): each noise span replaced by its own sentinel in the inputs; the targets
  list each sentinel followed by the tokens it hides. Span i gets id first_sentinel + i."""
  noise = noise_mask(len(tokens), density, mean_span, rng)
  first = noise & ~np.r_[False, noise[:-1]]
  sentinel = first_sentinel + np.cumsum(first) - 1
  inputs = np.where(first, sentinel, tokens)[~noise | first]
  order = np.argsort(np.r_[np.flatnonzero(first) - 0.5, np.flatnonzero(noise)], kind='stable')
  targets = np.r_[sentinel[first], tokens[noise]][order]
  return inputs.astype(np.int32), targets.astype(np.int32)


def host_transform(vocab_size: int, args: ml_collections.ConfigDict):
  density, mean_span = args.noise_density, args.mean_span

  def corrupt(window: dict, rng: np.random.Generator) -> dict:
    L = len(window['tokens'])
    num_noise, num_spans, input_len = lengths(L, density, mean_span)
    target_len = num_noise + num_spans
    if not (window['segment_ids'] > 0).any():  # A padding window (evaluation): all weight 0.
      zeros = lambda n: np.zeros(n, np.int32)
      return {
        'inputs': zeros(input_len),
        'input_segment_ids': zeros(input_len),
        'targets': zeros(target_len),
        'target_segment_ids': zeros(target_len),
        'decoder_in': zeros(target_len),
      }
    inputs, targets = corrupt_tokens(window['tokens'], density, mean_span, rng, vocab_size)
    ones = lambda n: np.ones(n, np.int32)
    return {
      'inputs': inputs,
      'input_segment_ids': ones(input_len),
      'targets': targets,
      'target_segment_ids': ones(target_len),
      'decoder_in': np.r_[0, targets[:-1]].astype(np.int32),
    }  # Shifted right, 0 starts.

  return corrupt


def reassemble(inputs: np.ndarray, targets: np.ndarray, vocab_size: int) -> np.ndarray:
  """The original window from a corrupted pair: each input sentinel replaced by its span."""
  is_sentinel = targets >= vocab_size
  spans = np.split(targets, np.flatnonzero(is_sentinel))[1:]
  by_id = {int(s[0]): s[1:] for s in spans}
  return np.concatenate([by_id[int(t)] if t >= vocab_size else [t] for t in inputs])


def loss_fn(apply_fn, params, batch, rng, args):
  """Cross-entropy of the decoder's predictions of every sentinel and hidden token."""
  del rng, args
  logits_BLV = apply_fn(
    params,
    batch['inputs'],
    batch['decoder_in'],
    batch['input_segment_ids'],
    batch['target_segment_ids'],
  )
  weights_BL = (batch['target_segment_ids'] > 0).astype(np.float32)
  return weighted_cross_entropy(logits_BLV, batch['targets'], weights_BL)
