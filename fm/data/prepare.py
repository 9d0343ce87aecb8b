"""Corpora prepared once: tokenized documents in sharded ArrayRecord files per split, plus a
manifest, written by an Apache Beam pipeline.

  python -m fm.data.prepare --train 'corpus/*.jsonl' --output DIR [--validation 'held/*.jsonl' |
      --validation_fraction 0.01] [--text_field text] [--tokenizer sentencepiece --vocab_size 4096
      | --tokenizer_model OTHER/tokenizer.model | --tokenizer bytes] [--workers 2]
      [-- BEAM_OPTIONS...]
  python -m fm.data.prepare --source shakespeare --output DIR

Inputs: `.txt` (one document per file), `.jsonl` / `.jsonl.gz` (a document per line, in the
`text_field`) and `.parquet` (that column), local or on any filesystem `etils.epath` opens; or a
named source (fm/data/sources.py). The steps:
  1. On the driver, from the file listing alone: work items (ranges of CHUNK_BYTES of .jsonl
     files, runs of .txt files, a .jsonl.gz or .parquet file whole), and a bounded, seeded
     sample of training lines for the tokenizer read from items spread over the corpus, about
     SAMPLE_BYTES in all: the driver's time and memory do not grow with the corpus.
  2. The tokenizer is trained on that sample (SentencePiece), or is a given SentencePiece model
     (--tokenizer_model: corpora to be mixed share one), or the byte tokenizer.
  3. A Beam pipeline reads each work item, splits its documents (by the validation globs, else
     by a hash of each document's text), tokenizes them and writes its documents of each split
     as one shard, under a temporary name renamed when whole, then the item's record
     (`item-N.json`) last; in parallel it takes each input file's size and sha256. Shards hold
     their split's documents in input order, so record n of the split's shards read in order is
     document n. Nothing is grouped, so no worker holds more than an item. Locally it runs on
     Beam's DirectRunner with `--workers` processes; the same pipeline runs on Dataflow, Flink
     or Spark with their runner options after `--`.
  4. Per split, the tokens of each document (`{split}.offsets.npy`, cumulative, read memory-mapped
     by training), then the manifest: tokenizer identity, inputs (sizes, sha256), shards
     (documents, tokens, sha256). The manifest is written last: a directory without one is not a
     prepared corpus, and rerunning the command finishes it (recorded items are kept). Same
     inputs and tokenizer: the same bytes.
"""

import argparse
from collections.abc import Iterator
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import random
import re
import shutil
import sys
import tempfile
import time
import zlib

import numpy as np

from fm import ConfigError, local_directory, removed_if_left_empty
from fm.data import sources
from fm.data import tokenizer as tokenizer_lib

FORMATS = ('.txt', '.jsonl', '.jsonl.gz', '.parquet')
SPLITS = ('train', 'validation')
SAMPLE_LINES = 300_000  # The tokenizer's sample (SentencePiece reads at most this many lines).
SAMPLE_BYTES = 64 << 20  # About how much input the driver reads for that sample.
CHUNK_BYTES = 16 << 20  # Input bytes per pipeline work item (a range of a .jsonl file).
CHUNK_DOCS = 2_000  # Documents (.txt files, a named source's texts) per work item.
MANIFEST = 'manifest.json'
VERSION = 3  # Of the on-disk layout.


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything that determines a prepared corpus."""

  train: tuple[str, ...] = ()  # File globs; or a named `source`.
  validation: tuple[str, ...] = ()  # File globs; none: `validation_fraction` of the documents.
  source: str = ''
  validation_fraction: float = 0.01
  text_field: str = 'text'
  tokenizer: str = 'sentencepiece'  # or 'bytes', or 'hf' (with tokenizer_model)
  vocab_size: int = 4096  # Of a trained SentencePiece model.
  # A SentencePiece .model file to use instead of training one; with 'hf', an HF model directory.
  tokenizer_model: str = ''
  encoding_errors: str = 'strict'  # 'replace' turns bytes that are not UTF-8 into U+FFFD.

  def key(self) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

  def as_json(self) -> dict:
    """The spec as a manifest holds it (lists for tuples)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def check(self) -> None:
    """Values no corpus could be prepared with, before anything is read."""
    if not 0 <= self.validation_fraction < 1:
      raise ConfigError(
        f'config.data.validation_fraction={self.validation_fraction} must lie in [0, 1): the '
        f'share of the documents held out (0.01 holds out 1%).'
      )


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
      pattern = os.path.expanduser(pattern)
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
    where = ' of its decompressed text' if path.endswith('.gz') else ''
    raise ConfigError(
      f'{path}: bytes at offset {offset + e.start}{where} are not UTF-8; fix the file or prepare '
      f'with --encoding_errors=replace (config.data.encoding_errors=replace) to replace them.'
    ) from None


