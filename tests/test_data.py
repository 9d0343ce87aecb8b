"""Real-data sources, prepared corpora (Beam, ArrayRecord, manifest), lossless tokenizers, and a
deterministic, process-disjoint, elastic pipeline."""

import collections
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import pytest

from fm import ConfigError
from fm.data import pipeline, prepare, sources, tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = 'the a river stone light of and in is was quiet north field bright old'.split()


def write_corpus(directory: pathlib.Path, files: int = 3, docs: int = 40, seed: int = 0):
  """`files` jsonl files of `docs` documents of random words each."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  for f in range(files):
    lines = []
    for _ in range(docs):
      text = ' '.join(rng.choice(WORDS, rng.integers(5, 60)))
      lines.append(json.dumps({'text': text, 'id': f}))
    (directory / f'part-{f}.jsonl').write_text('\n'.join(lines) + '\n')
  return str(directory / '*.jsonl')


def byte_spec(train: str, **fields) -> prepare.Spec:
  return prepare.Spec(train=(train,), tokenizer='bytes', validation_fraction=0.2, **fields)


def shards(directory: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if not p.name.startswith('.')}


# =============================================================================================
# Sources and tokenizers
# =============================================================================================
def test_shakespeare_held_out_by_work():
  splits = sources.shakespeare()
  assert len(splits['train']) > 60 and len(splits['validation']) >= 4
  with tarfile.open(sources.fetch(sources.SHAKESPEARE)) as tar:
    names = [
      m.name
      for m in tar.getmembers()
      if m.name.endswith('.txt') and '/texts/' in m.name and 'metadata' not in m.name
    ]
  works = {}
  for n in names:
    works.setdefault(sources.shakespeare_work(n), []).append(n)
  # Most plays come in two editions whose file names differ; the aliases join them.
  assert sum(len(v) == 2 for v in works.values()) >= 35
  assert all(len(v) <= 2 for v in works.values())
  # Each document's work, by its text: no work has an edition in each split.
  with tarfile.open(sources.fetch(sources.SHAKESPEARE)) as tar:
    work_of = {
      tar.extractfile(tar.getmember(n)).read().decode('utf-8'): sources.shakespeare_work(n)
      for n in names
    }
  held = {split: {work_of[text] for text in splits[split]} for split in splits}
  assert not held['train'] & held['validation']
  assert any(len(works[w]) == 2 for w in held['validation'])  # Two editions held out together.
  assert sum(len(works[w]) for w in held['validation']) == len(splits['validation'])


def test_news_source():
  splits = sources.news()
  assert 3500 < len(splits['train']) + len(splits['validation']) <= 3824
  assert 100 < len(splits['validation']) < 400


def test_unknown_dataset():
  with pytest.raises(ConfigError, match=r"config.data.dataset='nope' is unknown.*shakespeare"):
    sources.load('nope')


def test_tokenizers_round_trip(shakespeare_data):
  held_out = shakespeare_data.validation.document(0)  # A held-out play.
  sample = shakespeare_data.tokenizer.decode(held_out[:3000])
  weird = '  Enter HAMLET.\n\n\tTo be, or not to be — ‘tis naïve 1603 ☃\n'
  for tok in (shakespeare_data.tokenizer, tokenizer.ByteTokenizer()):
    for s in (sample, weird, ''):
      assert tok.decode(tok.encode(s)) == s
  # Bytes per token add up to the UTF-8 length of the text.
  tok = shakespeare_data.tokenizer
  ids = tok.encode(weird)
  assert tok.token_bytes()[ids].sum() == len(weird.encode('utf-8'))


def test_tokenizer_kinds():
  assert tokenizer.train('bytes', 4096, []).vocab_size == 259
  with pytest.raises(ConfigError, match='config.data.tokenizer.kind'):
    tokenizer.train('bpe', 4096, ['text'])
  with pytest.raises(
    ConfigError,
    match=r'vocab_size=4096 is more than this corpus can give a '
    r'SentencePiece model; set it to at most \d+',
  ):
    tokenizer.train('sentencepiece', 4096, ['a small corpus', 'of two lines'])


# =============================================================================================
# Prepare
# =============================================================================================
def test_prepare_is_deterministic_with_any_number_of_workers(tmp_path, monkeypatch):
  """The same inputs give byte-identical shards, offsets and manifest, with 1 or 2 workers
  (leaving no temporary directory behind); work items are byte ranges of the files, and each split holds every document once, in input
  order."""
  monkeypatch.setattr(prepare, 'CHUNK_BYTES', 50_000)
  system_tmp = tmp_path / 'tmp'  # Beam's temporary directories go elsewhere, and go.
  system_tmp.mkdir()
  monkeypatch.setenv('TMPDIR', str(system_tmp))
  monkeypatch.setattr(tempfile, 'tempdir', str(system_tmp))
  spec = byte_spec(write_corpus(tmp_path / 'in', files=3, docs=2500))
  one = prepare.prepare(spec, tmp_path / 'one', workers=1)
  two = prepare.prepare(spec, tmp_path / 'two', workers=2)
  assert one == two and shards(tmp_path / 'one') == shards(tmp_path / 'two')
  assert not list(system_tmp.iterdir()) and not list(tmp_path.glob('*/.beam-tmp*'))
  counts = {s: one['splits'][s]['documents'] for s in prepare.SPLITS}
  assert sum(counts.values()) == 7500 and 0.15 < counts['validation'] / 7500 < 0.25
  files = sorted((tmp_path / 'in').iterdir())
  assert len(one['splits']['train']['shards']) >= sum(f.stat().st_size for f in files) // 50_000
  assert [i['path'] for i in one['inputs']] == [str(f) for f in files]
  assert one['inputs'][0]['sha256'] == hashlib.sha256(files[0].read_bytes()).hexdigest()
  texts = [json.loads(line)['text'] for f in files for line in f.read_text().splitlines()]
  tok = tokenizer.ByteTokenizer()
  for split, want in (
    ('train', [t for t in texts if not prepare.held_out(t, 0.2)]),
    ('validation', [t for t in texts if prepare.held_out(t, 0.2)]),
  ):
    data = pipeline.Split(tmp_path / 'one', split, one, np.ones(259, np.int32))
    assert [tok.decode(data.document(n)[:-1]) for n in range(len(want))] == want


def test_prepare_with_a_trained_tokenizer_is_deterministic(tmp_path):
  """A SentencePiece model trained by prepare is the same model (byte for byte) every time, so
  its shards are too."""
  spec = prepare.Spec(train=(write_corpus(tmp_path / 'in', files=2, docs=300),), vocab_size=300)
  one = prepare.prepare(spec, tmp_path / 'one')
  two = prepare.prepare(spec, tmp_path / 'two', workers=2)
  assert one['tokenizer']['kind'] == 'sentencepiece' and one == two
  assert shards(tmp_path / 'one') == shards(tmp_path / 'two')


def test_the_tokenizer_sample_is_bounded(monkeypatch):
  """The driver reads every work item of a small corpus and evenly spaced ones of about
  SAMPLE_BYTES of a large one."""
  items = [prepare.Item(bytes=10) for _ in range(100)]
  assert prepare.sampled_items(items) == list(range(100))
  monkeypatch.setattr(prepare, 'SAMPLE_BYTES', 95)
  chosen = prepare.sampled_items(items)
  assert len(chosen) == 10 and chosen == list(range(0, 100, 10))


def test_prepare_killed_then_rerun_gives_the_same_shards(tmp_path):
  """A prepare killed mid-way leaves no manifest (so nothing that looks complete); run again it
  writes what a run never killed writes."""
  corpus = write_corpus(tmp_path / 'in', files=4, docs=3000)
  command = [
    sys.executable,
    '-m',
    'fm.data.prepare',
    '--train',
    corpus,
    '--tokenizer',
    'bytes',
    '--validation_fraction',
    '0.2',
  ]
  clean = subprocess.run(
    [*command, '--output', str(tmp_path / 'clean')],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert clean.returncode == 0, clean.stderr[-2000:]
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(
    [*command, '--output', str(killed)],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  while not list(killed.glob('*.array_record')) and time.time() < deadline:
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (killed / prepare.MANIFEST).exists()
  with pytest.raises(ConfigError, match='has no manifest.json: it is not a prepared corpus'):
    prepare.read_manifest(killed)
  rerun = subprocess.run(
    [*command, '--output', str(killed)], cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert shards(killed) == shards(tmp_path / 'clean')
  assert not list(killed.glob('.*.partial'))  # The killed run's half-written files are gone.


def test_input_formats_and_validation_files(tmp_path):
  """.txt (a document per file), .jsonl.gz and .parquet (a named column) read alike; validation
  files make the held-out split."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  (tmp_path / 'a.txt').write_text('First document.\nTwo lines.')
  with gzip.open(tmp_path / 'b.jsonl.gz', 'wt') as f:
    f.write(json.dumps({'body': 'Second document.'}) + '\n\n')
  pq.write_table(pa.table({'body': ['Third.', 'Fourth.']}), tmp_path / 'c.parquet')
  (tmp_path / 'held').mkdir()
  (tmp_path / 'held' / 'v.jsonl').write_text('{"body": "held out one"}\n')
  spec = prepare.Spec(
    train=(str(tmp_path / '[bc].*'),),
    validation=(str(tmp_path / 'held/*'),),
    text_field='body',
    tokenizer='bytes',
  )
  manifest = prepare.prepare(spec, tmp_path / 'out')
  assert [manifest['splits'][s]['documents'] for s in prepare.SPLITS] == [3, 1]
  split = pipeline.Split(tmp_path / 'out', 'train', manifest, np.ones(259, np.int32))
  tok = tokenizer.ByteTokenizer()
  assert [tok.decode(split.document(n)[:-1]) for n in range(3)] == [
    'Second document.',
    'Third.',
    'Fourth.',
  ]


