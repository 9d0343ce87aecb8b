"""What every sequence-to-sequence task shares: encoding, the teacher-forced loss, generation.

A task module provides `load(seed) -> {'train', 'validation', 'test'}` of (source, target)
pairs and `generation_metrics(predictions, references) -> {name: value}`. An encoder-decoder
reads the source and predicts the target (shifted right, starting from token 0); a decoder reads
BOS + source + EOS as a bidirectional prefix and predicts the target after it (prefix LM).

Targets are encoded with a leading space, as a word inside a pretraining document is: the
tokenizers keep whitespace (no dummy prefix), so a title's first word would otherwise become rare
word-start pieces ("W", "ill" instead of " Will"). `target_text` removes it from generated ids.
"""

import jax.numpy as jnp
import numpy as np

from fm import decoding
from fm.objectives._losses import summarize, weighted_cross_entropy

KIND = 'seq2seq'
COMPATIBLE_MODELS = ('encdec', 'decoder')
MODES = ('full', 'lora')
__all__ = [
  'COMPATIBLE_MODELS',
  'KIND',
  'MODES',
  'encode',
  'make_loss_fn',
  'prompts',
  'summarize',
  'target_text',
]


def _ids(tokenizer, text: str, limit: int) -> list[int]:
  return tokenizer.encode(text)[:limit]


def _target_ids(tokenizer, text: str, limit: int) -> list[int]:
  return _ids(tokenizer, ' ' + text, limit)


def target_text(tokenizer, ids) -> str:
  """The text of generated target ids, up to the first EOS."""
  ids = [int(i) for i in ids]
  ids = ids[: ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids
  return tokenizer.decode(ids).strip()


def encode(pairs, tokenizer, model_name: str, source_len: int, target_len: int):
  """Fixed-size training rows. Sources keep their first source_len - 2 tokens (decoder) or
  source_len - 1 (encdec); targets their first target_len - 1, then EOS."""
  n, eos = len(pairs), tokenizer.eos_id
  if model_name == 'encdec':
    rows = {k: np.zeros((n, source_len), np.int32) for k in ('inputs', 'input_segment_ids')}
    rows.update(
      {
        k: np.zeros((n, target_len), np.int32)
        for k in ('targets', 'target_segment_ids', 'decoder_in')
      }
    )
    for i, (source, target) in enumerate(pairs):
      src = _ids(tokenizer, source, source_len - 1) + [eos]
      tgt = _target_ids(tokenizer, target, target_len - 1) + [eos]
      rows['inputs'][i, : len(src)], rows['input_segment_ids'][i, : len(src)] = src, 1
      rows['targets'][i, : len(tgt)], rows['target_segment_ids'][i, : len(tgt)] = tgt, 1
      rows['decoder_in'][i, 1 : len(tgt)] = tgt[:-1]
    return rows
  L = source_len + target_len
  rows = {k: np.zeros((n, L), np.int32) for k in ('tokens', 'segment_ids')}
  rows['prefix'] = np.zeros((n, L), bool)
  rows['target_weights'] = np.zeros((n, L), np.float32)
  for i, (source, target) in enumerate(pairs):
    prompt = [tokenizer.bos_id] + _ids(tokenizer, source, source_len - 2) + [eos]
    tgt = _target_ids(tokenizer, target, target_len - 1) + [eos]
    seq = prompt + tgt
    rows['tokens'][i, : len(seq)], rows['segment_ids'][i, : len(seq)] = seq, 1
    rows['prefix'][i, : len(prompt)] = True
    rows['target_weights'][i, len(prompt) - 1 : len(seq) - 1] = 1.0  # Position t predicts t + 1.
  rows['positions'] = np.broadcast_to(np.arange(L, dtype=np.int32), (n, L)).copy()
  return rows


def prompts(pairs, tokenizer, model_name: str, source_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Generation inputs: right-padded encoder inputs, or left-padded decoder prompts."""
  eos = tokenizer.eos_id
  if model_name == 'encdec':
    tokens = np.zeros((len(pairs), source_len), np.int32)
    for i, (source, _) in enumerate(pairs):
      src = _ids(tokenizer, source, source_len - 1) + [eos]
      tokens[i, : len(src)] = src
    return tokens, (tokens > 0).astype(np.int32)
  return decoding.left_pad(
    [[tokenizer.bos_id] + _ids(tokenizer, s, source_len - 2) + [eos] for s, _ in pairs], source_len
  )


def make_loss_fn(model_name: str):
  def loss_fn(apply_fn, params, batch, rng, cfg):
    """Teacher-forced cross-entropy of the target tokens (EOS included)."""
    del rng, cfg
    if model_name == 'encdec':
      logits = apply_fn(
        params,
        batch['inputs'],
        batch['decoder_in'],
        batch['input_segment_ids'],
        batch['target_segment_ids'],
      )
      weights = (batch['target_segment_ids'] > 0).astype(np.float32)
      targets = batch['targets']
    else:
      logits = apply_fn(
        params, batch['tokens'], batch['segment_ids'], batch['positions'], batch['prefix']
      )
      targets = jnp.roll(batch['tokens'], -1, axis=1)
      weights = batch['target_weights']
    if 'weight' in batch:  # Padding rows of an evaluation batch.
      weights = weights * batch['weight'][:, None]
    return weighted_cross_entropy(logits, targets, weights)

  return loss_fn
