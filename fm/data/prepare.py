"""Corpora prepared once: tokenized documents in sharded ArrayRecord files per split, plus a
manifest, written by an Apache Beam pipeline.

  python -m fm.data.prepare --train 'corpus/*.jsonl' --output DIR [--validation 'held/*.jsonl' |
      --validation_fraction 0.01] [--text_field text] [--tokenizer sentencepiece --vocab_size 4096
      | --tokenizer bytes] [--workers 2] [-- BEAM_OPTIONS...]
  python -m fm.data.prepare --source shakespeare --output DIR

Inputs: `.txt` (one document per file), `.jsonl` / `.jsonl.gz` (a document per line, in the
`text_field`) and `.parquet` (that column), local or on any filesystem `etils.epath` opens; or a
named source (fm/data/sources.py). The steps:
  1. On the driver, one streaming pass over the inputs: each file's size and sha256, the
     documents of each split (by the validation globs, else by a hash of each document's text),
     and a bounded, seeded sample of training lines for the tokenizer (memory does not grow with
     the corpus).
  2. The tokenizer is trained on that sample (SentencePiece) or is the byte tokenizer.
  3. A Beam pipeline reads the documents again in chunks of up to CHUNK_DOCS (a work item
     each), tokenizes them and writes each chunk's documents of each split as one shard, under a
     temporary name renamed when whole: shards hold their split's documents in input order, so
     record n of the split's shards read in order is document n. Nothing is grouped, so no
     worker holds more than a chunk. Locally it runs on Beam's DirectRunner with `--workers`
     processes; the same pipeline runs on Dataflow, Flink or Spark with their runner options
     after `--`.
  4. Per split, the tokens of each document (`{split}.offsets.npy`, cumulative, read memory-mapped
     by training), then the manifest: tokenizer identity, inputs (sizes, sha256), shards
     (documents, tokens, sha256). The manifest is written last: a directory without one is not a
     prepared corpus, and rerunning the command finishes it. Same inputs and tokenizer: the same
     bytes.
"""

import argparse
from collections.abc import Iterator
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import random
import sys

import numpy as np

from fm import ConfigError
from fm.data import sources
from fm.data import tokenizer as tokenizer_lib