BAD_FILES = [
  ('x.md', 'text', r'x.md: unknown file type; give .txt, .jsonl, .jsonl.gz, .parquet files'),
  ('x.jsonl', '', r'x.jsonl is empty; remove it or give it text'),
  ('x.jsonl', '{"text": "ok"}\n{"text": \n', r'x.jsonl:2: not JSON .*; fix the line'),
  (
    'x.jsonl',
    '{"text": "ok"}\n{"body": "no"}\n',
    r"x.jsonl:2: no string field 'text'; set "
    r'--text_field \(config.data.text_field\)',
  ),
  ('x.jsonl', '{"text": null}\n', r"x.jsonl:1: its field 'text' holds null, not a string; give"),
  (
    'x.jsonl',
    b'{"text": "caf\xe9"}\n',
    r'x.jsonl: bytes at offset 13 are not UTF-8; fix the '
    r'file or prepare with --encoding_errors=replace',
  ),
  (
    'x.jsonl.gz',
    gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n', mtime=0),  # The same in every worker.
    r'x.jsonl.gz: bytes at offset 28 of its decompressed text are not UTF-8',
  ),
  (
    'x.jsonl.gz',
    gzip.compress(b'{"text": "ok"}\n' * 50, mtime=0)[:-12],
    r'x.jsonl.gz is not a whole gzip file \(Compressed file ended .*\); fix or remove it',
  ),
  ('x.jsonl.gz', b'{"text": "ok"}\n', r'x.jsonl.gz is not a whole gzip file \(Not a gzipped file'),
  ('x.parquet', b'{"text": "ok"}\n', r'x.parquet is not a readable Parquet file \(.*magic bytes'),
]


