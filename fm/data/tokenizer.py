"""Tokenizers: SentencePiece trained on a bounded sample of a corpus (fm/data/prepare.py stores
it with the prepared corpus) or given as a .model file, a published model's Hugging Face
tokenizer (tokenizer.json), or raw bytes.

SentencePiece and bytes are lossless (`decode(encode(text)) == text`) and reserve ids 0 (pad) and the EOS that
ends every document. `token_bytes()` gives the UTF-8 bytes each id stands for, which turns a
loss in nats per token into bits per byte.
"""

import base64
import hashlib
import io
import json
import os
import pathlib
import re
import struct

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

  def __init__(self, data: bytes, eos: str, bos: str = '', source: str = ''):
    from tokenizers import Tokenizer

    self.proto, self.eos, self.bos = data, eos, bos or eos
    self.source = source  # The directory it was loaded from, if any (its other files).
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
    # A BERT-style tokenizer names no eos_token: its separator ends a document, as a segment.
    for role, keys in (('eos', ('eos_token', 'sep_token')), ('bos', ('bos_token',))):
      token = next((config[k] for k in keys if config.get(k)), '')
      names[role] = token.get('content', '') if isinstance(token, dict) else token
  if not names['eos']:
    raise ConfigError(
      f'{key}: its tokenizer_config.json names no eos_token (nor sep_token), which ends every '
      f'document; add one.'
    )
  data = (directory / 'tokenizer.json').read_bytes()
  return HFTokenizer(data, names['eos'], names['bos'], str(directory))


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


# =============================================================================================
# Hugging Face files of every kind (a run's WORKDIR/tokenizer, which fm.convert export ships)
# =============================================================================================
HF_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')


def no_hf_files(tok) -> str:
  """Why `tok` has no Hugging Face files that give its ids ('' when it has): SentencePiece
  models are converted when they are unigram models with byte fallback, pieces prefixed (not
  suffixed) by whitespace and no unused pieces, as fm's are."""
  if not isinstance(tok, SentencePieceTokenizer):
    return ''
  pieces, trainer, _ = _sentencepiece_parts(tok.proto)
  return _unconvertible(pieces, trainer)


def _unconvertible(pieces, trainer: dict) -> str:
  # TrainerSpec fields: 3 model_type (1 unigram, the default), 24 treat_whitespace_as_suffix,
  # 35 byte_fallback.
  problems = [
    trainer.get(3, 1) != 1 and 'is not a unigram model (BPE and others are not converted)',
    bool(trainer.get(24)) and 'puts whitespace at the end of pieces',
    not trainer.get(35) and 'has no byte fallback (unknown characters would differ)',
    any(kind == UNUSED for _, _, kind in pieces) and 'has unused pieces',
  ]
  problems = [p for p in problems if p]
  if not problems:
    return ''
  return (
    f'its SentencePiece model {" and ".join(problems)}, so a tokenizer.json would not give its '
    f'ids; use the tokenizer.model beside it'
  )


def hf_files(tok) -> dict[str, bytes]:
  """The Hugging Face files that give `tok`'s ids (tokenizer.json for transformers'
  PreTrainedTokenizerFast and fm's kind=hf, tokenizer_config.json naming the special tokens):
  an hf tokenizer's own files (from the directory it was loaded from), a SentencePiece model's
  pieces, scores and normaliser as a unigram model with byte fallback, bytes as 256 byte
  pieces. {} for a SentencePiece model that cannot be converted (`no_hf_files` says why).

  The ids are SentencePiece's wherever its best segmentation is clear; on very long documents
  (whole plays of 80,000+ characters) a few near ties (44 of Shakespeare's 3.2M tokens) fall
  the other way, as SentencePiece adds path scores in float32. Both decode to the same text.
  As in Hugging Face's own conversions, text spelling a special or byte piece ('</s>',
  '<0x41>') is read as that piece, where SentencePiece reads its characters.
  """
  if isinstance(tok, HFTokenizer):
    found = {}
    if tok.source:
      from etils import epath

      directory = epath.Path(tok.source)
      found = {n: (directory / n).read_bytes() for n in HF_FILES if (directory / n).exists()}
    if found.get('tokenizer.json') != tok.proto:  # Not its directory's: its own identity.
      found = {'tokenizer.json': tok.proto}
    found.setdefault('tokenizer_config.json', _hf_config(eos_token=tok.eos, bos_token=tok.bos))
    return found
  if isinstance(tok, ByteTokenizer):
    special = {piece: i for i, piece in enumerate(['<pad>', '<s>', '</s>'])}
    vocab = dict(special)
    vocab.update({f'<0x{b:02X}>': b + tok.offset for b in range(256)})
    model = {'type': 'BPE', 'vocab': vocab, 'merges': [], 'byte_fallback': True}
    model.update(dropout=None, unk_token=None, fuse_unk=False, ignore_merges=False)
    model.update(continuing_subword_prefix=None, end_of_word_suffix=None)
    decoders = [{'type': 'ByteFallback'}, {'type': 'Fuse'}]
    return _hf_tokenizer(model, special, [], decoders, pad='<pad>', bos='<s>', eos='</s>')
  pieces, trainer, normalizer = _sentencepiece_parts(tok.proto)
  if _unconvertible(pieces, trainer):
    return {}
  # NormalizerSpec fields 1-5: name, precompiled_charsmap, add_dummy_prefix,
  # remove_extra_whitespaces, escape_whitespaces (the last three true unless stored).
  charsmap = normalizer.get(2, b'')
  dummy, extra, escape = (bool(normalizer.get(field, 1)) for field in (3, 4, 5))
  normalizers = []
  if charsmap:
    normalizers.append(
      {'type': 'Precompiled', 'precompiled_charsmap': base64.b64encode(charsmap).decode('ascii')}
    )
  if extra:  # Spaces alone: other whitespace stays.
    normalizers.append({'type': 'Replace', 'pattern': {'Regex': '^ +| +$'}, 'content': ''})
    normalizers.append({'type': 'Replace', 'pattern': {'Regex': ' {2,}'}, 'content': ' '})
  if dummy:
    normalizers.append({'type': 'Prepend', 'prepend': ' '})
  if escape:
    normalizers.append({'type': 'Replace', 'pattern': {'String': ' '}, 'content': '\u2581'})
  vocab = [[piece, score] for piece, score, _ in pieces]
  unk = next(i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN)
  model = {'type': 'Unigram', 'unk_id': unk, 'vocab': vocab, 'byte_fallback': True}
  decoders = [{'type': 'Replace', 'pattern': {'String': '\u2581'}, 'content': ' '}]
  decoders += [{'type': 'ByteFallback'}, {'type': 'Fuse'}]
  if dummy:
    decoders.append({'type': 'Strip', 'content': ' ', 'start': 1, 'stop': 0})
  special = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind in (UNKNOWN, CONTROL)}
  names = {'pad': tok.sp.pad_id(), 'bos': tok.bos_id, 'eos': tok.eos_id, 'unk': tok.sp.unk_id()}
  names = {role: pieces[i][0] for role, i in names.items() if i >= 0}
  return _hf_tokenizer(model, special, normalizers, decoders, **names)