FORMATS = ('.txt', '.jsonl', '.jsonl.gz', '.parquet')
SPLITS = ('train', 'validation')
SAMPLE_LINES = 300_000  # The tokenizer's sample (SentencePiece reads at most this many lines).
CHUNK_DOCS = 2_000  # Documents per pipeline work item in line-addressed files.
MANIFEST = 'manifest.json'
VERSION = 2  # Of the on-disk layout.


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything that determines a prepared corpus."""

  train: tuple[str, ...] = ()  # File globs; or a named `source`.
  validation: tuple[str, ...] = ()  # File globs; none: `validation_fraction` of the documents.
  source: str = ''
  validation_fraction: float = 0.01
  text_field: str = 'text'
  tokenizer: str = 'sentencepiece'  # or 'bytes'
  vocab_size: int = 4096
  encoding_errors: str = 'strict'  # 'replace' turns bytes that are not UTF-8 into U+FFFD.

  def key(self) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


# =============================================================================================
# Reading documents
# =============================================================================================
def _format(path: str) -> str:
  for suffix in sorted(FORMATS, key=len, reverse=True):
    if path.endswith(suffix):
      return suffix
  raise ConfigError(
    f'{path}: unknown file type; give {", ".join(FORMATS)} files (rename a plain text file to '
    f'.txt).'
  )


def expand(patterns: tuple[str, ...], key: str) -> list[str]:
  """Every file the glob patterns match, sorted and deduplicated; a pattern matching none is an
  error naming it."""
  from etils import epath

  out = []
  for pattern in patterns:
    if '://' in pattern:
      base, _, rest = pattern.partition('://')
      root = epath.Path(f'{base}://{rest.split("/", 1)[0]}')
      found = sorted(str(p) for p in root.glob(rest.split('/', 1)[1])) if '/' in rest else []
    else:
      anchor = pathlib.Path('/' if os.path.isabs(pattern) else '.')
      found = sorted(str(p) for p in anchor.glob(pattern.lstrip('/')) if p.is_file())
    if not found:
      raise ConfigError(f'{key} pattern {pattern!r} matches no file; fix the path.')
    out += found
  return list(dict.fromkeys(out))


def _open(path: str):
  from etils import epath

  return epath.Path(path).open('rb')


def _decode(data: bytes, path: str, offset: int, errors: str) -> str:
  try:
    return data.decode('utf-8', errors=errors)
  except UnicodeDecodeError as e:
    raise ConfigError(
      f'{path}: bytes at offset {offset + e.start} are not UTF-8; fix the file or prepare with '
      f'--encoding_errors=replace (config.data.encoding_errors=replace) to replace them.'
    ) from None


def documents(
  path: str, spec: Spec, start_line: int = 0, stop_line: int | None = None
) -> Iterator[tuple[int, str]]:
  """(line or row number, text) of the documents of a file, from `start_line` to `stop_line`
  (line-addressed formats; a .txt file is one document, number 0)."""
  fmt = _format(path)
  if fmt == '.txt':
    with _open(path) as f:
      data = f.read()
    if not data.strip():
      raise ConfigError(f'{path} is empty; remove it or give it text.')
    yield 0, _decode(data, path, 0, spec.encoding_errors)
    return
  if fmt == '.parquet':
    import pyarrow.parquet as pq

    with _open(path) as f:
      table = pq.ParquetFile(f)
      if spec.text_field not in table.schema_arrow.names:
        raise ConfigError(
          f'{path} has no column {spec.text_field!r} (columns: '
          f'{", ".join(table.schema_arrow.names)}); set --text_field (config.data.text_field).'
        )
      row = 0
      for batch in table.iter_batches(columns=[spec.text_field]):
        for text in batch.column(0).to_pylist():
          if start_line <= row and (stop_line is None or row < stop_line) and text:
            yield row, text
          row += 1
    return
  opener = gzip.open if fmt == '.jsonl.gz' else (lambda f: f)
  with _open(path) as raw, opener(raw) as f:
    offset = 0
    for number, line in enumerate(f):
      if stop_line is not None and number >= stop_line:
        return
      if number >= start_line and line.strip():
        text = _decode(line, path, offset, spec.encoding_errors)
        try:
          record = json.loads(text)
        except json.JSONDecodeError as e:
          raise ConfigError(f'{path}:{number + 1}: not JSON ({e.msg}); fix the line.') from None
        if not isinstance(record, dict) or not isinstance(record.get(spec.text_field), str):
          raise ConfigError(
            f'{path}:{number + 1}: no string field {spec.text_field!r}; set --text_field '
            f'(config.data.text_field) to the field that holds the text.'
          )
        yield number, record[spec.text_field]
      offset += len(line)


def held_out(text: str, fraction: float) -> bool:
  """Whether a document (without validation files) goes to the validation split: by a hash of
  its text, so the choice does not depend on order, files or workers."""
  digest = int.from_bytes(hashlib.sha256(text.encode('utf-8', 'replace')).digest()[:8], 'big')
  return digest / 2**64 < fraction


# =============================================================================================
# 1. The driver's pass: inputs, documents per split, the tokenizer's sample
# =============================================================================================
@dataclasses.dataclass
class Item:
  """A pipeline work item: documents of one file (or of a named source), with the ordinal of
  its first document in each split."""

  split_by: str  # 'file' (the file's split), 'hash' (per document) or 'source'.
  first: dict[str, int]  # Ordinal of its first document of each split.
  path: str = ''
  split: str = ''
  start_line: int = 0
  stop_line: int | None = None
  texts: tuple = ()  # A named source's (split, text) pairs.
  documents: dict[str, int] = dataclasses.field(default_factory=dict)  # Per split.


class _Sample:
  """A seeded reservoir of lines: all of them, in order, while they fit."""

  def __init__(self, size: int):
    self.size, self.lines, self.seen, self.rng = size, [], 0, random.Random(0)

  def add(self, text: str) -> None:
    for line in text.split('\n'):
      if not line.strip():
        continue
      self.seen += 1
      if len(self.lines) < self.size:
        self.lines.append(line)
      else:
        j = self.rng.randrange(self.seen)
        if j < self.size:
          self.lines[j] = line


def survey(spec: Spec) -> tuple[list[Item], dict[str, int], list[str], list[dict]]:
  """(work items, documents per split, the tokenizer's sample of training lines, inputs with
  their sizes and sha256), from one streaming pass."""
  counts = dict.fromkeys(SPLITS, 0)
  sample = _Sample(SAMPLE_LINES)
  items, inputs = [], []
  if spec.source:
    docs = sources.load(spec.source)
    pairs = [(split, text) for split in SPLITS for text in docs[split]]
    for start in range(0, len(pairs), CHUNK_DOCS):
      chunk = tuple(pairs[start : start + CHUNK_DOCS])
      item = Item('source', dict(counts), texts=chunk)
      for split, text in chunk:
        counts[split] += 1
        if split == 'train':
          sample.add(text)
      item.documents = {s: counts[s] - item.first[s] for s in SPLITS}
      items.append(item)
    return items, counts, sample.lines, [{'source': spec.source}]
  files = [(p, 'train') for p in expand(spec.train, 'config.data.train')]
  files += [(p, 'validation') for p in expand(spec.validation, 'config.data.validation')]
  for path, file_split in files:
    digest, size = hashlib.sha256(), 0
    with _open(path) as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        digest.update(block)
        size += len(block)
    if not size:
      raise ConfigError(f'{path} is empty; remove it or give it text.')
    inputs.append({'path': path, 'bytes': size, 'sha256': digest.hexdigest()})
    split_by = 'file' if spec.validation else 'hash'
    item = Item(split_by, dict(counts), path=path, split=file_split)
    for n, (line, text) in enumerate(documents(path, spec)):
      if n and n % CHUNK_DOCS == 0:  # A new work item every CHUNK_DOCS documents.
        item.stop_line = line
        item.documents = {s: counts[s] - item.first[s] for s in SPLITS}
        items.append(item)
        item = Item(split_by, dict(counts), path=path, split=file_split, start_line=line)
      split = (
        file_split
        if spec.validation
        else ('validation' if held_out(text, spec.validation_fraction) else 'train')
      )
      counts[split] += 1
      if split == 'train':
        sample.add(text)
    item.documents = {s: counts[s] - item.first[s] for s in SPLITS}
    items.append(item)
  for split in SPLITS:
    if not counts[split]:
      raise ConfigError(
        f'the inputs give no {split} documents; add files'
        + (' or raise --validation_fraction.' if split == 'validation' else '.')
      )
  return items, counts, sample.lines, inputs


def _item_documents(item: Item, spec: Spec) -> Iterator[tuple[str, int, str]]:
  """(split, ordinal, text) of a work item's documents."""
  next_ordinal = dict(item.first)
  if item.split_by == 'source':
    pairs = item.texts
  else:
    docs = documents(item.path, spec, item.start_line, item.stop_line)
    pairs = (
      (
        item.split
        if item.split_by == 'file'
        else ('validation' if held_out(text, spec.validation_fraction) else 'train'),
        text,
      )
      for _, text in docs
    )
  for split, text in pairs:
    yield split, next_ordinal[split], text
    next_ordinal[split] += 1