def documents(part: 'Part', spec: Spec) -> Iterator[str]:
  """The texts of the documents of a part of a file: a .txt file is one document; a .jsonl range
  holds the lines that start inside it."""
  path, fmt = part.path, _format(part.path)
  if fmt == '.txt':
    with _open(path) as f:
      data = f.read()
    if not data.strip():
      raise ConfigError(f'{path} is empty; remove it or give it text.')
    yield _decode(data, path, 0, spec.encoding_errors)
    return
  if fmt == '.parquet':
    yield from _parquet_texts(path, spec)
    return
  with _open(path) as raw:
    offset = part.start
    if offset:  # Skip the line that started before the range (its own range reads it).
      raw.seek(offset - 1)
      offset += len(raw.readline()) - 1
    lines = gzip.open(raw) if fmt == '.jsonl.gz' else raw
    try:
      for line in lines:
        if part.stop is not None and offset >= part.stop:
          return
        if line.strip():
          yield _json_text(line, path, offset, spec)
        offset += len(line)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
      raise ConfigError(
        f'{path} is not a whole gzip file ({e}); fix or remove it (uncompressed JSON lines '
        f'take the extension .jsonl).'
      ) from None


def _parquet_texts(path: str, spec: Spec) -> Iterator[str]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  with _open(path) as f:
    try:
      table = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
      raise ConfigError(
        f'{path} is not a readable Parquet file ({str(e).splitlines()[0][:120]}); fix or remove '
        f'it, or give it the extension of its format (.txt, .jsonl, .jsonl.gz).'
      ) from None
    if not table.metadata.num_rows:
      raise ConfigError(f'{path} has no rows; remove it or give it text.')
    if spec.text_field not in table.schema_arrow.names:
      raise ConfigError(
        f'{path} has no column {spec.text_field!r} (columns: '
        f'{", ".join(table.schema_arrow.names)}); set --text_field (config.data.text_field).'
      )
    try:
      for batch in table.iter_batches(columns=[spec.text_field]):
        yield from (text for text in batch.column(0).to_pylist() if text)
    except (pa.ArrowException, OSError) as e:
      raise ConfigError(
        f'{path} is a damaged Parquet file ({str(e).splitlines()[0][:120]}); fix or remove it.'
      ) from None


def _json_text(line: bytes, path: str, offset: int, spec: Spec) -> str:
  text = _decode(line, path, offset, spec.encoding_errors)
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(
      f'{path}:{_line_number(path, offset)}: not JSON ({e.msg.removesuffix(" at")}, column '
      f'{e.colno}); fix the line.'
    ) from None
  if not isinstance(record, dict) or not isinstance(record.get(spec.text_field), str):
    where = f'{path}:{_line_number(path, offset)}'
    if isinstance(record, dict) and spec.text_field in record:
      raise ConfigError(
        f'{where}: its field {spec.text_field!r} holds {json.dumps(record[spec.text_field])[:60]}, not a '
        f'string; give it the text, or remove the line.'
      )
    raise ConfigError(
      f'{where}: no string field {spec.text_field!r}; set '
      f'--text_field (config.data.text_field) to the field that holds the text.'
    )
  return record[spec.text_field]


def _line_number(path: str, offset: int) -> int:
  """The number of the line at byte `offset` of a (decompressed) file: only for messages."""
  with _open(path) as raw:
    f = gzip.open(raw) if path.endswith('.gz') else raw
    number, left = 1, offset
    while left > 0 and (block := f.read(min(left, 1 << 20))):
      number, left = number + block.count(b'\n'), left - len(block)
  return number


def held_out(text: str, fraction: float) -> bool:
  """Whether a document (without validation files) goes to the validation split: by a hash of
  its text, so the choice does not depend on order, files or workers."""
  digest = int.from_bytes(hashlib.sha256(text.encode('utf-8', 'replace')).digest()[:8], 'big')
  return digest / 2**64 < fraction


