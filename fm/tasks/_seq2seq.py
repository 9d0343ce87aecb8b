"""The sequence-to-sequence kind: encoding, the teacher-forced loss, generation and its scores.

A seq2seq task module provides `load(seed) -> {'train', 'validation', 'test'}` of (source,
target) pairs and `generation_metrics(predictions, references) -> {name: value}`. How a model
reads the source is its family's SEQ2SEQ layout: 'encdec' (an encoder reads the source; the
decoder predicts the target, shifted right, starting from token 0) or 'prefix_lm' (a decoder
reads BOS + source + EOS as a bidirectional prefix and predicts the target after it).

Targets are encoded with a leading space, as a word inside a pretraining document is: the
tokenizers keep whitespace (no dummy prefix), so a title's first word would otherwise become rare
word-start pieces ("W", "ill" instead of " Will"). `target_text` removes it from generated ids.
"""

from collections.abc import Callable
from typing import Any, Protocol

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from fm import ConfigError, decoding, sharding
from fm.objectives._losses import summarize, weighted_cross_entropy
from fm.tasks import Task

MODES = ('full', 'lora')
__all__ = ['summarize']


class TaskContract(Task, Protocol):
  """What a seq2seq task module provides, besides `Task`'s names."""

  def generation_metrics(self, predictions: list[str], references: list[str]) -> dict[str, float]:
    """Scores of generated targets against the references (ROUGE, BLEU, ...)."""


TASK_DEFAULTS: dict[str, Any] = {'MODES': MODES}
DATA_KEYS = ('source_len', 'target_len')  # Required config.data keys: tokens of each side.
ARGS = dict(eval_examples=200)  # config.task_args: test examples decoded and scored at the end.
FINETUNE = dict(  # config.finetune keys of this kind.
  beams=4,  # Beam width of the beam-search scores (greedy decoding is scored too).
  no_repeat_ngram=0,  # n > 0: decoding never repeats an n-gram it generated.
)


# =============================================================================================
# The kind's interface (fm/finetune.py)
# =============================================================================================
def row_length(config: ml_collections.ConfigDict) -> int:
  """Tokens per row, both sides."""
  return config.data.source_len + config.data.target_len


def validate(task, config: ml_collections.ConfigDict) -> None:
  """Nothing beyond the shared checks."""
  del task, config


def load(task, config: ml_collections.ConfigDict) -> dict[str, list]:
  return task.load(seed=config.task_args.split_seed)


def transform(task, config: ml_collections.ConfigDict) -> None:
  """Text rows are used as encoded."""
  del task, config


def check_backbone(task, config: ml_collections.ConfigDict, family_name: str, family) -> None:
  """The backbone must be able to write a target."""
  del config
  if family.SEQ2SEQ not in LAYOUTS:
    raise ConfigError(
      f'config.task={task.__name__.split(".")[-1]!r} (seq2seq) cannot use a {family_name!r} '
      f'backbone, which cannot write a target (it has no SEQ2SEQ layout); use a decoder or an '
      f'encoder-decoder backbone.'
    )


def trains(config: ml_collections.ConfigDict) -> bool:
  del config
  return True


def model_fields(task, config: ml_collections.ConfigDict, family) -> dict[str, Any]:
  """The LM head writes the target: no extra head."""
  del task, config, family
  return {}


def encode_splits(task, named: dict[str, list], tokenizer, config, family):
  """Rows of every split in the family's layout."""
  del task
  return {
    k: encode(v, tokenizer, family.SEQ2SEQ, config.data.source_len, config.data.target_len)
    for k, v in named.items()
  }


def make_loss(task, config: ml_collections.ConfigDict, family, model_cfg) -> Callable:
  """The teacher-forced loss in the family's layout."""
  del task, config, model_cfg
  return make_loss_fn(family.SEQ2SEQ)


