"""Tokenizers: SentencePiece trained on a dataset's train split (cached), or raw bytes.

Both are lossless (`decode(encode(text)) == text`) and reserve ids 0 (pad) and the EOS that
ends every document. `token_bytes()` gives the UTF-8 bytes each id stands for, which turns a
loss in nats per token into bits per byte.
"""

import hashlib
import io
import os
import pathlib

import ml_collections
import numpy as np
import sentencepiece as spm

from fm import ConfigError
from fm.data import sources

PAD_ID = 0


class ByteTokenizer:
  """UTF-8 bytes shifted by the 3 special ids (pad 0, bos 1, eos 2)."""

  bos_id, eos_id, offset = 1, 2, 3

  @property
  def vocab_size(self) -> int:
    return 256 + self.offset

  @property
  def identity(self) -> dict:
    return {'kind': 'bytes', 'vocab_size': self.vocab_size}

  def encode(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode('utf-8')]

  def decode(self, ids) -> str:
    return bytes(int(i) - self.offset for i in ids if int(i) >= self.offset).decode(
      'utf-8', errors='replace'
    )

  def token_bytes(self) -> np.ndarray:
    return np.array([0] * self.offset + [1] * 256, np.int32)


class SentencePieceTokenizer:
  """A SentencePiece model with identity normalisation and byte fallback (lossless)."""

  def __init__(self, model_proto: bytes):
    self.proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def identity(self) -> dict:
    return {
      'kind': 'sentencepiece',
      'vocab_size': self.vocab_size,
      'sha256': hashlib.sha256(self.proto).hexdigest(),
    }

  def encode(self, text: str | list[str]):
    return self.sp.encode(text)

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])

  def token_bytes(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self.sp.is_control(i) or self.sp.is_unknown(i):
        continue
      if self.sp.is_byte(i):
        out[i] = 1
      else:
        out[i] = len(self.sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return out


def declared_vocab_size(tok_cfg) -> int:
  """The vocabulary size `config.data.tokenizer` promises, without loading any data."""
  return ByteTokenizer().vocab_size if tok_cfg.kind == 'bytes' else tok_cfg.vocab_size


def train_sentencepiece(docs: list[str], vocab_size: int, seed: int = 0) -> bytes:
  lines = [line for doc in docs for line in doc.split('\n') if line.strip()]
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)  # Sentence sampling on large corpora.
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines),
    model_writer=model,
    vocab_size=vocab_size,
    model_type='unigram',
    normalization_rule_name='identity',
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    byte_fallback=True,
    user_defined_symbols=['\n'],
    split_digits=True,
    character_coverage=1.0,
    pad_id=PAD_ID,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    num_threads=2,
    minloglevel=2,
    input_sentence_size=300_000,
    shuffle_input_sentence=True,
  )
  return model.getvalue()


def build(
  tok_cfg: ml_collections.ConfigDict, train_docs: list[str], dataset: str, corpus_digest: str
):
  """The tokenizer named by `config.data.tokenizer`, training and caching SentencePiece once
  per train corpus (`corpus_digest`, the sha256 of its documents)."""
  kind = tok_cfg.kind
  if kind == 'bytes':
    return ByteTokenizer()
  if kind != 'sentencepiece':
    raise ConfigError(
      f'config.data.tokenizer.kind={kind!r} is unknown; choose sentencepiece or bytes.'
    )
  vocab_size = declared_vocab_size(tok_cfg)
  path = sources.cache_dir() / 'tokenizers' / f'{dataset}-sp{vocab_size}-{corpus_digest[:16]}.model'
  if not path.exists():
    proto = train_sentencepiece(train_docs, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each process writes its own file (pytest-xdist workers or hosts may train it at once).
    tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
    tmp.write_bytes(proto)
    tmp.replace(path)
  return SentencePieceTokenizer(pathlib.Path(path).read_bytes())
