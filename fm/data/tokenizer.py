"""Tokenizers: SentencePiece trained on a bounded sample of a corpus (fm/data/prepare.py stores
it with the prepared corpus) or given as a .model file, a published model's Hugging Face
tokenizer (tokenizer.json), or raw bytes.

SentencePiece and bytes are lossless (`decode(encode(text)) == text`) and reserve ids 0 (pad) and the EOS that
ends every document. `token_bytes()` gives the UTF-8 bytes each id stands for, which turns a
loss in nats per token into bits per byte.
"""

import hashlib
import io
import json
import re

import numpy as np
import sentencepiece as spm

from fm import ConfigError

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


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer, as published models ship it (tokenizer.json), with
  the end-of-sequence (and beginning) token their tokenizer_config.json names."""

  def __init__(self, data: bytes, eos: str, bos: str = ''):
    from tokenizers import Tokenizer

    self.proto, self.eos, self.bos = data, eos, bos or eos
    self.tok = Tokenizer.from_str(data.decode('utf-8'))
    self.eos_id, self.bos_id = self.tok.token_to_id(eos), self.tok.token_to_id(self.bos)
    if self.eos_id is None or self.bos_id is None:
      raise ConfigError(f'the tokenizer has no token {eos!r} (or {self.bos!r}); check its files.')

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  @property
  def identity(self) -> dict:
    return {
      'kind': 'hf',
      'vocab_size': self.vocab_size,
      'sha256': hashlib.sha256(self.proto).hexdigest(),
      'eos': self.eos,
      'bos': self.bos,
    }

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_bytes(self) -> np.ndarray:
    """Bytes of text per id: a byte-level (GPT-2 style) token's characters each stand for a
    byte; otherwise SentencePiece's rules (<0xNN> pieces one byte, U+2581 a space); added
    tokens 0."""
    byte_level = (json.loads(self.proto).get('decoder') or {}).get('type') == 'ByteLevel'
    added = {t.content for t in self.tok.get_added_tokens_decoder().values()}
    out = np.zeros(self.vocab_size, np.int32)
    for piece, i in self.tok.get_vocab(with_added_tokens=True).items():
      if piece in added:
        continue
      if byte_level:
        out[i] = len(piece)
      elif re.fullmatch(r'<0x[0-9A-Fa-f]{2}>', piece):
        out[i] = 1
      else:
        out[i] = len(piece.replace('\u2581', ' ').encode('utf-8'))
    return out


def load_hf(path: str) -> HFTokenizer:
  """The tokenizer of a Hugging Face model directory (tokenizer.json, and the special tokens
  tokenizer_config.json names): `config.data.tokenizer.model` with kind=hf."""
  from etils import epath

  directory = epath.Path(path).expanduser()
  key = f'config.data.tokenizer.model={path!r}'
  if not (directory / 'tokenizer.json').exists():
    raise ConfigError(f'{key} has no tokenizer.json; give a Hugging Face model directory.')
  names = {'eos': '', 'bos': ''}
  if (directory / 'tokenizer_config.json').exists():
    config = json.loads((directory / 'tokenizer_config.json').read_text())
    for role in names:
      token = config.get(f'{role}_token')
      names[role] = token.get('content', '') if isinstance(token, dict) else token or ''
  if not names['eos']:
    raise ConfigError(
      f'{key}: its tokenizer_config.json names no eos_token, which ends every document; add it.'
    )
  return HFTokenizer((directory / 'tokenizer.json').read_bytes(), names['eos'], names['bos'])


def declared_vocab_size(tok_cfg) -> int:
  """The vocabulary size `config.data.tokenizer` promises, without loading any data."""
  if tok_cfg.kind == 'bytes':
    return ByteTokenizer().vocab_size
  if tok_cfg.kind == 'hf':
    return load_hf(tok_cfg.model).vocab_size
  return load_sentencepiece(tok_cfg.model).vocab_size if tok_cfg.model else tok_cfg.vocab_size


def load_sentencepiece(path: str) -> SentencePieceTokenizer:
  """A given SentencePiece model (`config.data.tokenizer.model`), such as the tokenizer.model
  of another prepared corpus."""
  from etils import epath

  key = f'config.data.tokenizer.model={path!r}'
  try:
    proto = epath.Path(path).expanduser().read_bytes()
  except (FileNotFoundError, IsADirectoryError):
    raise ConfigError(
      f'{key} is not a file; give a SentencePiece .model file, such as the tokenizer.model of a '
      f'prepared corpus.'
    ) from None
  try:
    tok = SentencePieceTokenizer(proto)
  except RuntimeError:
    raise ConfigError(
      f'{key} is not a SentencePiece model; give a .model file, such as the tokenizer.model of '
      f'a prepared corpus.'
    ) from None
  if tok.eos_id < 0:
    raise ConfigError(f'{key} has no end-of-sequence piece; give a model with one (eos_id).')
  return tok


KINDS = ('sentencepiece', 'bytes', 'hf')
MAX_LINE_BYTES = 4192  # SentencePiece's trainer skips longer lines (max_sentence_length).


def train_sentencepiece(lines: list[str], vocab_size: int, seed: int = 0) -> bytes:
  """A SentencePiece model (unigram, lossless) trained on `lines`."""
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)  # Sentence sampling on large corpora.
  try:
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
  except RuntimeError as e:
    long = sum(len(line.encode('utf-8')) > MAX_LINE_BYTES for line in lines)
    skipped = (
      f' ({long} of its {len(lines)} sampled lines are longer than the {MAX_LINE_BYTES} bytes '
      f'SentencePiece reads: split documents into lines, such as paragraphs)'
      if long
      else ''
    )
    found = re.search(
      r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)', str(e)
    )
    if found:
      raise ConfigError(
        f'config.data.tokenizer.vocab_size={found.group(1)} is more than this corpus can give '
        f'a SentencePiece model{skipped}; set it to at most {found.group(2)}, or add text.'
      ) from None
    found = re.search(r'Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)', str(e))
    if found:
      raise ConfigError(
        f'config.data.tokenizer.vocab_size={found.group(1)} is less than this corpus needs (one '
        f'piece per distinct character, the 256 bytes and the special ids); set it to at least '
        f'{found.group(2)}.'
      ) from None
    raise ConfigError(
      f'SentencePiece could not train on this corpus{skipped}; or use '
      f'config.data.tokenizer.kind=bytes ({str(e).splitlines()[0][:200]}).'
    ) from None
  return model.getvalue()


def given(kind: str, model: str):
  """The tokenizer `config.data.tokenizer` gives without training one: bytes, or the `model`
  file (SentencePiece) or directory (hf); None when a SentencePiece model is to be trained."""
  if kind not in KINDS:
    raise ConfigError(
      f'config.data.tokenizer.kind={kind!r} is unknown; choose one of: {", ".join(KINDS)}.'
    )
  if model and kind == 'bytes':
    raise ConfigError(
      f'config.data.tokenizer.model={model!r} is given with kind=bytes; set '
      f'config.data.tokenizer.kind to sentencepiece (a .model file) or hf (a model directory).'
    )
  if kind == 'bytes':
    return ByteTokenizer()
  if kind == 'hf':
    if not model:
      raise ConfigError(
        'config.data.tokenizer.kind=hf needs config.data.tokenizer.model, a Hugging Face model '
        'directory (with tokenizer.json).'
      )
    return load_hf(model)
  return load_sentencepiece(model) if model else None


def train(kind: str, vocab_size: int, lines: list[str], model: str = ''):
  """The tokenizer of a prepared corpus: the `given` one, else SentencePiece trained on
  `lines`."""
  return given(kind, model) or SentencePieceTokenizer(train_sentencepiece(lines, vocab_size))


def from_identity(identity: dict, proto: bytes = b''):
  """The tokenizer an identity names (SentencePiece and hf ones from their file's bytes)."""
  if identity['kind'] == 'hf':
    return HFTokenizer(proto, identity['eos'], identity['bos'])
  return ByteTokenizer() if identity['kind'] == 'bytes' else SentencePieceTokenizer(proto)


FILES = {'sentencepiece': 'tokenizer.model', 'hf': 'tokenizer.json'}  # In a prepared corpus.
