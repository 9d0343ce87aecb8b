"""UL2's mixture of denoisers (Tay et al. 2022) on an encoder-decoder.

Each window draws one denoiser, with the probabilities in `objective_args.mixture`:

- R (regular): T5 span corruption with short spans, e.g. (mean span 3, density 0.15);
- X (extreme): long spans or a high noise density, e.g. (64, 0.5);
- S (sequential): prefix LM; the encoder reads a prefix, the decoder predicts the rest (its
  length drawn uniformly around `s_density` of the window).

R and X draw one (mean span, density) pair uniformly from `r_spans` / `x_spans`. The encoder
input starts with the denoiser's mode token ([R], [S], [X], placed after the 100 sentinels past
the tokenizer's vocabulary), so a downstream user can pick the mode by prompt. Inputs and targets
of all denoisers are padded to one shape (segment id 0 = padding, weight 0), fixed by the window
length and the configured denoisers. Drawn on the host per window (grain `random_map`), so the
mixture is deterministic per seed and resumes with the iterator state. Evaluations report the
loss of each denoiser as `loss_R`, `loss_S`, `loss_X`.
"""

import functools

import ml_collections
import numpy as np

from fm import ConfigError
from fm.objectives import span_corruption
from fm.objectives._losses import summarize as _summarize
from fm.objectives._losses import weighted_cross_entropy

COMPATIBLE_MODELS = ('encdec',)
MODES = ('R', 'S', 'X')
EXTRA_TOKENS = span_corruption.EXTRA_TOKENS + len(MODES)  # Sentinels, then the mode tokens.
ARGS = dict(
  mixture=dict(R=0.4, S=0.2, X=0.4),  # Probability of each denoiser (normalised).
  r_spans=((3.0, 0.15), (8.0, 0.15)),  # R's (mean span length, noise density) pairs.
  x_spans=((3.0, 0.5), (8.0, 0.5), (64.0, 0.15), (64.0, 0.5)),  # X's pairs.
  s_density=0.25,  # S: the mean share of a window that the decoder predicts.
)
__all__ = [
  'ARGS',
  'COMPATIBLE_MODELS',
  'EXTRA_TOKENS',
  'MODES',
  'denoisers',
  'host_transform',
  'loss_fn',
  'row_lengths',
  'summarize',
  'validate',
]


def denoisers(args: ml_collections.ConfigDict) -> tuple[np.ndarray, dict]:
  """(probability of R, S, X; {'R': spans, 'X': spans, 'S': density}) of the objective's args."""
  mixture = dict(args.mixture)
  if set(mixture) != set(MODES) or min(mixture.values()) < 0 or sum(mixture.values()) <= 0:
    raise ConfigError(
      f'config.objective_args.mixture={mixture} must give a weight >= 0 to each '
      f'of R, S and X (not all zero), e.g. {ARGS["mixture"]}.'
    )
  probs = np.array([mixture[m] for m in MODES], np.float64)
  spans = {
    m: tuple(tuple(map(float, p)) for p in args[key])
    for m, key in (('R', 'r_spans'), ('X', 'x_spans'))
  }
  for m, pairs in spans.items():
    if not pairs or any(len(p) != 2 or p[0] < 1 or not 0 < p[1] < 1 for p in pairs):
      raise ConfigError(
        f'config.objective_args.{m.lower()}_spans={pairs} must be a non-empty '
        f'list of (mean span length >= 1, noise density in (0, 1)) pairs.'
      )
  s_density = float(args.s_density)
  if not 0 < s_density <= 0.5:
    raise ConfigError(f'config.objective_args.s_density={s_density} must lie in (0, 0.5].')
  return probs / probs.sum(), {**spans, 'S': s_density}


def validate(args: ml_collections.ConfigDict) -> None:
  denoisers(args)


def row_lengths(seq_len: int, args: ml_collections.ConfigDict) -> tuple[int, int]:
  """(encoder input length, decoder target length): the longest any denoiser produces (every
  denoiser's rows are padded to them)."""
  _, d = denoisers(args)
  pairs = d['R'] + d['X']
  inputs = [span_corruption.lengths(seq_len, density, span)[2] for span, density in pairs]
  targets = [sum(span_corruption.lengths(seq_len, density, span)[:2]) for span, density in pairs]
  s_max = _s_max_target(seq_len, d['S'])
  return 1 + max(inputs + [seq_len - 1]), max(targets + [s_max])


def _s_max_target(seq_len: int, density: float) -> int:
  return min(max(int(round(2 * density * seq_len)), 1), seq_len - 1)


def host_transform(vocab_size: int, args: ml_collections.ConfigDict):
  probs, d = denoisers(args)
  mode_ids = vocab_size + span_corruption.EXTRA_TOKENS + np.arange(len(MODES))
  shape = functools.lru_cache(lambda L: row_lengths(L, args))  # Per window length, not per window.

  def corrupt(window: dict, rng: np.random.Generator) -> dict:
    tokens = window['tokens']
    L = len(tokens)
    input_len, target_len = shape(L)
    if not (window['segment_ids'] > 0).any():  # A padding window (evaluation): all weight 0.
      z = lambda n: np.zeros(n, np.int32)
      return {
        'inputs': z(input_len),
        'input_segment_ids': z(input_len),
        'targets': z(target_len),
        'target_segment_ids': z(target_len),
        'decoder_in': z(target_len),
        'mode': np.int32(-1),
      }
    mode = int(rng.choice(len(MODES), p=probs))
    if MODES[mode] == 'S':
      suffix = int(rng.integers(1, _s_max_target(L, d['S']) + 1))
      inputs, targets = tokens[: L - suffix], tokens[L - suffix :]
    else:
      span, density = d[MODES[mode]][rng.integers(len(d[MODES[mode]]))]
      inputs, targets = span_corruption.corrupt_tokens(tokens, density, span, rng, vocab_size)
    inputs = np.r_[mode_ids[mode], inputs]
    pad = lambda x, n: np.r_[x, np.zeros(n - len(x), x.dtype)].astype(np.int32)
    real = lambda x, n: pad(np.ones(len(x), np.int32), n)
    return {
      'inputs': pad(inputs, input_len),
      'input_segment_ids': real(inputs, input_len),
      'targets': pad(targets, target_len),
      'target_segment_ids': real(targets, target_len),
      'decoder_in': pad(np.r_[0, targets[:-1]], target_len),
      'mode': np.int32(mode),
    }

  return corrupt


def loss_fn(apply_fn, params, batch, rng, args):
  """Cross-entropy of the decoder's targets, with each denoiser's share as summable metrics."""
  del rng, args
  logits_BLV = apply_fn(
    params,
    batch['inputs'],
    batch['decoder_in'],
    batch['input_segment_ids'],
    batch['target_segment_ids'],
  )
  weights_BL = (batch['target_segment_ids'] > 0).astype(np.float32)
  loss, metrics = weighted_cross_entropy(logits_BLV, batch['targets'], weights_BL)
  for i, m in enumerate(MODES):
    mode_BL = weights_BL * (batch['mode'] == i)[:, None]
    _, part = weighted_cross_entropy(logits_BLV, batch['targets'], mode_BL)
    metrics[f'loss_sum_{m}'], metrics[f'count_{m}'] = part['loss_sum'], part['count']
  return loss, metrics


def summarize(sums: dict[str, float]) -> dict[str, float]:
  out = _summarize(sums)
  for m in MODES:
    if sums.get(f'count_{m}'):
      out[f'loss_{m}'] = sums[f'loss_sum_{m}'] / sums[f'count_{m}']
  return out