@pytest.mark.parametrize(
  'name,content,message', BAD_FILES, ids=[f'{i}-{name}' for i, (name, _, _) in enumerate(BAD_FILES)]
)
def test_bad_input_files_are_one_sentence(name, content, message, tmp_path):
  path = tmp_path / 'in' / name
  path.parent.mkdir()
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(ConfigError, match=message):
    prepare.prepare(byte_spec(str(path)), tmp_path / 'out')
  assert not (tmp_path / 'out' / prepare.MANIFEST).exists()


def test_bad_input_edge_cases(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({'text': pa.array([], pa.string())}), tmp_path / 'none.parquet')
  with pytest.raises(ConfigError, match=r'none.parquet has no rows; remove it or give it text'):
    prepare.prepare(byte_spec(str(tmp_path / 'none.parquet')), tmp_path / 'out')
  with pytest.raises(
    ConfigError,
    match=r"config.data.train pattern '.*nothing/\*.jsonl' matches "
    r'no file; fix the path',
  ):
    prepare.prepare(byte_spec(str(tmp_path / 'nothing/*.jsonl')), tmp_path / 'out')
  (tmp_path / 'x.jsonl').write_bytes(b''.join(b'{"text": "caf\xe9 %d"}\n' % i for i in range(20)))
  spec = prepare.Spec(
    train=(str(tmp_path / 'x.jsonl'),),
    tokenizer='bytes',
    validation_fraction=0.5,
    encoding_errors='replace',
  )
  manifest = prepare.prepare(spec, tmp_path / 'replaced')
  assert (
    manifest['splits']['train']['documents'] + manifest['splits']['validation']['documents'] == 20
  )
  (tmp_path / 'replaced' / prepare.MANIFEST).write_text('{"version": 1')
  with pytest.raises(ConfigError, match=r'manifest.json is damaged; prepare .* again'):
    prepare.read_manifest(tmp_path / 'replaced')
  # 5 meaning 5%: refused before anything is read or written, with the command's flag.
  five = dataclasses.replace(spec, validation_fraction=5.0)
  with pytest.raises(ConfigError, match=r'validation_fraction=5.0 must lie in \[0, 1\)'):
    prepare.prepare(five, tmp_path / 'five')
  assert not (tmp_path / 'five').exists()
  assert prepare.in_flags(str(pytest.raises(ConfigError, five.check).value)).startswith(
    '--validation_fraction=5.0 must lie'
  )
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(ConfigError, match=r'--output .*a_file is a file; give a directory'):
    prepare.prepare(spec, tmp_path / 'a_file')
  # A quoted ~ in a glob is the home directory, as everywhere else in fm.
  home = str(pathlib.Path.home())
  with pytest.MonkeyPatch.context() as env:
    env.setenv('HOME', str(tmp_path))
    assert prepare.expand(('~/x.jsonl',), 'config.data.train') == [str(tmp_path / 'x.jsonl')]
  assert str(pathlib.Path.home()) == home


