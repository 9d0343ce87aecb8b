"""Label efficiency: the foundation-model claim, measured.

  python experiments/label_efficiency.py --workdir /tmp/label_efficiency
  python experiments/label_efficiency.py --workdir /tmp/le_smoke --smoke
  python experiments/label_efficiency.py --study fashion_mnist --workdir /tmp/le_fmnist
  python experiments/label_efficiency.py --workdir /tmp/label_efficiency --trend
  python experiments/label_efficiency.py --workdir /tmp/label_efficiency --probe
  python experiments/label_efficiency.py --workdir /tmp/label_efficiency --adapt_steps 1000

Test accuracy and macro-F1 with 1%, 10% and 100% of the training labels, 3 seeds each, for a
pretrained backbone fine-tuned (finetune.init=pretrained) and the same architecture from random
init (finetune.init=random), each seed drawing its own label subset (the same for all models),
the params a run starts from (the new head's; all of them for random init) and the training
examples' order:
  sentiment      Rotten Tomatoes; experiments/transfer_sentiment.py's backbone pretrained on
                 news, and after task-adaptive pretraining; at 1% and 10% of the labels each
                 run's learning rates (x 1, 1/3, 3, 10) chosen on validation accuracy; also a
                 bag-of-words logistic regression (scikit-learn, TF-IDF of word 1-2-grams, its
                 regularisation chosen on validation accuracy)
  fashion_mnist  Fashion-MNIST; experiments/mae_fashion_mnist.py:finetune, a ViT pretrained as
                 a masked autoencoder, fully fine-tuned
Fine-tuning runs use the study's experiment with fewer steps for fewer labels; the backbone is
pretrained once into WORKDIR/pretrained (or --pretrained DIR, a finished pretraining run). Writes
WORKDIR/label_efficiency.{md,json,png}, the table (with each run's minutes of training steps)
and JSON after every run; rerunning the command takes finished runs (final checkpoint present) as
their logs have them. --trend fine-tunes at 1% and 10% of the labels from the pretraining run's
earlier checkpoints (the sentiment study's own pretraining keeps steps 90, 180, 270 and 360) and
writes WORKDIR/trend.{md,json,png}: accuracy against pretraining tokens, beside random init and
the final backbone from the study's own runs, with the log-linear trend of the gain. --probe
(sentiment) scores each backbone's frozen features, the mean of its final states, with a
logistic regression at every label budget and seed (its C chosen on validation accuracy) and
writes WORKDIR/probe.{md,json}. --adapt_steps N runs the study with N steps of task-adaptive
pretraining instead of its own (sentiment: 500) into WORKDIR/adaptedN, its fine-tuning runs
adaptedN-FRACTION-SEED and WORKDIR/label_efficiency_adaptedN.{md,json,png}, taking the finished
pretrained and random-init runs as they are.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import re
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FRACTIONS = (0.01, 0.1, 1.0)
SEEDS = (0, 1, 2)
BAG_OF_WORDS_C = (4.0, 1.0, 16.0, 0.25)  # Chosen on the validation split; 4 first on ties.


@dataclasses.dataclass(frozen=True)
class Study:
  experiment: str  # The fine-tuning experiment (its smoke variant: + ':smoke' or 'smoke').
  smoke: str
  steps: dict  # Fine-tuning steps per label budget.
  batch: int  # Fine-tuning batch.
  title: str
  baseline: str = ''  # A model without pretraining fitted besides ('bag_of_words').
  # Task-adaptive pretraining ('adapted'): steps and peak rate of the backbone's objective
  # continued on the task's unlabelled text (its module's `unlabelled`); 0 steps: none.
  adapt_steps: int = 0
  adapt_lr: float = 1e-3
  # The recipe's name: '' for the study's own; 'adapted1000' (--adapt_steps 1000) for
  # task-adaptive pretraining of another length, whose backbone, fine-tuning runs and results
  # are named by it beside the study's (the pretrained and random-init runs are shared).
  variant: str = ''
  pool: str = ''  # finetune.pool of every fine-tuning run ('': the experiment's).
  # --trend: the label budgets fine-tuned from the pretraining run's earlier checkpoints.
  trend_fractions: tuple = (0.01, 0.1)
  # Overrides ('key=value ...') on the backbone's pretraining when the study trains it: which
  # checkpoints it saves and keeps, the points of --trend (with room for a preemption's).
  pretrain_overrides: str = ''
  # Learning rates tried (x the experiment's, the head's and the backbone's alike) at the label
  # budgets `lr_fractions`, each run's chosen by validation accuracy; the others take (1.0,).
  lr_grid: tuple = (1.0,)
  lr_fractions: tuple = ()

  def lr_scales(self, fraction: float, smoke: bool) -> tuple[float, ...]:
    """The rates tried at `fraction` of the labels; the smoke run tries the grid at 10%."""
    grid = (1.0, 3.0) if smoke and len(self.lr_grid) > 1 else self.lr_grid
    return grid if fraction in ((0.1,) if smoke else self.lr_fractions) else (1.0,)

  @property
  def models(self) -> tuple[str, ...]:
    adapted = ('adapted',) if self.adapt_steps else ()
    return ('pretrained', *adapted, 'random') + ((self.baseline,) if self.baseline else ())

  @property
  def results(self) -> str:
    """The stem of the results' files in the workdir (.json, .md, .png)."""
    return 'label_efficiency' + (f'_{self.variant}' if self.variant else '')

  def run_name(self, model: str) -> str:
    """The directory prefix of `model`'s runs: the variant's name for its adapted backbone."""
    return self.variant if model == 'adapted' and self.variant else model

  def with_adapt_steps(self, steps: int) -> 'Study':
    """The study with `steps` of task-adaptive pretraining (a variant unless its own)."""
    if steps == self.adapt_steps:
      return self
    return dataclasses.replace(self, adapt_steps=steps, variant=f'adapted{steps}')

  @property
  def trained(self) -> tuple[str, ...]:
    """The models that are fine-tuned (all but the baseline)."""
    return tuple(m for m in self.models if m != self.baseline)