# =============================================================================================
# 1. The driver: work items and the tokenizer's sample
# =============================================================================================
@dataclasses.dataclass(frozen=True)
class Part:
  """A file, or the byte range [start, stop) of a .jsonl file (the lines starting inside it)."""

  path: str
  split: str  # The file's split ('train' or 'validation'); '' splits each document by hash.
  start: int = 0
  stop: int | None = None


@dataclasses.dataclass(frozen=True)
class Item:
  """A pipeline work item: parts of files in input order, or a named source's (split, text)
  pairs; its shards hold its documents of each split in that order."""

  parts: tuple[Part, ...] = ()
  texts: tuple[tuple[str, str], ...] = ()
  bytes: int = 0


def work_items(spec: Spec) -> tuple[list[Item], list[str]]:
  """(work items, input files), from the file listing alone: .jsonl files in ranges of
  CHUNK_BYTES, runs of .txt files up to CHUNK_BYTES (and CHUNK_DOCS files), a .jsonl.gz or
  .parquet file whole."""
  if spec.source:
    docs = sources.load(spec.source)
    pairs = [(split, text) for split in SPLITS for text in docs[split]]
    chunks = [tuple(pairs[i : i + CHUNK_DOCS]) for i in range(0, len(pairs), CHUNK_DOCS)]
    return [Item(texts=c, bytes=sum(len(t) for _, t in c)) for c in chunks], []
  from etils import epath

  files = [(p, 'train') for p in expand(spec.train, 'config.data.train')]
  files += [(p, 'validation') for p in expand(spec.validation, 'config.data.validation')]
  items, run = [], []

  def flush():
    items.append(Item(parts=tuple(p for p, _ in run), bytes=sum(n for _, n in run)))
    run.clear()

  for path, file_split in files:
    fmt, size = _format(path), epath.Path(path).stat().length
    if not size:
      raise ConfigError(f'{path} is empty; remove it or give it text.')
    split = file_split if spec.validation else ''
    if fmt == '.txt':
      if run and (sum(n for _, n in run) + size > CHUNK_BYTES or len(run) == CHUNK_DOCS):
        flush()
      run.append((Part(path, split), size))
      continue
    if run:
      flush()
    if fmt == '.jsonl':
      for start in range(0, size, CHUNK_BYTES):
        stop = min(start + CHUNK_BYTES, size)
        items.append(
          Item((Part(path, split, start, None if stop == size else stop),), bytes=stop - start)
        )
    else:
      items.append(Item((Part(path, split),), bytes=size))
  if run:
    flush()
  return items, [p for p, _ in files]


def item_documents(item: Item, spec: Spec) -> Iterator[tuple[str, str]]:
  """(split, text) of a work item's documents, in order."""
  yield from item.texts
  for part in item.parts:
    for text in documents(part, spec):
      hashed = 'validation' if held_out(text, spec.validation_fraction) else 'train'
      yield part.split or hashed, text


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