# =============================================================================================
# Windows and the pipeline
# =============================================================================================
@pytest.fixture(scope='module')
def small(tmp_path_factory):
  """A prepared corpus of documents of 5, 3 and 12 bytes (EOS included) plus others."""
  root = tmp_path_factory.mktemp('small')
  (root / 'train.jsonl').write_text(
    ''.join(
      json.dumps({'text': t}) + '\n' for t in ['abcd', 'ef', 'ghijklmnopq'] + ['rst uvw'] * 60
    )
  )
  (root / 'valid.jsonl').write_text(json.dumps({'text': 'held out'}) + '\n')
  spec = prepare.Spec(
    train=(str(root / 'train.jsonl'),), validation=(str(root / 'valid.jsonl'),), tokenizer='bytes'
  )
  manifest = prepare.prepare(spec, root / 'out')
  return pipeline.Split(root / 'out', 'train', manifest, np.ones(259, np.int32))


def test_windows_pack_documents(small):
  w = small.window(0, 8)
  np.testing.assert_array_equal(w['segment_ids'], [1, 1, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(w['positions'], [0, 1, 2, 3, 4, 0, 1, 2])
  w = small.window(1, 8)  # Inside the 12-token document.
  np.testing.assert_array_equal(w['segment_ids'], [1] * 8)
  np.testing.assert_array_equal(w['positions'], range(8))
  assert bytes((w['tokens'] - 3).astype(np.uint8)).decode() == 'ghijklmn'


def test_windows_read_from_many_threads_equal_serial_reads(varied, monkeypatch):
  """Grain's prefetch threads read windows at once: every window read concurrently (documents
  evicted from the shared cache by other threads meanwhile; a one-document cache and a tiny
  thread switch interval make that constant) equals the same window read alone."""
  from concurrent import futures

  n = varied.num_windows(16)
  serial = [varied.window(i, 16)['tokens'] for i in range(n)]
  monkeypatch.setattr(pipeline.Split, 'CACHED_DOCUMENTS', 1)
  interval = sys.getswitchinterval()
  sys.setswitchinterval(1e-6)
  try:
    order = list(range(n)) * 40
    with futures.ThreadPoolExecutor(8) as pool:
      windows = list(pool.map(lambda i: varied.window(i, 16)['tokens'], order))
  finally:
    sys.setswitchinterval(interval)
  for i, tokens in zip(order, windows):
    np.testing.assert_array_equal(tokens, serial[i])


def take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


@pytest.fixture(scope='module')
def varied(tmp_path_factory):
  """A prepared corpus of random words (bytes), whose windows all differ."""
  root = tmp_path_factory.mktemp('varied')
  manifest = prepare.prepare(byte_spec(write_corpus(root / 'in', files=1, docs=50)), root / 'out')
  return pipeline.Split(root / 'out', 'train', manifest, np.ones(259, np.int32))


@pytest.mark.parametrize('processes', [1, 2, 4])
def test_every_window_once_per_epoch_on_any_number_of_processes(varied, processes):
  """Over an epoch the processes read disjoint rows, together the single process's batches,
  and no window twice (windows are compared as multisets: a few coincide)."""
  windows = varied.num_windows(16)
  steps = windows // 8
  as_rows = lambda batch: [r.tobytes() for r in batch['tokens']]
  single = [as_rows(b) for b in take(pipeline.train_dataset(varied, 16, 8, seed=3), steps)]
  parts = [
    take(pipeline.train_dataset(varied, 16, 8, 3, p, processes), steps) for p in range(processes)
  ]
  epoch = []
  for step in range(steps):
    rows = [r for part in parts for r in as_rows(part[step])]
    assert sorted(rows) == sorted(single[step])
    epoch += rows
  every = collections.Counter(varied.window(i, 16)['tokens'].tobytes() for i in range(windows))
  read = collections.Counter(epoch)
  assert sum(read.values()) == steps * 8 and all(read[w] <= every[w] for w in read)


def test_pipeline_deterministic(shakespeare_data):
  split = shakespeare_data.train
  a = take(pipeline.train_dataset(split, 64, 8, seed=3), 4)
  b = take(pipeline.train_dataset(split, 64, 8, seed=3), 4)
  c = take(pipeline.train_dataset(split, 64, 8, seed=4), 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['tokens'], y['tokens'])
  assert not np.array_equal(a[0]['tokens'], c[0]['tokens'])


def test_iterator_state_resumes_on_another_number_of_processes(shakespeare_data):
  """The saved state is the job's position: restored into 1, 2 or 4 processes, they read the
  global batches an uninterrupted single process reads next."""
  ds = pipeline.train_dataset(shakespeare_data.train, 64, 8, seed=0)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)['tokens'] for _ in range(2)]
  for processes in (1, 2, 4):
    rows = [[], []]
    for p in range(processes):
      resumed = iter(pipeline.train_dataset(shakespeare_data.train, 64, 8, 0, p, processes))
      resumed.set_state(state)
      for step in range(2):
        rows[step] += [r.tobytes() for r in next(resumed)['tokens']]
    for step in range(2):
      assert sorted(rows[step]) == sorted(r.tobytes() for r in expected[step])