# =============================================================================================
# 3. The Beam pipeline
# =============================================================================================
def shard_name(split: str, item: int) -> str:
  return f'{split}-{item:05d}.array_record'


def _write_item(indexed: tuple[int, Item], spec: Spec, identity: dict, proto: bytes, output: str):
  """Tokenizes one work item and writes its documents of each split as one shard, with the
  tokens of each document and the shard's stats; every file under a temporary name, renamed
  when whole (the shard last)."""
  from array_record.python import array_record_module

  index, item = indexed
  tok = tokenizer_lib.from_identity(identity, proto)
  writers, lengths = {}, {s: [] for s in SPLITS}
  final = {s: pathlib.Path(output) / shard_name(s, index) for s in SPLITS}
  partial = {s: p.with_name(f'.{p.name}.{os.getpid()}.partial') for s, p in final.items()}
  for split, _, text in _item_documents(item, spec):
    if split not in writers:
      writers[split] = array_record_module.ArrayRecordWriter(str(partial[split]), 'group_size:1')
    tokens = np.asarray(tok.encode(text) + [tok.eos_id], np.int32)
    writers[split].write(tokens.tobytes())
    lengths[split].append(len(tokens))
  for split, writer in writers.items():
    writer.close()
    counts = np.asarray(lengths[split], np.int32)
    _atomic_bytes(final[split].with_suffix('.lengths.npy'), _npy_bytes(counts))
    data = partial[split].read_bytes()
    stats = {
      'file': final[split].name,
      'documents': len(counts),
      'tokens': int(counts.sum()),
      'bytes': len(data),
      'sha256': hashlib.sha256(data).hexdigest(),
    }
    _atomic_bytes(final[split].with_suffix('.json'), json.dumps(stats).encode())
    os.replace(partial[split], final[split])


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def _atomic_bytes(path: pathlib.Path, data: bytes) -> None:
  partial = path.with_name(f'.{path.name}.{os.getpid()}.partial')
  partial.write_bytes(data)
  os.replace(partial, path)