def save(tok, directory) -> None:
  """`hf_files(tok)`, and a SentencePiece model's own .model file, written into `directory`,
  each file whole (written aside, then renamed); files already there with the same bytes are
  left alone."""
  directory = pathlib.Path(directory)
  files = hf_files(tok)
  if isinstance(tok, SentencePieceTokenizer):
    files[FILES['sentencepiece']] = tok.proto
  for name, data in files.items():
    path = directory / name
    if path.exists() and path.read_bytes() == data:
      continue
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f'.{name}.{os.getpid()}.partial'
    partial.write_bytes(data)
    partial.replace(path)


# SentencePiece's piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _sentencepiece_parts(proto: bytes) -> tuple[list[tuple[str, float, int]], dict, dict]:
  """(pieces as (piece, score, type), the trainer's and the normaliser's fields by number) of a
  serialized SentencePiece ModelProto, read from the protobuf wire format (the generated module
  sentencepiece ships needs a newer protobuf than the pinned one)."""
  pieces, trainer, normalizer = [], {}, {}
  for number, value in _proto_fields(proto):
    if number == 1:  # repeated SentencePiece {1: piece, 2: score, 3: type}
      entry = dict(_proto_fields(value))
      score = struct.unpack('<f', entry[2])[0] if 2 in entry else 0.0
      pieces.append((entry[1].decode('utf-8'), score, entry.get(3, NORMAL)))
    elif number == 2:  # TrainerSpec
      trainer = dict(_proto_fields(value))
    elif number == 3:  # NormalizerSpec
      normalizer = dict(_proto_fields(value))
  return pieces, trainer, normalizer


def _proto_fields(data: bytes):
  """(field number, value) of a protobuf message: ints for varints, bytes otherwise."""

  def varint(i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
      byte = data[i]
      value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
      if byte < 0x80:
        return value, i

  i = 0
  while i < len(data):
    key, i = varint(i)
    wire = key & 7
    if wire == 0:
      value, i = varint(i)
    elif wire == 2:
      size, i = varint(i)
      value, i = data[i : i + size], i + size
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
      value, i = data[i : i + size], i + size
    else:
      raise ValueError(f'protobuf wire type {wire} is not read')
    yield key >> 3, value


def _hf_tokenizer(model, special: dict, normalizers, decoders, **names) -> dict[str, bytes]:
  """tokenizer.json (no pre-tokenizer, no post-processor: ids as fm encodes them, no BOS
  added; `special`: piece -> id of the added special tokens) and tokenizer_config.json naming
  the special tokens (`names`: role -> piece)."""
  added = [
    dict(id=i, content=piece, single_word=False, lstrip=False, rstrip=False)
    | dict(normalized=False, special=True)
    for piece, i in special.items()
  ]
  normalizer = {'type': 'Sequence', 'normalizers': normalizers} if normalizers else None
  spec = {
    'version': '1.0',
    'truncation': None,
    'padding': None,
    'added_tokens': added,
    'normalizer': normalizer,
    'pre_tokenizer': None,
    'post_processor': None,
    'decoder': {'type': 'Sequence', 'decoders': decoders},
    'model': model,
  }
  return {
    'tokenizer.json': json.dumps(spec, ensure_ascii=False, indent=1).encode('utf-8'),
    'tokenizer_config.json': _hf_config(**{f'{role}_token': p for role, p in names.items()}),
  }


def _hf_config(**tokens) -> bytes:
  """tokenizer_config.json: the special tokens, and a lossless decode (no space clean-up)."""
  config = {
    'tokenizer_class': 'PreTrainedTokenizerFast',
    'clean_up_tokenization_spaces': False,
    **{role: piece for role, piece in tokens.items() if piece},
  }
  return json.dumps(config, indent=1).encode('utf-8')