def sampled_items(items: list[Item]) -> list[int]:
  """The items the tokenizer's sample reads: all of them up to SAMPLE_BYTES, else evenly spaced
  ones of about SAMPLE_BYTES in all (so the driver's time and memory do not grow with the
  corpus)."""
  total = sum(item.bytes for item in items)
  if total <= SAMPLE_BYTES:
    return list(range(len(items)))
  k = -(-len(items) * SAMPLE_BYTES // total)
  return sorted({j * len(items) // k for j in range(k)})


def sample(items: list[Item], spec: Spec) -> list[str]:
  """A bounded, seeded sample of training lines (SAMPLE_LINES at most) from `sampled_items`."""
  reservoir = _Sample(SAMPLE_LINES)
  for index in sampled_items(items):
    for split, text in item_documents(items[index], spec):
      if split == 'train':
        reservoir.add(text)
  return reservoir.lines


# =============================================================================================
# 3. The Beam pipeline
# =============================================================================================
def shard_name(split: str, item: int) -> str:
  return f'{split}-{item:05d}.array_record'


def _item_key(item: Item, spec: Spec, identity: dict) -> str:
  """What an item's outputs are made of: a finished item of the same key is not redone."""
  text = json.dumps([dataclasses.asdict(item), dataclasses.asdict(spec), identity], sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def _write_item(indexed: tuple[int, Item], spec: Spec, identity: dict, proto: bytes, output: str):
  """Tokenizes one work item and writes its documents of each split as one shard, with the
  tokens of each document, then the item's record (`item-N.json`: its shards' documents,
  tokens, size and sha256); each file under a temporary name renamed when whole, the record
  last. An item already recorded with the same key is left as it is; a bad input is written to
  `error-N.txt` for the driver to report."""
  from array_record.python import array_record_module

  index, item = indexed
  out = pathlib.Path(output)
  key = _item_key(item, spec, identity)
  record = out / f'item-{index:05d}.json'
  if record.exists() and json.loads(record.read_text()).get('key') == key:
    return
  tok = tokenizer_lib.from_identity(identity, proto)
  writers, lengths = {}, {s: [] for s in SPLITS}
  final = {s: out / shard_name(s, index) for s in SPLITS}
  partial = {s: p.with_name(f'.{p.name}.{os.getpid()}.partial') for s, p in final.items()}
  try:
    for split, text in item_documents(item, spec):
      if split not in writers:
        writers[split] = array_record_module.ArrayRecordWriter(str(partial[split]), 'group_size:1')
      tokens = np.asarray(tok.encode(text) + [tok.eos_id], np.int32)
      writers[split].write(tokens.tobytes())
      lengths[split].append(len(tokens))
  except ConfigError as e:
    for split, writer in writers.items():
      writer.close()
      partial[split].unlink()
    _atomic_bytes(out / f'error-{index:05d}.txt', str(e).encode())
    raise
  shards = {}
  for split, writer in writers.items():
    writer.close()
    counts = np.asarray(lengths[split], np.int32)
    _atomic_bytes(final[split].with_suffix('.lengths.npy'), _npy_bytes(counts))
    data = partial[split].read_bytes()
    os.replace(partial[split], final[split])
    shards[split] = {
      'file': final[split].name,
      'documents': len(counts),
      'tokens': int(counts.sum()),
      'bytes': len(data),
      'sha256': hashlib.sha256(data).hexdigest(),
    }
  _atomic_bytes(record, json.dumps({'key': key, 'shards': shards}).encode())


def _digest(indexed: tuple[int, str], output: str) -> None:
  """An input file's size and sha256, as `input-N.json`."""
  index, path = indexed
  digest, size = hashlib.sha256(), 0
  with _open(path) as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
      size += len(block)
  entry = {'path': path, 'bytes': size, 'sha256': digest.hexdigest()}
  _atomic_bytes(pathlib.Path(output) / f'input-{index:05d}.json', json.dumps(entry).encode())


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def _atomic_bytes(path: pathlib.Path, data: bytes) -> None:
  partial = path.with_name(f'.{path.name}.{os.getpid()}.partial')
  partial.write_bytes(data)
  os.replace(partial, path)


def tok_proto(tok) -> bytes:
  return tok.proto if tok.identity['kind'] in tokenizer_lib.FILES else b''


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


def run_pipeline(
  items: list[Item], files: list[str], spec: Spec, tok, output, workers: int, beam_args
) -> None:
  """Runs step 3 (see the module docstring) on Beam's DirectRunner with `workers` processes,
  or on the runner `beam_args` name. A bad input found by a worker is raised here as the one
  sentence it wrote."""
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
  log = pathlib.Path(output) / '.workers.log'
  try:
    with (
      _stderr_to(log if workers > 1 else None),
      _temporary_files_in(pathlib.Path(tempfile.mkdtemp(prefix='.beam-tmp-', dir=output))),
      beam.Pipeline(options=options) as p,
    ):
      _ = (
        p
        | 'Items' >> beam.Create(list(enumerate(items)))
        | 'Spread' >> beam.Reshuffle()
        | 'Write' >> beam.Map(_write_item, spec, tok.identity, tok_proto(tok), str(output))
      )
      _ = (
        p
        | 'Inputs' >> beam.Create(list(enumerate(files)))
        | 'SpreadInputs' >> beam.Reshuffle()
        | 'Digest' >> beam.Map(_digest, str(output))
      )
  except Exception as e:
    errors = sorted(pathlib.Path(output).glob('error-*.txt'))
    if errors:
      message = errors[0].read_text()
      for error in errors:
        error.unlink()
      log.unlink(missing_ok=True)
      raise ConfigError(message) from None
    if workers > 1:
      e.add_note(f"The workers' log: {log}")
    raise
  log.unlink(missing_ok=True)


@contextlib.contextmanager
def _temporary_files_in(directory: pathlib.Path):
  """The temporary files of this process and the ones it starts (TMPDIR) in `directory`,
  removed afterwards: Beam leaves empty directories behind in the system's on every run."""
  saved = os.environ.get('TMPDIR'), tempfile.tempdir
  os.environ['TMPDIR'] = tempfile.tempdir = str(directory)
  try:
    yield
  finally:
    if saved[0] is None:
      os.environ.pop('TMPDIR', None)
    else:
      os.environ['TMPDIR'] = saved[0]
    tempfile.tempdir = saved[1]
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _stderr_to(path: pathlib.Path | None):
  """Standard error (file descriptor 2, which DirectRunner's worker processes inherit, with the
  log lines they relay) into `path` for the duration."""
  if path is None:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, 'ab') as f:
    os.dup2(f.fileno(), 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


# =============================================================================================
# The command
# =============================================================================================
def prepare(
  spec: Spec,
  output: str | pathlib.Path,
  workers: int = 1,
  beam_args=(),
  say=lambda _: None,
  overwrite: bool = False,
) -> dict:
  """Prepares `spec` into `output` (see the module docstring); returns the manifest. A
  directory with a manifest of the same spec and input files is returned as it is (what is
  missing or damaged in it mended first); one that a killed prepare left is finished (its
  finished items kept); one whose manifest is of another spec or tokenizer file is refused
  unless `overwrite`. `say` gets a line per step, with its time."""
  output = local_directory(output, '--output', '--output /mnt/bucket/prepared')
  spec.check()
  started = time.perf_counter()
  if output.exists() and not output.is_dir():
    raise ConfigError(f'--output {output} is a file; give a directory to write the corpus into.')
  step = lambda what: say(f'[{time.perf_counter() - started:6.1f} s] {what}')
  given = tokenizer_lib.given(spec.tokenizer, spec.tokenizer_model)  # None: to be trained.
  try:
    existing = read_manifest(output, must_exist=False)
  except ConfigError:  # Damaged, or written by another layout version: prepared anew.
    existing = None
  if (
    existing
    and existing['spec'] == spec.as_json()
    and (not given or existing['tokenizer'] == given.identity)  # The model file unchanged.
  ):
    changed = _changed_inputs(spec, existing)
    found = [] if changed else damage(output, existing)
    if not (changed or found):
      return existing
  else:
    if existing and not overwrite:
      raise ConfigError(
        f'--output {output} holds a corpus prepared with other settings ({_other(existing, spec)}); '
        f'give another --output, or add --overwrite to replace it.'
      )
    changed, found = '', []
  items, files = work_items(spec)  # The inputs are there: checked before anything changes.
  if changed:
    step(f'the inputs changed since {output} was prepared ({changed}): prepared anew')
    for record in output.glob('item-*.json'):  # Nothing of the old inputs is kept.
      record.unlink()
  if found:
    damaged = sorted({item for _, _, item in found if item is not None})
    step(f'{len(damaged)} item(s) with a missing or damaged file are prepared again')
    for index in damaged:
      (output / f'item-{index:05d}.json').unlink(missing_ok=True)
    kind = existing['tokenizer']['kind']  # Its tokenizer, if whole, is kept, not trained again.
    name = tokenizer_lib.FILES.get(kind)
    if not given and name and output / name not in [p for p, _, _ in found]:
      given = tokenizer_lib.from_identity(existing['tokenizer'], (output / name).read_bytes())
  # Whatever the directory held is rewritten: no manifest may vouch for it meanwhile.
  (output / MANIFEST).unlink(missing_ok=True)
  with removed_if_left_empty(output):  # Nothing but an empty directory is taken back.
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob('.*.partial'):  # Left by a killed prepare (not by a running one).
      if not _running(int(stale.name.rsplit('.', 2)[1])):
        stale.unlink(missing_ok=True)
    for stale in output.glob('error-*.txt'):
      stale.unlink()
    step(f'{len(items)} work items of {sum(i.bytes for i in items):,} bytes in all')
    tok = given
    if not tok:
      lines = sample(items, spec) if spec.tokenizer == 'sentencepiece' else []
      if lines:
        step(f"the tokenizer's sample: {len(lines):,} lines from {len(sampled_items(items))} items")
      tok = tokenizer_lib.train(spec.tokenizer, spec.vocab_size, lines)
    if tok.identity['kind'] in tokenizer_lib.FILES:
      _atomic_bytes(output / tokenizer_lib.FILES[tok.identity['kind']], tok.proto)
      step(f'the tokenizer {"given" if given else "trained"}: {tok.identity["sha256"][:12]}')
    run_pipeline(items, files, spec, tok, output, workers, beam_args)
    step(f'the pipeline wrote {len(items)} items with {workers} worker(s)')
    manifest = _write_manifest(output, spec, tok, items, files)
    step('the manifest written')
    return manifest


def _other(manifest: dict, spec: Spec) -> str:
  """The flags whose values `manifest`'s corpus was prepared with differ from `spec`'s."""
  held, wanted = manifest['spec'], spec.as_json()
  differing = [f'--{name}' for name in wanted if held.get(name) != wanted[name]]
  return ', '.join(differing) if differing else "the --tokenizer_model file's content"


def damage(
  output: pathlib.Path, manifest: dict, counts: bool = True
) -> list[tuple[pathlib.Path, str, int | None]]:
  """What is missing or damaged in a prepared directory, as (file, what is wrong with it, the
  work item that wrote it or None for a split's offsets and the tokenizer's file): each shard's
  size, the entries of each split's offsets and, with `counts`, of each shard's token counts
  (which only prepare reads: training leaves them out), the tokenizer's digest. Sizes and
  array headers: no shard is read. [] when all are whole."""

  def entries(path: pathlib.Path) -> int | None:
    try:
      return np.load(path, mmap_mode='r').shape[0]
    except (OSError, ValueError, EOFError, IndexError):
      return None

  def wrong(path: pathlib.Path, got, wanted, unit: str) -> str | None:
    if not path.is_file():
      return 'missing'
    if got is None:
      return 'damaged (cut short or not an array)'
    return None if got == wanted else f'{got} {unit}, not {wanted}'

  found = []
  for split, info in manifest['splits'].items():
    path = output / f'{split}.offsets.npy'
    problem = wrong(path, entries(path), info['documents'] + 1, 'entries')
    found += [(path, problem, None)] if problem else []
    for shard in info['shards']:
      path = output / shard['file']
      item = int(path.stem.rsplit('-', 1)[1])
      size = path.stat().st_size if path.is_file() else None
      problem = wrong(path, size, shard['bytes'], 'bytes')
      found += [(path, problem, item)] if problem else []
      if counts:
        lengths = path.with_suffix('.lengths.npy')
        problem = wrong(lengths, entries(lengths), shard['documents'], 'entries')
        found += [(lengths, problem, item)] if problem else []
  identity = manifest['tokenizer']
  if identity['kind'] in tokenizer_lib.FILES:
    path = output / tokenizer_lib.FILES[identity['kind']]
    if not path.is_file():
      found.append((path, 'missing', None))
    elif hashlib.sha256(path.read_bytes()).hexdigest() != identity['sha256']:
      found.append((path, 'not the file its manifest records', None))
  return found


def _changed_inputs(spec: Spec, manifest: dict) -> str:
  """How the files `spec`'s globs match now differ from the inputs `manifest` records: files
  added, gone or of another size ('' when none, for a named source, or when none match: a
  directory whose inputs were moved away stands as prepared). An edit that keeps a file's size
  is not seen (the digests would mean reading every input)."""
  from etils import epath

  if spec.source:
    return ''
  try:
    paths = expand(spec.train, 'config.data.train') + expand(
      spec.validation, 'config.data.validation'
    )
  except ConfigError:
    return ''
  now = {path: epath.Path(path).stat().length for path in paths}
  recorded = {entry['path']: entry['bytes'] for entry in manifest['inputs']}
  counts = {
    'added': len(now.keys() - recorded.keys()),
    'gone': len(recorded.keys() - now.keys()),
    'of another size': sum(recorded[p] != n for p, n in now.items() if p in recorded),
  }
  return ', '.join(f'{n} file(s) {what}' for what, n in counts.items() if n)


def _write_manifest(output: pathlib.Path, spec: Spec, tok, items: list[Item], files) -> dict:
  """Step 4: per split, the offsets of its documents' tokens; then the manifest."""
  records = []
  for index in range(len(items)):
    path = output / f'item-{index:05d}.json'
    if not path.exists():
      raise ConfigError(f'prepare wrote no {path.name} in {output}; run it again.')
    records.append(json.loads(path.read_text())['shards'])
  manifest = {
    'version': VERSION,
    'spec': dataclasses.asdict(spec),
    'tokenizer': tok.identity,
    'inputs': [json.loads((output / f'input-{i:05d}.json').read_text()) for i in range(len(files))]
    or [{'source': spec.source}],
    'splits': {},
  }
  for split in SPLITS:
    shards = [r[split] for r in records if split in r]
    if not shards:
      raise ConfigError(
        f'the inputs give no {split} documents; add files'
        + (
          ' or raise --validation_fraction (config.data.validation_fraction in a run).'
          if split == 'validation'
          else '.'
        )
      )
    lengths = np.concatenate(
      [np.load((output / s['file']).with_suffix('.lengths.npy')) for s in shards]
    )
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    _atomic_bytes(output / f'{split}.offsets.npy', _npy_bytes(offsets))
    manifest['splits'][split] = {
      'documents': sum(s['documents'] for s in shards),
      'tokens': int(offsets[-1]),
      'shards': shards,
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
    assert {'spec', 'tokenizer', 'inputs'} <= set(manifest)
    identity = manifest['tokenizer']
    assert identity['kind'] in tokenizer_lib.FILES or identity['kind'] == 'bytes'
    assert identity['kind'] not in tokenizer_lib.FILES or isinstance(identity['sha256'], str)
    for split, info in manifest['splits'].items():
      assert isinstance(info['tokens'], int) and isinstance(info['documents'], int)
      assert info['shards']
      for shard in info['shards']:
        assert {'file', 'documents', 'tokens', 'bytes'} <= set(shard)
        assert re.fullmatch(rf'{split}-\d+\.array_record', shard['file'])
  except (json.JSONDecodeError, KeyError, AssertionError, TypeError):
    raise ConfigError(
      f'{path} is damaged; prepare {directory} again (python -m fm.data.prepare).'
    ) from None
  return manifest


# The flags of this command for the config keys that the data layer's messages name.
FLAG_OF_KEY = {
  'config.data.tokenizer.vocab_size': '--vocab_size',
  'config.data.tokenizer.model': '--tokenizer_model',
  'config.data.tokenizer.kind': '--tokenizer',
  'config.data.validation_fraction': '--validation_fraction',
  'config.data.validation': '--validation',
  'config.data.train': '--train',
  'config.data.text_field': '--text_field',
  'config.data.encoding_errors': '--encoding_errors',
  'config.data.dataset': '--source',
}


def in_flags(message: str) -> str:
  """A data-layer message with this command's flags for the config keys it names."""
  message = re.sub(r'(--\w+) \(config\.data\.[\w.]+\)', r'\1', message)  # '--x (config.data.x)'
  for key, flag in FLAG_OF_KEY.items():
    message = re.sub(rf'(--)?{re.escape(key)}\b', flag, message)
  return message


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
  parser.add_argument(
    '--source', default='', choices=sorted(sources.SOURCES), help='a named source'
  )
  parser.add_argument('--output', required=True, help='directory to write')
  parser.add_argument('--validation_fraction', type=float, default=Spec.validation_fraction)
  parser.add_argument('--text_field', default=Spec.text_field)
  parser.add_argument('--tokenizer', default=Spec.tokenizer, choices=tokenizer_lib.KINDS)
  parser.add_argument('--vocab_size', type=int, default=Spec.vocab_size)
  parser.add_argument(
    '--tokenizer_model',
    default='',
    help="a SentencePiece .model to use instead of training one (another corpus's "
    'tokenizer.model); with --tokenizer hf, a Hugging Face model directory',
  )
  parser.add_argument('--encoding_errors', default='strict', choices=('strict', 'replace'))
  parser.add_argument('--workers', type=int, default=1, help='DirectRunner worker processes')
  parser.add_argument(
    '--overwrite', action='store_true', help='replace a corpus of other settings in --output'
  )
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
    args.tokenizer_model,
    args.encoding_errors,
  )
  try:
    manifest = prepare(
      spec,
      args.output,
      args.workers,
      beam_args,
      lambda line: print(line, file=sys.stderr),
      overwrite=args.overwrite,
    )
  except ConfigError as e:
    print(f'error: {in_flags(str(e))}', file=sys.stderr)
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