def tok_proto(tok) -> bytes:
  return tok.proto if tok.identity['kind'] == 'sentencepiece' else b''


def _import_beam():
  """apache_beam, imported without the warning it logs about optional Google Cloud clients."""
  import logging

  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)
  try:
    import apache_beam
    from apache_beam.options import pipeline_options  # noqa: F401
  finally:
    root.setLevel(level)
  return apache_beam


def run_pipeline(items: list[Item], spec: Spec, tok, output, workers: int, beam_args) -> None:
  """Runs step 3 (see the module docstring) on Beam's DirectRunner with `workers` processes,
  or on the runner `beam_args` name."""
  beam = _import_beam()
  PipelineOptions = beam.options.pipeline_options.PipelineOptions  # noqa: N806

  options = PipelineOptions(
    ['--runner=DirectRunner', f'--direct_num_workers={workers}', *beam_args]
    if not any(a.startswith('--runner') for a in beam_args)
    else list(beam_args)
  )
  if workers > 1 and not any(a.startswith('--runner') for a in beam_args):
    options.view_as(
      beam.options.pipeline_options.DirectOptions
    ).direct_running_mode = 'multi_processing'
  with beam.Pipeline(options=options) as p:
    _ = (
      p
      | 'Items' >> beam.Create(list(enumerate(items)))
      | 'Spread' >> beam.Reshuffle()
      | 'Write' >> beam.Map(_write_item, spec, tok.identity, tok_proto(tok), str(output))
    )


# =============================================================================================
# The command
# =============================================================================================
def prepare(spec: Spec, output: str | pathlib.Path, workers: int = 1, beam_args=()) -> dict:
  """Prepares `spec` into `output` (see the module docstring); returns the manifest. A
  directory with a manifest of the same spec is returned as it is."""
  output = pathlib.Path(output)
  try:
    existing = read_manifest(output, must_exist=False)
  except ConfigError:  # Damaged, or written by another layout version: prepared anew.
    existing = None
  if existing and existing['spec'] == json.loads(json.dumps(dataclasses.asdict(spec))):
    return existing
  output.mkdir(parents=True, exist_ok=True)
  for stale in output.glob('.*.partial'):  # Left by a killed prepare (not by a running one).
    if not _running(int(stale.name.rsplit('.', 2)[1])):
      stale.unlink(missing_ok=True)
  items, counts, sample, inputs = survey(spec)
  tok = tokenizer_lib.train(spec.tokenizer, spec.vocab_size, sample)
  if tok.identity['kind'] == 'sentencepiece':
    _atomic_bytes(output / 'tokenizer.model', tok.proto)
  run_pipeline(items, spec, tok, output, workers, beam_args)
  manifest = {
    'version': VERSION,
    'spec': dataclasses.asdict(spec),
    'tokenizer': tok.identity,
    'inputs': inputs,
    'splits': {},
  }
  for split in SPLITS:
    shards = [
      output / shard_name(split, i) for i, item in enumerate(items) if item.documents[split]
    ]
    missing = [p.name for p in shards if not p.exists()]
    if missing:
      raise ConfigError(f'prepare wrote no {", ".join(missing[:3])} in {output}; run it again.')
    lengths = np.concatenate([np.load(p.with_suffix('.lengths.npy')) for p in shards])
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    _atomic_bytes(output / f'{split}.offsets.npy', _npy_bytes(offsets))
    manifest['splits'][split] = {
      'documents': counts[split],
      'tokens': int(offsets[-1]),
      'shards': [json.loads(p.with_suffix('.json').read_text()) for p in shards],
    }
  _atomic_bytes(output / MANIFEST, json.dumps(manifest, indent=1).encode())
  return manifest


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