def generation(task, config, tokenizer, family, model_cfg, examples, mesh, rules, workdir):
  """params -> generation metrics (greedy_* and beam<k>_*) on the first
  `config.task_args.eval_examples` test `examples`, decoded with the KV cache on the training
  mesh; the first predictions are written to WORKDIR/samples.txt."""
  layout = family.SEQ2SEQ
  pairs = examples[: config.task_args.eval_examples]
  tokens, seg = prompts(pairs, tokenizer, layout, config.data.source_len)
  batch, max_new = config.train.global_batch, config.data.target_len
  beams, ngram = config.finetune.beams, config.finetune.no_repeat_ngram
  pidx, pcount = jax.process_index(), jax.process_count()
  references = [t for _, t in pairs]

  def decode_all(params, fn):
    out = []
    for i in range(0, len(pairs), batch):
      rows = {'tokens': tokens[i : i + batch], 'segment_ids': seg[i : i + batch]}
      real = len(rows['tokens'])
      rows = {
        k: np.concatenate([v, np.zeros((batch - real, v.shape[1]), v.dtype)])[
          pidx * batch // pcount : (pidx + 1) * batch // pcount
        ]
        for k, v in rows.items()
      }
      rows = sharding.put_batch(rows, mesh, rules)
      generated = multihost_utils.process_allgather(
        fn(params, rows['tokens'], rows['segment_ids']), tiled=True
      )
      out += [target_text(tokenizer, row) for row in np.asarray(generated)[:real]]
    return out

  def run(params):
    limit = tokenizer.vocab_size  # Never padding ids of the vocabulary or sentinels.
    greedy = lambda p, t, s: decoding.greedy(layout, model_cfg, p, t, s, max_new, limit, ngram)
    beam = lambda p, t, s: decoding.beam_search(
      layout,
      model_cfg,
      p,
      t,
      s,
      max_new,
      beams,
      tokenizer.eos_id,
      vocab_limit=limit,
      no_repeat_ngram=ngram,
    )
    metrics, samples = {}, {}
    for name, fn in (('greedy', greedy), (f'beam{beams}', beam)):
      samples[name] = decode_all(params, fn)
      scores = task.generation_metrics(samples[name], references)
      metrics.update({f'{name}_{k}': v for k, v in scores.items()})
    if pidx == 0:
      lines = []
      for i in range(min(20, len(pairs))):
        lines += (
          [f'source:    {pairs[i][0][:300]}', f'reference: {references[i]}']
          + [f'{name + ":":<10} {samples[name][i]}' for name in samples]
          + ['']
        )
      (workdir / 'samples.txt').write_text('\n'.join(lines))
    return metrics

  return run


# =============================================================================================
# Rows and loss
# =============================================================================================
def _ids(tokenizer, text: str, limit: int) -> list[int]:
  return tokenizer.encode(text)[:limit]


def _target_ids(tokenizer, text: str, limit: int) -> list[int]:
  return _ids(tokenizer, ' ' + text, limit)