def test_workers_give_the_same_batches(varied):
  """Windows made and transformed (BERT masking) in grain worker processes equal the
  in-process ones."""
  import ml_collections

  from fm.objectives import masked_lm

  mask = masked_lm.host_transform(259, ml_collections.ConfigDict({'mask_rate': 0.15}))
  plain = take(pipeline.train_dataset(varied, 16, 8, seed=1, transform=mask), 3)
  workers = take(pipeline.train_dataset(varied, 16, 8, seed=1, transform=mask, workers=2), 3)
  assert any((b['tokens'] == 259).any() for b in plain)  # Masked.
  for x, y in zip(plain, workers):
    assert x.keys() == y.keys() and 'targets' in x
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_eval_batches_cover_validation_once(shakespeare_data):
  split = shakespeare_data.validation
  batches = list(pipeline.eval_batches(split, 256, 16, -1))
  weights = sum((b['segment_ids'] > 0).sum() for b in batches)
  n = split.num_windows(256)
  assert weights == n * 256
  # Every window once, in order, then padding.
  rows = np.concatenate([b['tokens'] for b in batches])
  np.testing.assert_array_equal(
    rows[:n], np.stack([split.window(i, 256)['tokens'] for i in range(n)])
  )
  assert not np.concatenate([b['segment_ids'] for b in batches])[n:].any()
  assert len(list(pipeline.eval_batches(split, 256, 16, 3))) == 3


def test_a_mixture_draws_its_corpora_by_weight(tmp_path):
  """data.mixture of two prepared corpora weighted 3:1: training windows come from them in that
  proportion (grain's deterministic mix: exact up to one window per cycle of 4; stated tolerance
  1%); held-out windows cover both; corpora with another tokenizer are refused."""
  import ml_collections

  for name, letter in (('a', 'x'), ('b', 'y')):
    (tmp_path / name).mkdir()
    lines = [json.dumps({'text': letter * 50 + str(i)}) for i in range(200)]
    (tmp_path / name / 'in.jsonl').write_text('\n'.join(lines))
    prepare.prepare(byte_spec(str(tmp_path / name / 'in.jsonl')), tmp_path / f'{name}-out')
  data_cfg = ml_collections.ConfigDict(
    dict(
      dataset='prepared',
      path='',
      tokenizer=dict(kind='bytes', vocab_size=4096, model=''),
      mixture=((str(tmp_path / 'a-out'), 3.0), (str(tmp_path / 'b-out'), 1.0)),
    )
  )
  data = pipeline.prepare(data_cfg)
  batches = take(pipeline.train_dataset(data.train, 16, 8, seed=0), 50)
  windows = np.concatenate([b['tokens'] for b in batches])  # Each has a corpus's letter alone.
  from_a, from_b = [(windows == ord(letter) + 3).any(1) for letter in 'xy']
  assert (from_a ^ from_b).all()
  share = from_a.mean()  # Of 400 windows.
  assert abs(share - 0.75) < 0.01, share
  assert data.validation.num_windows(16) == sum(s.num_windows(16) for s in data.validation.splits)
  other = dict(json.loads((tmp_path / 'b-out' / prepare.MANIFEST).read_text()))
  other['tokenizer'] = {'kind': 'sentencepiece', 'vocab_size': 259, 'sha256': 'x'}
  (tmp_path / 'b-out' / prepare.MANIFEST).write_text(json.dumps(other))
  (tmp_path / 'b-out' / 'tokenizer.model').write_bytes(b'x')
  with pytest.raises(ConfigError, match=r'config.data.mixture: .*b-out was prepared with tok'):
    pipeline.prepare(data_cfg)
  data_cfg.update(mixture=(), path=str(tmp_path / 'b-out'))
  with pytest.raises(
    ConfigError,
    match=r"config.data.path='.*b-out' was prepared with tokenizer .* the run asks for "
    r'config.data.tokenizer=.*; set config.data.tokenizer to match \(--config.data.tokenizer.kind='
    r'sentencepiece --config.data.tokenizer.vocab_size=259\) or prepare the corpus again',
  ):
    pipeline.prepare(data_cfg)