def read_manifest(directory: str | pathlib.Path, must_exist: bool = True) -> dict | None:
  """The manifest of a prepared directory; a missing or damaged one is an error naming it
  (or None when `must_exist` is False and there is none)."""
  path = pathlib.Path(directory) / MANIFEST
  if not path.exists():
    if must_exist:
      raise ConfigError(
        f'{directory} has no {MANIFEST}: it is not a prepared corpus, or its prepare did not '
        f'finish; run python -m fm.data.prepare with --output {directory} (again).'
      )
    return None
  try:
    manifest = json.loads(path.read_text())
    assert manifest['version'] == VERSION and set(manifest['splits']) == set(SPLITS)
  except (json.JSONDecodeError, KeyError, AssertionError, TypeError):
    raise ConfigError(
      f'{path} is damaged; prepare {directory} again (python -m fm.data.prepare).'
    ) from None
  return manifest


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  ours, beam_args = (
    (argv[: argv.index('--')], argv[argv.index('--') + 1 :]) if '--' in argv else (argv, [])
  )
  parser = argparse.ArgumentParser(
    prog='python -m fm.data.prepare', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('--train', action='append', default=[], help='glob of training files')
  parser.add_argument('--validation', action='append', default=[], help='glob of held-out files')
  parser.add_argument('--source', default='', help=f'a named source: {", ".join(sources.SOURCES)}')
  parser.add_argument('--output', required=True, help='directory to write')
  parser.add_argument('--validation_fraction', type=float, default=Spec.validation_fraction)
  parser.add_argument('--text_field', default=Spec.text_field)
  parser.add_argument('--tokenizer', default=Spec.tokenizer, choices=('sentencepiece', 'bytes'))
  parser.add_argument('--vocab_size', type=int, default=Spec.vocab_size)
  parser.add_argument('--encoding_errors', default='strict', choices=('strict', 'replace'))
  parser.add_argument('--workers', type=int, default=1, help='DirectRunner worker processes')
  args = parser.parse_args(ours)
  if bool(args.train) == bool(args.source):
    parser.error('give --train globs or --source, one of them')
  spec = Spec(
    tuple(args.train),
    tuple(args.validation),
    args.source,
    args.validation_fraction,
    args.text_field,
    args.tokenizer,
    args.vocab_size,
    args.encoding_errors,
  )
  try:
    manifest = prepare(spec, args.output, args.workers, beam_args)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for split, info in manifest['splits'].items():
    print(
      f'{split}: {info["documents"]:,} documents, {info["tokens"]:,} tokens in '
      f'{len(info["shards"])} shards'
    )
  print(f'tokenizer {manifest["tokenizer"]}; manifest {pathlib.Path(args.output) / MANIFEST}')
  return 0


if __name__ == '__main__':
  # Through the package, so the pipeline's work items pickle as fm.data.prepare.Item (workers
  # import that module; they have no __main__ of ours).
  from fm.data import prepare as _prepare  # noqa: PLW0406

  sys.exit(_prepare.main())