def target_text(tokenizer, ids) -> str:
  """The text of generated target ids, up to the first EOS."""
  ids = [int(i) for i in ids]
  ids = ids[: ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids
  return tokenizer.decode(ids).strip()


class EncoderDecoder:
  """'encdec': the encoder reads the source (right-padded, ending in EOS); the decoder predicts
  the target (ending in EOS) from the target shifted right, starting at token 0."""

  @staticmethod
  def encode(pairs, tokenizer, source_len: int, target_len: int) -> dict[str, np.ndarray]:
    n, eos = len(pairs), tokenizer.eos_id
    rows = {k: np.zeros((n, source_len), np.int32) for k in ('inputs', 'input_segment_ids')}
    for k in ('targets', 'target_segment_ids', 'decoder_in'):
      rows[k] = np.zeros((n, target_len), np.int32)
    for i, (source, target) in enumerate(pairs):
      src = _ids(tokenizer, source, source_len - 1) + [eos]
      tgt = _target_ids(tokenizer, target, target_len - 1) + [eos]
      rows['inputs'][i, : len(src)], rows['input_segment_ids'][i, : len(src)] = src, 1
      rows['targets'][i, : len(tgt)], rows['target_segment_ids'][i, : len(tgt)] = tgt, 1
      rows['decoder_in'][i, 1 : len(tgt)] = tgt[:-1]
    return rows

  @staticmethod
  def prompts(pairs, tokenizer, source_len: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(pairs), source_len), np.int32)
    for i, (source, _) in enumerate(pairs):
      src = _ids(tokenizer, source, source_len - 1) + [tokenizer.eos_id]
      tokens[i, : len(src)] = src
    return tokens, (tokens > 0).astype(np.int32)

  @staticmethod
  def scored(apply_fn, params, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    inputs = ('inputs', 'decoder_in', 'input_segment_ids', 'target_segment_ids')
    logits = apply_fn(params, *(batch[k] for k in inputs))
    return logits, batch['targets'], (batch['target_segment_ids'] > 0).astype(np.float32)


class PrefixLM:
  """'prefix_lm': one sequence BOS + source + EOS + target + EOS; the source is read
  bidirectionally as a prefix and the target predicted after it."""

  @staticmethod
  def encode(pairs, tokenizer, source_len: int, target_len: int) -> dict[str, np.ndarray]:
    n, L = len(pairs), source_len + target_len
    rows = {k: np.zeros((n, L), np.int32) for k in ('tokens', 'segment_ids')}
    rows['prefix'] = np.zeros((n, L), bool)
    rows['target_weights'] = np.zeros((n, L), np.float32)
    for i, (source, target) in enumerate(pairs):
      prompt = [tokenizer.bos_id] + _ids(tokenizer, source, source_len - 2) + [tokenizer.eos_id]
      tgt = _target_ids(tokenizer, target, target_len - 1) + [tokenizer.eos_id]
      seq = prompt + tgt
      rows['tokens'][i, : len(seq)], rows['segment_ids'][i, : len(seq)] = seq, 1
      rows['prefix'][i, : len(prompt)] = True
      rows['target_weights'][i, len(prompt) - 1 : len(seq) - 1] = 1.0  # t predicts t + 1.
    rows['positions'] = np.broadcast_to(np.arange(L, dtype=np.int32), (n, L)).copy()
    return rows

  @staticmethod
  def prompts(pairs, tokenizer, source_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded, so every row's next token is read at the same position."""
    return decoding.left_pad(
      [
        [tokenizer.bos_id] + _ids(tokenizer, s, source_len - 2) + [tokenizer.eos_id]
        for s, _ in pairs
      ],
      source_len,
    )

  @staticmethod
  def scored(apply_fn, params, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    inputs = ('tokens', 'segment_ids', 'positions', 'prefix')
    logits = apply_fn(params, *(batch[k] for k in inputs))
    return logits, jnp.roll(batch['tokens'], -1, axis=1), batch['target_weights']


LAYOUTS = {'prefix_lm': PrefixLM, 'encdec': EncoderDecoder}  # By a model family's SEQ2SEQ.


def encode(pairs, tokenizer, layout: str, source_len: int, target_len: int):
  """Fixed-size training rows in a SEQ2SEQ layout: sources keep their first source_len - 2
  (prefix_lm) or source_len - 1 (encdec) tokens; targets their first target_len - 1, then EOS."""
  return LAYOUTS[layout].encode(pairs, tokenizer, source_len, target_len)


def prompts(pairs, tokenizer, layout: str, source_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Generation inputs: (tokens, segment ids) of the sources."""
  return LAYOUTS[layout].prompts(pairs, tokenizer, source_len)


def make_loss_fn(layout: str) -> Callable:
  scored = LAYOUTS[layout].scored

  def loss_fn(apply_fn, params, batch, rng):
    """Teacher-forced cross-entropy of the target tokens (EOS included)."""
    del rng
    logits, targets, weights = scored(apply_fn, params, batch)
    if 'weight' in batch:  # Padding rows of an evaluation batch.
      weights = weights * batch['weight'][:, None]
    return weighted_cross_entropy(logits, targets, weights)

  return loss_fn