STUDIES = {
  'sentiment': Study(
    'experiments/transfer_sentiment.py',
    'experiments/transfer_sentiment.py:smoke',
    {0.01: 60, 0.1: 200, 1.0: 900},
    32,
    'Rotten Tomatoes sentiment',
    'bag_of_words',
    adapt_steps=500,
    pool='mean',
    pretrain_overrides='checkpoint.every_steps=90 checkpoint.keep=8',
    lr_grid=(1.0, 1 / 3, 3.0, 10.0),
    lr_fractions=(0.01, 0.1),
  ),
  'fashion_mnist': Study(
    'experiments/mae_fashion_mnist.py:finetune',
    'experiments/mae_fashion_mnist.py:smoke',
    {0.01: 100, 0.1: 300, 1.0: 800},
    64,
    'Fashion-MNIST',
  ),
}


def regression(train, validation, test, seed: int, scaled: bool = False) -> dict[str, float]:
  """Logistic regression on (features, labels) splits, its regularisation C chosen on validation
  accuracy from BAG_OF_WORDS_C (the first best on ties); with `scaled`, standardised features."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import accuracy_score, f1_score
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  fits = {}  # C -> (validation accuracy, model).
  for c in BAG_OF_WORDS_C:
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    model = (make_pipeline(StandardScaler(), model) if scaled else model).fit(*train)
    fits[c] = (accuracy_score(validation[1], model.predict(validation[0])), model)
  c = max(fits, key=lambda c: fits[c][0])
  predicted = fits[c][1].predict(test[0])
  return {
    'accuracy': accuracy_score(test[1], predicted),
    'macro_f1': f1_score(test[1], predicted, average='macro'),
    'validation_accuracy': fits[c][0],
    'C': c,
  }


def bag_of_words(train_examples, validation, test_examples, seed: int) -> dict[str, float]:
  from sklearn.feature_extraction.text import TfidfVectorizer

  vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
  vectorizer.fit([t for t, _ in train_examples])
  split = lambda examples: (
    vectorizer.transform([t for t, _ in examples]),
    [label for _, label in examples],
  )
  return regression(split(train_examples), split(validation), split(test_examples), seed)


def run(
  workdir: pathlib.Path,
  study: Study,
  smoke: bool,
  pretrained: str = '',
  budgets: tuple[float, ...] = (),
) -> list[dict]:
  """Every run of the study, in order (`budgets`: only those label fractions, in that order;
  the others' recorded rows are kept); the table and JSON are rewritten after each. [] when a
  run was preempted (saved: a rerun resumes it)."""
  from fm import finetune, metrics, tasks

  fractions, seeds = ((0.1, 1.0), (0,)) if smoke else (FRACTIONS, SEEDS)
  fractions = budgets or fractions  # Those alone, in their order.
  obtained = obtain_backbones(workdir, study, smoke, pretrained)
  if obtained is None:
    return []
  base, task, backbones = obtained
  splits = tasks.kind_of(task).load(task, base) if study.baseline else None
  # The backbones' minutes of training steps (each run holds its checkpoints in
  # RUN/checkpoints/STEP), summed over the commands that trained them.
  names = {'pretrained': 'pretraining', 'adapted': 'task-adaptive pretraining'}
  spent = {
    names[m]: metrics.training_seconds(backbones[m].parents[1]) / 60
    for m in names
    if m in backbones
  }
  previous = recorded_rows(workdir / f'{study.results}.json')
  results = []
  for fraction in fractions:
    for seed in seeds:
      for model in study.trained:
        init = 'random' if model == 'random' else 'pretrained'
        candidates = []
        for scale in study.lr_scales(fraction, smoke):
          config = finetune_config(
            base, study, smoke, init, backbones[model], fraction, seed, lr_scale=scale
          )
          name = f'{study.run_name(model)}-{fraction}-{seed}'
          name += '' if scale == 1.0 else f'-lr{scale:.3g}'
          row = finetune_row(
            config, workdir / name, model=model, fraction=fraction, seed=seed, lr_scale=scale
          )
          if row is None:  # Preempted: saved; the rerun resumes it.
            return []
          candidates.append(row)
        results.append(chosen(candidates))
        write(workdir, study, with_recorded(results, previous), spent)
      if study.baseline == 'bag_of_words':
        subset = finetune.subset(splits['train'], fraction, seed)
        results.append(
          {
            'model': 'bag_of_words',
            'fraction': fraction,
            'seed': seed,
            **bag_of_words(subset, splits['validation'], splits['test'], seed),
          }
        )
        write(workdir, study, with_recorded(results, previous), spent)
  if budgets:  # Part of the study: the other budgets' rows stay.
    results = with_recorded(results, previous)
  write(workdir, study, results, spent)  # Done: rows no longer in the study go.
  return results


def chosen(candidates: list[dict]) -> dict:
  """The run of the best validation accuracy (the first of equals: the grid's default rate),
  with every candidate's row when there were several."""
  best = max(candidates, key=lambda r: r['validation_accuracy'])
  return {**best, 'candidates': candidates} if len(candidates) > 1 else best


def obtain_backbones(workdir: pathlib.Path, study: Study, smoke: bool, pretrained: str):
  """(the study's fine-tuning config, its task, model -> the checkpoint it starts from: the
  pretrained backbone, for random init its architecture and tokenizer, and the task-adaptive
  one), each trained or resumed first; None when that training stopped (a rerun resumes)."""
  from fm import registry

  base, ckpt = pretrain(workdir, study, smoke, pretrained)
  if ckpt is None:
    return None
  base.pretrained.workdir = str(ckpt)
  task = registry.get('tasks', base.task)
  backbones = {'pretrained': ckpt, 'random': ckpt}
  if study.adapt_steps:
    steps = 8 if smoke else study.adapt_steps
    backbones['adapted'] = adapt(workdir, task, base.task_args.split_seed, ckpt, steps, study)
    if backbones['adapted'] is None:
      return None
  return base, task, backbones


def pretrain(workdir: pathlib.Path, study: Study, smoke: bool, pretrained: str):
  """The study's fine-tuning config and its backbone's final checkpoint: pretrained once (or
  resumed) into WORKDIR/pretrained unless `pretrained` names a finished run; every fine-tuning
  run then reads it as it is. The checkpoint is None when that pretraining was preempted."""
  from fm import configs, runs

  base = configs.resolve(
    configs.load(study.smoke if smoke else study.experiment, 'label_efficiency')
  )
  base.pretrained.workdir = pretrained
  if not (smoke or pretrained):
    base.pretrained.overrides = f'{base.pretrained.overrides} {study.pretrain_overrides}'.strip()
  backbone = runs.dependency(base.pretrained, 'config.pretrained', workdir / 'pretrained')
  return base, runs.obtain(backbone)


def recorded_rows(path: pathlib.Path) -> list[dict]:
  """The rows a JSON of the study recorded; [] before the first."""
  return json.loads(path.read_text()) if path.exists() else []


def with_recorded(results: list[dict], previous: list[dict]) -> list[dict]:
  """`results` and after them the `previous` rows of runs not among them: what the JSON holds
  while a rerun goes through them again (its table complete while an earlier run trains)."""
  key = lambda r: (r['model'], r['fraction'], r['seed'])
  done = {key(r) for r in results}
  return results + [r for r in previous if key(r) not in done]


def finetune_row(config, run_dir: pathlib.Path, **fields) -> dict | None:
  """Runs (or resumes) one fine-tuning run: `fields` with its test scores and minutes of
  training steps, or None when it was preempted (saved: a rerun resumes it). A run whose final
  checkpoint exists is taken as its log has it, not evaluated again."""
  from fm import checkpoint, metrics, runs

  same_run(run_dir, config, ('pretrained.workdir', 'seed', 'task_args.train_fraction', 'optim.lr'))
  scores = None
  if checkpoint.latest_step(run_dir) >= config.train.steps:
    scores = logged_scores(run_dir)
  if not scores:
    scores = runs.run(config, run_dir)
    if not scores:
      return None
  return {
    **fields,
    'accuracy': scores['test/accuracy'],
    'macro_f1': scores['test/macro_f1'],
    # Of the params early stopping selected, as the test scores.
    'validation_accuracy': scores['accuracy'],
    'minutes': metrics.training_seconds(run_dir) / 60,
  }


def same_run(run_dir: pathlib.Path, config, keys: tuple[str, ...]) -> None:
  """Refuses a run directory whose config.json differs from `config` at `keys` (another
  backbone, seed, label budget or rate: a workdir of another recipe), so it is neither resumed
  nor taken as this study's."""
  from fm import ConfigError, runs

  differing = runs.config_differences(run_dir, config, keys)
  if differing:
    (key, held, wanted), *_ = differing
    raise ConfigError(
      f'{run_dir} was trained with {key}={held!r}, this study asks for {wanted!r} (another '
      f'recipe or --pretrained); give another --workdir, or move {run_dir} away to train it again.'
    )


def logged_scores(run_dir: pathlib.Path) -> dict | None:
  """A finished run's test accuracy and macro-F1 and the validation accuracy of the params
  early stopping selected (its evaluation at the selected step), as its log has them; None
  when the log lacks one."""
  from fm import metrics

  def last(key: str, step: float | None = None) -> float | None:
    values = [v for s, v in metrics.series(run_dir, key) if step is None or s == step]
    return values[-1] if values else None

  selected = last('eval/selected_step')
  scores = {
    'test/accuracy': last('test/accuracy'),
    'test/macro_f1': last('test/macro_f1'),
    'accuracy': None if selected is None else last('eval/accuracy', selected),
  }
  return scores if None not in scores.values() else None


def finetune_config(
  base, study: Study, smoke: bool, init: str, backbone, fraction, seed, lr_scale: float = 1.0
):
  """A fine-tuning run of the study: `fraction` of the labels drawn by `seed`, from `backbone`
  (or its architecture from random init), at `lr_scale` x the experiment's learning rates,
  stopping early on validation accuracy."""
  import ml_collections

  config = ml_collections.ConfigDict(base.to_dict())
  # The seed draws the label subset, the new head's (or random init's) params and the order of
  # the training examples.
  config.seed, config.data.seed, config.task_args.train_fraction = seed, seed, fraction
  config.finetune.init = init
  config.pretrained.workdir = str(backbone)
  config.finetune.pool = study.pool or config.finetune.pool
  steps = 8 if smoke else study.steps[fraction]
  # Early stopping: the params of the best of 10 evaluations on the validation split.
  every = max(steps // 10, 1)
  config.train.update(steps=steps, eval_every=every, select='accuracy')
  config.train.log_every = max(steps // 3, 1)
  if not smoke:
    config.train.global_batch = study.batch
  config.optim.warmup_steps = max(steps // 10, 1)
  config.optim.lr *= lr_scale
  if 'head_lr' in config.finetune:
    config.finetune.head_lr *= lr_scale
  return config


def features(ckpt, examples_by_split: dict, seq_len: int, seeds=(None,)) -> dict:
  """seed -> split -> (features, labels): the mean of each example's final states (the pooling
  of the study's fine-tuning) under the backbone `ckpt`'s params (seed None), or under its
  architecture with params drawn by each seed (random init). The checkpoint is restored and the
  examples encoded once."""
  import jax
  import numpy as np

  from fm import checkpoint, configs, sharding
  from fm.data import pipeline
  from fm.models import layers
  from fm.tasks import _classification

  model, restored, meta = checkpoint.restore_local(ckpt)
  tokenizer = pipeline.load_tokenizer(configs.resolve(meta['config']).data)
  keys = ('tokens', 'segment_ids', 'positions')
  rows = {s: _classification.encode(e, tokenizer, seq_len) for s, e in examples_by_split.items()}

  @jax.jit
  def pooled(variables, tokens, segment_ids, positions):
    x_BLD = model.apply(variables, tokens, segment_ids, positions, hidden=True)[0]
    return layers.pool(x_BLD, segment_ids, 'mean')

  out = {}
  with sharding.use(sharding.local_mesh(), sharding.DEFAULT_RULES):
    init = jax.jit(model.init)
    for seed in seeds:
      variables = restored
      if seed is not None:
        variables = init(jax.random.key(seed), np.zeros((1, seq_len), np.int32))
      out[seed] = {}
      for split, r in rows.items():
        batches = [[r[k][i : i + 256] for k in keys] for i in range(0, len(r['label']), 256)]
        out[seed][split] = (np.concatenate([pooled(variables, *b) for b in batches]), r['label'])
  return out


def probe(workdir: pathlib.Path, study: Study, smoke: bool, pretrained: str = ''):
  """Frozen features: each backbone's mean-pooled final states (random init: its architecture,
  params drawn by the seed) scored by a logistic regression (`regression`, standardised) at
  each label budget and seed, the label subsets the study's. Rows, or None when a backbone's
  training stopped."""
  from fm import finetune, tasks

  obtained = obtain_backbones(workdir, study, smoke, pretrained)
  if obtained is None:
    return None
  base, task, backbones = obtained
  splits = tasks.kind_of(task).load(task, base)
  fractions, seeds = ((0.1, 1.0), (0,)) if smoke else (FRACTIONS, SEEDS)
  results = []
  for model in study.trained:
    # A trained backbone's features are the same for every seed: drawn once.
    drawn = seeds if model == 'random' else (None,)
    made = features(backbones[model], splits, base.data.seq_len, drawn)
    for seed in seeds:
      split = made[seed if model == 'random' else None]
      for fraction in fractions:
        keep = finetune.subset(list(range(len(splits['train']))), fraction, seed)
        train = (split['train'][0][keep], split['train'][1][keep])
        row = regression(train, split['validation'], split['test'], seed, scaled=True)
        results.append({'model': model, 'fraction': fraction, 'seed': seed, **row})
  return results


def report_probe(workdir: pathlib.Path, study: Study, smoke: bool, pretrained: str) -> int:
  from fm import metrics

  results = probe(workdir, study, smoke, pretrained)
  if results is None:
    print('stopped (preempted); rerun the same command to resume.')
    return 0
  metrics.write_json(workdir / 'probe.json', results)
  markdown = f'{study.title}: frozen features, test accuracy (%), mean ± std over seeds\n\n'
  markdown += table(study, results, models=tuple(dict.fromkeys(r['model'] for r in results)))
  (workdir / 'probe.md').write_text(markdown + '\n')
  print(markdown)
  return 0


def trend(workdir: pathlib.Path, study: Study, smoke: bool, pretrained: str = ''):
  """Accuracy at each of `study.trend_fractions` of the labels against pretraining tokens:
  fine-tuned from each earlier checkpoint of the pretraining run (its own schedule's state at
  that step), 3 seeds each, into WORKDIR/pretrained@STEP-FRACTION-SEED. Returns those runs and
  the final checkpoint's pretraining tokens, or None when preempted."""
  from fm import ConfigError, checkpoint, configs, metrics

  fractions = study.trend_fractions[-1:] if smoke else study.trend_fractions
  seeds = (0,) if smoke else SEEDS
  base, final = pretrain(workdir, study, smoke, pretrained)
  if final is None:
    return None
  held = configs.resolve(checkpoint.read_meta(final)['config'])
  per_step = held.train.global_batch * held.data.seq_len
  # The checkpoints its schedule saved (not those a preemption saved between them).
  every = held.checkpoint.every_steps
  # The final one is the study's own `pretrained` rows.
  steps = sorted(int(p.name) for p in final.parent.iterdir() if p.name.isdigit())
  steps = [step for step in steps if every and step % every == 0 and step != int(final.name)]
  if not steps:
    raise ConfigError(
      f'--trend: {final.parents[1]} kept no checkpoint before its final one (every_steps='
      f'{every}, keep={held.checkpoint.keep}); pretrain with checkpoint.every_steps and '
      f'checkpoint.keep that keep earlier ones (as this study does: {study.pretrain_overrides}).'
    )
  previous = recorded_rows(workdir / 'trend.json')
  results = []
  for fraction in fractions:
    for step in steps:
      for seed in seeds:
        ckpt = final.parent / str(step)
        config = finetune_config(base, study, smoke, 'pretrained', ckpt, fraction, seed)
        row = finetune_row(
          config,
          workdir / f'pretrained@{step}-{fraction}-{seed}',
          model=f'pretrained@{step}',
          pretraining_steps=step,
          pretraining_tokens=step * per_step,
          fraction=fraction,
          seed=seed,
          lr_scale=1.0,  # The experiment's rates: the trend varies the backbone alone.
        )
        if row is None:
          return None
        results.append(row)
        metrics.write_json(workdir / 'trend.json', with_recorded(results, previous))
  return results, int(final.name) * per_step


def trend_points(
  fraction: float, runs_: list[dict], final_tokens: int, main: list[dict]
) -> dict[int, tuple[str, list[float]]]:
  """Pretraining tokens -> (backbone, test accuracies in %) at `fraction` of the labels: the
  trend's runs, random init at 0 tokens and the final backbone from the study's own rows in
  `main` (where finished), at the experiment's learning rates as the trend's runs."""
  points = {}
  for r in main:
    r = next((c for c in r.get('candidates', []) if c['lr_scale'] == 1.0), r)
    if r['fraction'] == fraction and r['model'] in ('random', 'pretrained'):
      tokens = 0 if r['model'] == 'random' else final_tokens
      points.setdefault(tokens, (r['model'], []))[1].append(100 * r['accuracy'])
  for r in runs_:
    if r['fraction'] == fraction:
      points.setdefault(r['pretraining_tokens'], (r['model'], []))[1].append(100 * r['accuracy'])
  return points


def trend_table(
  study: Study, fraction: float, runs_: list[dict], final_tokens: int, main: list[dict]
) -> str:
  """Accuracy at `fraction` of the labels against pretraining tokens (random init: 0; the
  study's own pretrained rows from `main` where finished) and the log-linear trend of the gain
  over random init."""
  points = trend_points(fraction, runs_, final_tokens, main)
  lines = [
    f'{study.title}: test accuracy (%) at {fraction:.0%} of the labels against pretraining tokens\n',
    '| backbone | pretraining tokens | accuracy | gain over random init |',
    '|---|---|---|---|',
  ]
  base = statistics.mean(points[0][1]) if 0 in points else None
  fit = []
  for tokens in sorted(points):
    label, acc = points[tokens]
    mean = statistics.mean(acc)
    std = statistics.stdev(acc) if len(acc) > 1 else 0.0
    gain = '' if base is None else f'{mean - base:+.1f}'
    lines.append(f'| {label} | {tokens:,} | {mean:.1f} ± {std:.1f} (n={len(acc)}) | {gain} |')
    if tokens and base is not None:
      fit.append((math.log10(tokens), mean - base))
  if len(fit) >= 2:
    import numpy as np

    slope, intercept = np.polyfit([x for x, _ in fit], [y for _, y in fit], 1)
    lines.append(
      f'\nLeast-squares line through the pretrained points: gain = {intercept:+.2f} '
      f'{slope:+.2f} x log10(tokens) points'
      + (
        f'; +3 points at about {10 ** ((3 - intercept) / slope):.2g} tokens (an extrapolation).'
        if slope > 0
        else '; the gain does not grow with tokens here.'
      )
    )
  return '\n'.join(lines)


def adapt(workdir: pathlib.Path, task, split_seed: int, ckpt, steps: int, study: Study):
  """Task-adaptive pretraining (Gururangan et al. 2020) into WORKDIR/adapted: the backbone's
  own objective and tokenizer, continued from `ckpt` on the task's unlabelled text (the
  training split without labels and what else the task offers; no test text). Returns its
  final checkpoint, or None when stopped (a rerun resumes)."""
  import ml_collections

  from fm import checkpoint, configs, runs
  from fm.data import pipeline

  corpus = workdir / 'adapt_corpus'
  if not (corpus / 'validation.jsonl').exists():  # Written last: the corpus is complete.
    corpus.mkdir(parents=True, exist_ok=True)
    for split, texts in task.unlabelled(split_seed).items():
      part = corpus / f'{split}.jsonl.part'
      part.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
      part.rename(corpus / f'{split}.jsonl')
  backbone = configs.resolve(checkpoint.read_meta(ckpt)['config'])
  config = ml_collections.ConfigDict(backbone.to_dict())
  config.data.update(
    dataset='files', train=str(corpus / 'train.jsonl'), validation=str(corpus / 'validation.jsonl')
  )
  if config.data.tokenizer.kind == 'sentencepiece' and not config.data.tokenizer.model:
    # The backbone's own, not one trained on the new text.
    tokenizer = pipeline.prepared_directory(backbone.data) / 'tokenizer.model'
    config.data.tokenizer.model = str(tokenizer)
  config.init.from_checkpoint = str(ckpt)
  every = max(steps // 5, 1)
  config.train.update(steps=steps, eval_every=every, log_every=max(steps // 25, 1))
  config.optim.update(lr=study.adapt_lr, warmup_steps=max(steps // 25, 1))
  config.checkpoint.every_steps = every
  run_dir = workdir / study.run_name('adapted')
  same_run(run_dir, config, ('init.from_checkpoint', 'train.steps', 'optim.lr'))
  # Trained (or resumed) unless finished; None when stopped.
  return runs.obtain(runs.Dependency('adapted', config, run_dir, 'task-adaptive pretraining', None))


def write(workdir: pathlib.Path, study: Study, results: list[dict], spent: dict) -> str:
  """The JSON and the table, with the minutes of training steps `spent` on the backbones and
  those of the fine-tuning runs so far."""
  from fm import metrics

  metrics.write_json(workdir / f'{study.results}.json', results)
  markdown = f'{study.title} test accuracy (%), mean ± std over seeds'
  if study.adapt_steps:
    markdown += f' (adapted: {study.adapt_steps} steps of task-adaptive pretraining)'
  markdown += '\n\n'
  markdown += table(study, results)
  cells = [f'{name} {minutes:.1f}' for name, minutes in spent.items()]
  tuned = [c['minutes'] for r in results for c in r.get('candidates', [r]) if 'minutes' in c]
  cells.append(f'{len(tuned)} fine-tuning runs {sum(tuned):.1f}')
  markdown += '\n\nMinutes of training steps: ' + ', '.join(cells) + '.'
  (workdir / f'{study.results}.md').write_text(markdown + '\n')
  return markdown


def table(study: Study, results: list[dict], models: tuple[str, ...] = ()) -> str:
  fractions = sorted({r['fraction'] for r in results})
  lines = [
    '| model | ' + ' | '.join(f'{f:.0%} labels' for f in fractions) + ' |',
    '|---|' + '---|' * len(fractions),
  ]
  for model in models or study.models:
    cells = []
    for f in fractions:
      acc = [100 * r['accuracy'] for r in results if r['model'] == model and r['fraction'] == f]
      std = statistics.stdev(acc) if len(acc) > 1 else 0.0
      cells.append(f'{statistics.mean(acc):.1f} ± {std:.1f} (n={len(acc)})' if acc else '')
    lines.append(f'| {model} | ' + ' | '.join(cells) + ' |')
  picks = [
    f'{r["model"]} {r["fraction"]:.0%} seed {r["seed"]}: {r["lr_scale"]:.3g}'
    for r in results
    if 'candidates' in r
  ]
  if picks:
    lines.append(
      "\nLearning rates chosen on validation accuracy (x the experiment's): " + ', '.join(picks)
    )
  return '\n'.join(lines)


def plot(study: Study, results: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for model in study.models:
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
      label=model.replace('_', ' ')
      + (f' ({study.adapt_steps} steps)' if model == 'adapted' and study.variant else ''),
    )
  ax.set_xscale('log')
  ax.set_xlabel('training labels used (%)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(study.title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_trend(
  study: Study, fractions, runs_: list[dict], final_tokens: int, main: list[dict], path
) -> None:
  """Test accuracy against pretraining tokens, one line per label budget (mean and spread of
  the seeds), random init at that budget dashed in the same colour."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for fraction in fractions:
    points = trend_points(fraction, runs_, final_tokens, main)
    tokens = sorted(t for t in points if t)
    accs = [points[t][1] for t in tokens]
    line = ax.errorbar(
      tokens,
      [statistics.mean(a) for a in accs],
      yerr=[statistics.stdev(a) if len(a) > 1 else 0 for a in accs],
      marker='o',
      capsize=3,
      label=f'pretrained, {fraction:.0%} of the labels',
    )
    if 0 in points:
      colour = line.lines[0].get_color()
      ax.axhline(statistics.mean(points[0][1]), color=colour, ls='--', alpha=0.7)
  ax.plot([], [], 'k--', alpha=0.7, label='random init (same colour: same budget)')
  ax.set_xscale('log')
  ax.set_xlabel('pretraining tokens')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(f'{study.title}: accuracy against pretraining', fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report_trend(workdir: pathlib.Path, study: Study, smoke: bool, pretrained: str) -> int:
  done = trend(workdir, study, smoke, pretrained)
  if done is None:
    print('stopped (preempted); rerun the same command to resume.')
    return 0
  main_results = workdir / 'label_efficiency.json'
  finished = json.loads(main_results.read_text()) if main_results.exists() else []
  runs_, final_tokens = done
  fractions = sorted({r['fraction'] for r in runs_})
  markdown = '\n\n'.join(trend_table(study, f, runs_, final_tokens, finished) for f in fractions)
  (workdir / 'trend.md').write_text(markdown + '\n')
  plot_trend(study, fractions, runs_, final_tokens, finished, workdir / 'trend.png')
  print(markdown)
  return 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--study', default='sentiment', choices=sorted(STUDIES))
  parser.add_argument('--smoke', action='store_true', help='2 label budgets, 1 seed, 8 steps')
  parser.add_argument('--pretrained', default='', help='a finished pretraining run to reuse')
  parser.add_argument(
    '--budgets',
    default='',
    help='only these label fractions, in this order (such as 1.0,0.1); '
    f'default: {",".join(map(str, FRACTIONS))}',
  )
  parser.add_argument(
    '--probe',
    action='store_true',
    help="frozen features: each backbone's mean-pooled final states scored by a logistic "
    'regression (writes probe.md and probe.json)',
  )
  parser.add_argument(
    '--trend',
    action='store_true',
    help="accuracy against pretraining tokens: fine-tune from the pretraining run's earlier "
    'checkpoints (writes trend.md, trend.json and trend.png)',
  )
  parser.add_argument(
    '--adapt_steps',
    type=int,
    default=0,
    help="steps of task-adaptive pretraining, if not the study's own (500 for sentiment): its "
    "backbone, runs and results (label_efficiency_adaptedN.*) sit beside the study's",
  )
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir).expanduser()
  from fm import ConfigError

  study = STUDIES[args.study]
  given = [b.strip() for b in args.budgets.split(',') if b.strip()]
  unknown = [b for b in given if not re.fullmatch(r'\d*\.?\d+', b) or float(b) not in FRACTIONS]
  refusals = [  # (whether the flags are refused, the sentence saying why and what works)
    (
      unknown,
      f'--budgets={args.budgets!r} names {", ".join(unknown)}, not a label budget of the study; '
      f'give some of {",".join(map(str, FRACTIONS))}, such as 1.0,0.1.',
    ),
    (
      args.probe and not study.baseline,
      f'--probe scores text backbones; the {args.study} study reads images (drop --probe or '
      'give --study sentiment).',
    ),
    (
      args.adapt_steps and not study.adapt_steps,
      f'--adapt_steps: the {args.study} study has no task-adaptive pretraining; drop '
      '--adapt_steps or give --study sentiment.',
    ),
    (
      args.adapt_steps < 0 or (args.adapt_steps and (args.probe or args.trend)),
      f'--adapt_steps={args.adapt_steps} must be a positive number of steps, and it changes the '
      'fine-tuning study alone (not --probe or --trend): such as --adapt_steps 1000.',
    ),
  ]
  for refused, why in refusals:
    if refused:
      print(f'error: {why}', file=sys.stderr)
      return 2
  study = study.with_adapt_steps(args.adapt_steps or study.adapt_steps)
  budgets = tuple(dict.fromkeys(float(b) for b in given))
  workdir.mkdir(parents=True, exist_ok=True)  # After the flags were checked.
  try:
    if args.trend:
      return report_trend(workdir, study, args.smoke, args.pretrained)
    if args.probe:
      return report_probe(workdir, study, args.smoke, args.pretrained)
    results = run(workdir, study, args.smoke, args.pretrained, budgets)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except FloatingPointError as e:  # A run diverged: its recipe in this file needs a change.
    print(f'error: {e}', file=sys.stderr)
    return 1
  if not results:  # Preempted.
    print('stopped (preempted); rerun the same command to resume.')
    return 0
  markdown = (workdir / f'{study.results}.md').read_text()  # Written after the last run.
  plot(study, results, workdir / f'{study.results}.png')
  print(markdown)
  return 0


if __name__ == '__main__':
  sys.exit(main())
