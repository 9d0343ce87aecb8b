"""Label efficiency on Rotten Tomatoes: the foundation-model claim, measured.

  python experiments/label_efficiency.py --workdir /tmp/label_efficiency
  python experiments/label_efficiency.py --workdir /tmp/le_smoke --smoke

Test accuracy and macro-F1 with 1%, 10% and 100% of the training labels, 3 seeds each, for
  - the transfer_sentiment backbone pretrained on news, fine-tuned (finetune.init=pretrained),
  - the same architecture and tokenizer from random init (finetune.init=random),
  - a bag-of-words logistic regression (scikit-learn, TF-IDF of word 1-2-grams),
each seed drawing its own label subset (the same subset for all three). Fine-tuning runs use
experiments/transfer_sentiment.py with fewer steps for fewer labels; the backbone is pretrained
once into WORKDIR/pretrained (or --pretrained DIR, a finished lm_news run). Writes
WORKDIR/label_efficiency.{md,json,png}, the table and JSON after every run; rerunning the
command skips finished runs (their final checkpoints are only re-evaluated).
"""

import argparse
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FRACTIONS = (0.01, 0.1, 1.0)
SEEDS = (0, 1, 2)
STEPS = {0.01: 60, 0.1: 200, 1.0: 900}  # Fine-tuning steps per label budget (batch 32).
MODELS = ('pretrained', 'random', 'bag_of_words')


def bag_of_words(train_examples, test_examples, seed: int) -> dict[str, float]:
  from sklearn.feature_extraction.text import TfidfVectorizer
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import accuracy_score, f1_score

  vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
  x = vectorizer.fit_transform([t for t, _ in train_examples])
  model = LogisticRegression(C=4.0, max_iter=2000, random_state=seed)
  model.fit(x, [label for _, label in train_examples])
  predicted = model.predict(vectorizer.transform([t for t, _ in test_examples]))
  truth = [label for _, label in test_examples]
  return {
    'accuracy': accuracy_score(truth, predicted),
    'macro_f1': f1_score(truth, predicted, average='macro'),
  }


def run(workdir: pathlib.Path, smoke: bool, pretrained: str = '') -> list[dict]:
  """Every run of the study, in order; the table and JSON are rewritten after each."""
  import ml_collections

  from fm import configs, finetune, runs
  from fm.tasks import sentiment

  fractions, seeds = ((0.1, 1.0), (0,)) if smoke else (FRACTIONS, SEEDS)
  base = configs.resolve(
    configs.load(
      'experiments/transfer_sentiment.py' + (':smoke' if smoke else ''), 'label_efficiency'
    )
  )
  # The backbone, pretrained once (or resumed) unless --pretrained names a finished run; every
  # fine-tuning run then reads it as it is.
  base.pretrained.workdir = pretrained
  backbone = runs.dependency(base.pretrained, 'config.pretrained', workdir / 'pretrained')
  ckpt = runs.obtain(backbone)
  if ckpt is None:
    return []
  base.pretrained.workdir = str(ckpt)
  splits = sentiment.load(seed=base.task_args.split_seed)
  results = []
  for fraction in fractions:
    for seed in seeds:
      for init in ('pretrained', 'random'):
        config = ml_collections.ConfigDict(base.to_dict())
        config.seed, config.task_args.train_fraction, config.finetune.init = seed, fraction, init
        steps = 8 if smoke else STEPS[fraction]
        config.train.update(steps=steps, eval_every=steps, log_every=max(steps // 3, 1))
        config.optim.warmup_steps = max(steps // 10, 1)
        metrics = runs.run(config, workdir / f'{init}-{fraction}-{seed}')
        results.append(
          {
            'model': init,
            'fraction': fraction,
            'seed': seed,
            'accuracy': metrics['test/accuracy'],
            'macro_f1': metrics['test/macro_f1'],
          }
        )
        write(workdir, results)
      subset = finetune.subset(splits['train'], fraction, seed)
      results.append(
        {
          'model': 'bag_of_words',
          'fraction': fraction,
          'seed': seed,
          **bag_of_words(subset, splits['test'], seed),
        }
      )
      write(workdir, results)
  return results


def write(workdir: pathlib.Path, results: list[dict]) -> str:
  (workdir / 'label_efficiency.json').write_text(json.dumps(results, indent=1))
  markdown = 'Rotten Tomatoes test accuracy (%), mean ± std over seeds\n\n' + table(results)
  (workdir / 'label_efficiency.md').write_text(markdown + '\n')
  return markdown


def table(results: list[dict]) -> str:
  fractions = sorted({r['fraction'] for r in results})
  lines = [
    '| model | ' + ' | '.join(f'{f:.0%} labels' for f in fractions) + ' |',
    '|---|' + '---|' * len(fractions),
  ]
  for model in MODELS:
    cells = []
    for f in fractions:
      acc = [100 * r['accuracy'] for r in results if r['model'] == model and r['fraction'] == f]
      std = statistics.stdev(acc) if len(acc) > 1 else 0.0
      cells.append(f'{statistics.mean(acc):.1f} ± {std:.1f} (n={len(acc)})' if acc else '')
    lines.append(f'| {model} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(results: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for model in MODELS:
    fractions = sorted({r['fraction'] for r in results if r['model'] == model})
    acc = [
      [100 * r['accuracy'] for r in results if r['model'] == model and r['fraction'] == f]
      for f in fractions
    ]
    ax.errorbar(
      [100 * f for f in fractions],
      [statistics.mean(a) for a in acc],
      yerr=[statistics.stdev(a) if len(a) > 1 else 0 for a in acc],
      marker='o',
      capsize=3,
      label=model.replace('_', ' '),
    )
  ax.set_xscale('log')
  ax.set_xlabel('training labels used (%)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title('Rotten Tomatoes sentiment')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--smoke', action='store_true', help='2 label budgets, 1 seed, 8 steps')
  parser.add_argument('--pretrained', default='', help='a finished pretraining run to reuse')
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  from fm import ConfigError

  try:
    results = run(workdir, args.smoke, args.pretrained)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if not results:  # Preempted while pretraining the backbone.
    print('stopped while pretraining the backbone; rerun the same command to resume.')
    return 0
  markdown = write(workdir, results)
  plot(results, workdir / 'label_efficiency.png')
  print(markdown)
  return 0


if __name__ == '__main__':
  sys.exit(main())