def test_a_missing_or_damaged_shard_is_named(varied):
  """A shard that is gone or of another size, or token counts or offsets cut short, are named
  when the directory opens, with the fix; bytes damaged in place are named when a window reads
  them."""
  directory = pathlib.Path(varied.paths[0]).parent
  manifest = prepare.read_manifest(directory)
  shard = pathlib.Path(varied.paths[0])
  original = shard.read_bytes()
  fix = 'run the python -m fm.data.prepare command that made .* again'
  try:
    shard.write_bytes(original[:-10])
    with pytest.raises(
      ConfigError, match=rf'{shard.name} is {len(original) - 10} bytes, not {len(original)}; {fix}'
    ):
      pipeline.open_prepared(directory)
    damaged = bytearray(original)
    for i in range(100, 300):  # Inside the first chunk of records.
      damaged[i] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    pipeline.open_prepared(directory)  # Of its size: read to find out.
    split = pipeline.Split(directory, 'train', manifest, np.ones(259, np.int32))
    with pytest.raises(
      ConfigError,
      match=rf'({shard.name}: document \d+ cannot be read|a shard '
      rf'of {directory} cannot be opened).* delete (it|that shard), then run the python -m',
    ):
      for n in range(manifest['splits']['train']['documents']):
        split.document(n)
    shard.unlink()
    with pytest.raises(ConfigError, match=rf'{shard.name} is missing; {fix}'):
      pipeline.open_prepared(directory)
  finally:
    shard.write_bytes(original)
  # The offsets are named when the directory opens; the token counts, which only prepare reads,
  # by the check prepare runs again (training leaves them out).
  check = lambda: prepare.damage(directory, manifest)[0]
  for path in shard.with_suffix('.lengths.npy'), directory / 'train.offsets.npy':
    opened = pipeline.open_prepared if path.name.endswith('offsets.npy') else None
    kept = path.read_bytes()
    try:
      array = np.load(io.BytesIO(kept))
      np.save(path, array[:-1])
      entries = len(array)
      assert check()[:2] == (path, f'{entries - 1} entries, not {entries}')
      if opened:
        with pytest.raises(
          ConfigError, match=rf'{path.name} is {entries - 1} entries, not {entries}; {fix}'
        ):
          opened(directory)
      path.write_bytes(kept[:-8])  # Cut short.
      assert check()[:2] == (path, 'damaged (cut short or not an array)')
      if opened:
        with pytest.raises(ConfigError, match=rf'{path.name} is damaged \(cut short or not an '):
          opened(directory)
    finally:
      path.write_bytes(kept)
  pipeline.open_prepared(directory)
  assert prepare.damage(directory, manifest) == []


def test_prepare_again_mends_a_missing_or_damaged_file(tmp_path, monkeypatch):
  """The fix the messages above give works: prepare run again on a directory whose shard is
  gone or cut short, whose token counts or offsets are cut short, or whose tokenizer file is
  gone, rewrites those items alone (the others' files untouched) and gives what it gave
  before; with its inputs moved away it says so and changes nothing. A directory prepared
  again for another spec is refused without --overwrite, and with it loses its manifest first,
  so a stop midway leaves nothing that looks complete. A URL output and a manifest without its fields are one sentence each."""
  spec = byte_spec(write_corpus(tmp_path / 'in', files=3, docs=40))
  out = tmp_path / 'out'
  prepare.prepare(spec, out)
  before = shards(out)
  kept = out / prepare.shard_name('train', 0)
  stamp = kept.stat().st_mtime_ns
  cut = lambda path, n: path.write_bytes(path.read_bytes()[:-n])
  cut(out / prepare.shard_name('train', 1), 7)
  (out / prepare.shard_name('validation', 2)).unlink()
  cut((out / prepare.shard_name('train', 2)).with_suffix('.lengths.npy'), 4)
  cut(out / 'train.offsets.npy', 8)
  (tmp_path / 'in').rename(tmp_path / 'moved')
  with pytest.raises(ConfigError, match='matches no file'):
    prepare.prepare(spec, out)
  assert (out / prepare.MANIFEST).exists()
  (tmp_path / 'moved').rename(tmp_path / 'in')
  lines = []
  prepare.prepare(spec, out, say=lines.append)
  assert shards(out) == before and kept.stat().st_mtime_ns == stamp
  assert any('2 item(s) with a missing or damaged file' in line for line in lines), lines
  trained = tmp_path / 'trained'  # A SentencePiece model's file gone: trained again, the same.
  sp_spec = prepare.Spec(train=spec.train, vocab_size=300, validation_fraction=0.2)
  prepare.prepare(sp_spec, trained)
  model = (trained / 'tokenizer.model').read_bytes()
  (trained / 'tokenizer.model').unlink()
  with pytest.raises(ConfigError, match=r'tokenizer.model is missing; run the python -m'):
    pipeline.open_prepared(trained)
  prepare.prepare(sp_spec, trained)
  assert (trained / 'tokenizer.model').read_bytes() == model
  (trained / 'tokenizer.model').write_bytes(model[:100])  # Damaged in place: the same.
  with pytest.raises(ConfigError, match=r'tokenizer.model is not the file its manifest records'):
    pipeline.open_prepared(trained)
  prepare.prepare(sp_spec, trained)
  assert (trained / 'tokenizer.model').read_bytes() == model
  other = prepare.Spec(train=spec.train, tokenizer='bytes', validation_fraction=0.3)

  def stopped(*args):
    raise KeyboardInterrupt

  with pytest.raises(
    ConfigError,
    match=r'--output .*/out holds a corpus prepared with other settings '
    r'\(--validation_fraction\); give another --output, or add --overwrite to replace it',
  ):
    prepare.prepare(other, out)
  assert shards(out) == before and (out / prepare.MANIFEST).exists()
  monkeypatch.setattr(prepare, 'run_pipeline', stopped)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(other, out, overwrite=True)
  assert not (out / prepare.MANIFEST).exists()
  with pytest.raises(ConfigError, match=r'--output gs://b/p is a URL; .* mounts'):
    prepare.prepare(spec, 'gs://b/p')
  monkeypatch.undo()
  manifest = prepare.prepare(spec, out)
  del manifest['splits']['train']['shards'][0]['bytes']
  (out / prepare.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(ConfigError, match=r'manifest.json is damaged'):
    prepare.read_manifest(out)


def test_prepare_again_after_the_inputs_changed_prepares_anew(tmp_path):
  """A file added to the globs or changed in size: prepare run again on the finished directory
  says so and gives what a fresh prepare of the new inputs gives (nothing of the old kept)."""
  spec = byte_spec(write_corpus(tmp_path / 'in', files=2, docs=30))
  out = tmp_path / 'out'
  prepare.prepare(spec, out)
  write_corpus(tmp_path / 'extra', files=3, docs=20, seed=1)
  (tmp_path / 'extra' / 'part-2.jsonl').rename(tmp_path / 'in' / 'part-2.jsonl')
  with (tmp_path / 'in' / 'part-0.jsonl').open('a') as f:
    f.write(json.dumps({'text': 'one more document'}) + '\n')
  lines = []
  prepare.prepare(spec, out, say=lines.append)
  assert any('1 file(s) added, 1 file(s) of another size): prepared anew' in x for x in lines)
  prepare.prepare(spec, tmp_path / 'fresh')
  assert shards(out) == shards(tmp_path / 'fresh')
  lines.clear()
  prepare.prepare(spec, out, say=lines.append)  # Unchanged now: returned as it is.
  assert not lines


def test_lines_too_long_for_the_tokenizer_trainer_are_one_sentence():
  with pytest.raises(
    ConfigError,
    match=r'50 of its 50 sampled lines are longer than the 4192 '
    r'bytes SentencePiece reads: split documents into lines',
  ):
    tokenizer.train('sentencepiece', 300, ['word ' * 2000] * 50)


def test_corpora_prepared_with_one_tokenizer_mix(tmp_path):
  """--tokenizer_model: a corpus prepared with another's SentencePiece model shares its
  tokenizer, so the two mix (and a run may name the model); another model file, or the same
  file changed, prepares the corpus anew with --overwrite (refused without it); a file that is
  not a model is one sentence."""
  import ml_collections

  spec = lambda name, **kw: prepare.Spec(
    train=(write_corpus(tmp_path / name, files=1, docs=400, seed=len(name)),), **kw
  )
  first = prepare.prepare(spec('a', vocab_size=300), tmp_path / 'a-out')
  model = tmp_path / 'a-out' / 'tokenizer.model'
  second = prepare.prepare(spec('bb', tokenizer_model=str(model)), tmp_path / 'b-out')
  assert second['tokenizer'] == first['tokenizer']
  data_cfg = ml_collections.ConfigDict(
    dict(
      dataset='prepared',
      path='',
      tokenizer=dict(kind='sentencepiece', vocab_size=4096, model=str(model)),
      mixture=((str(tmp_path / 'a-out'), 1.0), (str(tmp_path / 'b-out'), 1.0)),
    )
  )
  assert pipeline.prepare(data_cfg).tokenizer.identity == first['tokenizer']
  copy = tmp_path / 'other.model'
  prepare.prepare(spec('ccc', vocab_size=280), tmp_path / 'c-out')
  copy.write_bytes((tmp_path / 'c-out' / 'tokenizer.model').read_bytes())
  with pytest.raises(ConfigError, match=r'other settings \(--tokenizer_model\); .* --overwrite'):
    prepare.prepare(spec('bb', tokenizer_model=str(copy)), tmp_path / 'b-out')
  assert prepare.read_manifest(tmp_path / 'b-out')['tokenizer'] == second['tokenizer']  # Kept.
  changed = prepare.prepare(
    spec('bb', tokenizer_model=str(copy)), tmp_path / 'b-out', overwrite=True
  )
  assert changed['tokenizer']['vocab_size'] == 280
  copy.write_bytes((tmp_path / 'a-out' / 'tokenizer.model').read_bytes())
  with pytest.raises(ConfigError, match=r"\(the --tokenizer_model file's content\); give another"):
    prepare.prepare(spec('bb', tokenizer_model=str(copy)), tmp_path / 'b-out')
  again = prepare.prepare(spec('bb', tokenizer_model=str(copy)), tmp_path / 'b-out', overwrite=True)
  assert again['tokenizer'] == first['tokenizer']
  with pytest.raises(ConfigError, match=r"config.data.tokenizer.model='.*' is not a SentencePiece"):
    prepare.prepare(
      spec('bb', tokenizer_model=str(tmp_path / 'a' / 'part-0.jsonl')), tmp_path / 'd'
    )
  assert not (tmp_path / 'd').exists()


def test_a_bad_line_found_by_a_worker_process_is_one_sentence(tmp_path):
  """On 2 worker processes a bad line is the command's last line of output (exit 2), and
  nothing of the item is left."""
  lines = [json.dumps({'text': f'line {i}'}) for i in range(3000)] + ['{"text": broken']
  (tmp_path / 'x.jsonl').write_text('\n'.join(lines) + '\n')
  done = subprocess.run(
    [
      sys.executable,
      '-m',
      'fm.data.prepare',
      '--train',
      str(tmp_path / 'x.jsonl'),
      '--output',
      str(tmp_path / 'out'),
      '--tokenizer',
      'bytes',
      '--workers',
      '2',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1] == (
    f'error: {tmp_path / "x.jsonl"}:3001: not JSON (Expecting value, column 10); fix the line.'
  )
  out = tmp_path / 'out'  # Gone when left empty, else the input records alone.
  assert not (out.exists() and [p for p in out.iterdir() if not p.name.startswith('input-')])


def test_the_prepare_command_names_its_own_flags(tmp_path):
  """A message of the data layer names the command's flag (--vocab_size), not the run's config
  key, with a fix that works; the refused output directory is not left behind."""
  (tmp_path / 'x.jsonl').write_text(
    ''.join(json.dumps({'text': f'line {i}: {chr(0x3B1 + i % 20)}'}) + '\n' for i in range(500))
  )
  command = [sys.executable, '-m', 'fm.data.prepare', '--train', str(tmp_path / 'x.jsonl')]
  command += ['--output', str(tmp_path / 'out')]
  done = subprocess.run(
    [*command, '--vocab_size', '50'], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  last = done.stderr.strip().splitlines()[-1]
  assert done.returncode == 2 and not (tmp_path / 'out').exists(), done.stderr
  least = re.fullmatch(r'error: --vocab_size=50 is less than .*; set it to at least (\d+)\.', last)
  assert least, last
  done = subprocess.run(
    [*command, '--vocab_size', least.group(1)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0 and (tmp_path / 'out' / prepare.MANIFEST).exists(), done.stderr


@pytest.mark.slow
def test_data_benchmark_smoke(tmp_path):
  """experiments/data_bench.py --smoke measures every column for corpora of 1 and 2 copies."""
  done = subprocess.run(
    [sys.executable, 'experiments/data_bench.py', '--workdir', str(tmp_path), '--smoke'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((tmp_path / 'data_bench.json').read_text())
  for size in ('1', '2'):
    row = results[size]
    assert {'prepare_1', 'prepare_2', 'given_1', 'given_2', 'train'} <= set(row)
    assert row['prepare_1']['tokenizer_trained_at'] > 0 and row['pipeline_windows_per_sec'] > 0
    assert all(len(row[key]['runs']) == 1 for key in ('prepare_1', 'prepare_2', 'given_1'))
  rows = [
    line for line in done.stdout.splitlines() if line.startswith('| 1x') or line.startswith('| 2x')
  ]
  assert len(rows) == 2 and all(line.count(' s, ') == 4 for line in rows)


def test_files_too_small_for_a_batch_or_a_held_out_window_are_one_sentence(tmp_path, monkeypatch):
  """Own files from config.data.train and config.data.validation: too few training windows for
  a batch, or a held-out split shorter than one window, each stop in one sentence naming the
  keys to change; with enough text the same globs train."""
  from workdirs import smoke_config

  from fm import registry, train

  monkeypatch.setenv('FM_DATA_DIR', str(tmp_path / 'cache'))
  (tmp_path / 'train.jsonl').write_text(json.dumps({'text': 'x' * 300}) + '\n')
  (tmp_path / 'held.jsonl').write_text(json.dumps({'text': 'short'}) + '\n')
  data = dict(
    dataset='files',
    train=str(tmp_path / 'train.jsonl'),
    validation=str(tmp_path / 'held.jsonl'),
    seq_len=32,
    tokenizer=dict(kind='bytes', vocab_size=0, model=''),
  )
  config = smoke_config(data=data, train=dict(global_batch=16))
  objective = registry.get('objectives', config.objective)
  with pytest.raises(
    ConfigError,
    match=r'has only 9 training windows of config.data.seq_len=32, fewer than config.train.'
    r'global_batch=16; lower global_batch to at most 9, lower seq_len, or add text',
  ):
    train._text_data(config, objective, 0, 1)
  config = smoke_config(data=data, train=dict(global_batch=8))
  with pytest.raises(
    ConfigError,
    match=r'held-out split .* has 6 tokens, less than one window of config.data.seq_len=32; '
    r'raise config.data.validation_fraction, give config.data.validation files',
  ):
    train._text_data(config, objective, 0, 1)
  (tmp_path / 'held.jsonl').write_text(json.dumps({'text': 'y' * 100}) + '\n')
  *_, batches, held_out, corpus = train._text_data(config, objective, 0, 1)
  assert next(iter(batches))['tokens'].shape == (8, 32) and len(list(held_out(-1))) == 1
  assert len(corpus) == 64  # Its shards' digest, recorded with each checkpoint.
