"""The study scripts' analysis code, checked on data with a known answer, and their smoke runs."""

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_command(script: str) -> list[str]:
  """The README's smoke command of a study script, its workdir left for the caller."""
  prefix = f'python experiments/{script}.py --workdir '
  line = next(
    line.strip()
    for line in (ROOT / 'README.md').read_text().splitlines()
    if line.strip().startswith(prefix) and line.strip().endswith(' --smoke')
  )
  assert line.split() == [
    'python',
    f'experiments/{script}.py',
    '--workdir',
    line.split()[3],
    '--smoke',
  ]
  return [sys.executable, f'experiments/{script}.py', '--workdir']


def _script(name: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _isoflop_runs(sl, law, budgets, spread, sizes, noise, seed=0) -> list[dict]:
  """IsoFLOP runs around `law`'s compute-optimal sizes (N from 1/spread to spread times the
  optimum, D = C / 6N), their losses L(N, D) = E + A / N^alpha + B / D^beta times log-normal
  noise."""
  rng = np.random.default_rng(seed)
  runs = []
  for c in budgets:
    centre = sl.frontier(law, [c])['n_opt'][0]
    for n in centre * np.geomspace(1 / spread, spread, sizes):
      d = c / (6 * n)
      exact = law['E'] + law['A'] / n ** law['alpha'] + law['B'] / d ** law['beta']
      runs.append(dict(budget=c, n=n, d=d, loss=float(exact * np.exp(rng.normal(0, noise)))))
  return runs


def test_scaling_fit_recovers_known_exponents():
  """Approach 3 (Huber on log-loss, L-BFGS from a grid) recovers the constants that generated
  noisy IsoFLOP losses, and approach 2's parabolas recover a = beta / (alpha + beta), for two
  laws whose exponents differ (so the check can fail)."""
  sl = _script('scaling_law')
  budgets = [1e12, 1e13, 1e14, 1e15]
  for law in (
    dict(E=1.9, A=60.0, B=300.0, alpha=0.45, beta=0.3),
    dict(E=1.5, A=400.0, B=40.0, alpha=0.3, beta=0.4),
  ):
    runs = _isoflop_runs(sl, law, budgets, spread=8, sizes=7, noise=0.002)
    fit = sl.fit_parametric(*sl._arrays(runs))
    assert abs(fit['alpha'] - law['alpha']) < 0.04, (law, fit)
    assert abs(fit['beta'] - law['beta']) < 0.04, (law, fit)
    assert abs(fit['E'] - law['E']) < 0.05 * law['E'], (law, fit)
    a = law['beta'] / (law['alpha'] + law['beta'])
    front = sl.frontier(fit, budgets)
    assert abs(front['a'] - a) < 0.03 and abs(front['a'] + front['b'] - 1) < 1e-9
    iso = sl.fit_isoflop(runs)
    assert iso['skipped'] == [] and abs(iso['a'] - a) < 0.05 and abs(iso['b'] - (1 - a)) < 0.05
    np.testing.assert_allclose(iso['n_opt'], sl.frontier(law, budgets)['n_opt'], rtol=0.25)
    # Sizes 8 to 512 times the optimum: the parabola's vertex lies below them, so approach 2 leaves
    # the budget out instead of extrapolating.
    above = [r for r in runs if r['budget'] == 1e12]
    above = [dict(r, n=r['n'] * 64, d=r['d'] / 64) for r in above]
    for r in above:
      r['loss'] = law['E'] + law['A'] / r['n'] ** law['alpha'] + law['B'] / r['d'] ** law['beta']
    assert sl.fit_isoflop(above)['skipped'] == [1e12]


@pytest.mark.slow
def test_scaling_bootstrap_intervals_cover_the_truth():
  """The bootstrap's 95% intervals (few resamplings) contain the generating exponents and
  narrow when the noise does."""
  sl = _script('scaling_law')
  law = dict(E=1.9, A=60.0, B=300.0, alpha=0.45, beta=0.3)
  widths = []
  for noise in (0.01, 0.001):
    runs = _isoflop_runs(sl, law, [1e12, 1e13, 1e14], spread=6, sizes=5, noise=noise, seed=1)
    fit = sl.fit_parametric(*sl._arrays(runs))
    ci = sl.bootstrap(runs, samples=30, seed=0, start=sl.theta(fit))
    assert ci['alpha'][0] <= law['alpha'] <= ci['alpha'][1], (noise, ci['alpha'])
    assert ci['beta'][0] <= law['beta'] <= ci['beta'][1], (noise, ci['beta'])
    widths.append(ci['alpha'][1] - ci['alpha'][0])
  assert widths[1] < widths[0]


@pytest.mark.slow
def test_scaling_law_script_smoke(tmp_path):
  """The README's smoke command trains the smoke grid, fits it and writes the table, JSON and
  plots; a second run re-evaluates instead of retraining."""
  command = _readme_command('scaling_law') + [str(tmp_path), '--smoke']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads((tmp_path / 'scaling_law.json').read_text())
  assert len(out['runs']) == 6 and {r['budget'] for r in out['runs']} == {1e9, 2e9}
  for r in out['runs']:
    assert r['flops'] == pytest.approx(r['budget'], rel=0.05) and 0 < r['loss'] < 10
    assert r['curve'] and 0.9 * r['steps'] <= r['curve'][-1][0] <= r['steps']
  assert {'alpha', 'beta', 'E'} <= set(out['parametric']) and 'a' in out['frontier']
  assert 'alpha' in out['intervals']
  for name in ('isoflop.png', 'frontier.png'):
    assert (tmp_path / name).stat().st_size > 1000
  assert '| alpha' in (tmp_path / 'scaling_law.md').read_text()
  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0 and again.stdout.count('finished earlier') == 6, again.stdout
  rerun = json.loads((tmp_path / 'scaling_law.json').read_text())
  assert [r['loss'] for r in rerun['runs']] == [r['loss'] for r in out['runs']]


def test_objective_comparison_budget_is_equal_flops():
  """The budget is lm_news.py's run (360 steps of 16 x 256 tokens at the decoder's FLOPs per
  token, the README's 4.4e13); every objective's pretraining gets it on the model family it
  needs, in the number of its own steps nearest to it."""
  from fm import configs, train
  from fm.models import decoder

  oc = _script('objective_comparison')
  infos = {name: oc.pretraining_config(name, smoke=False) for name in oc.OBJECTIVES}
  news = configs.resolve(configs.load('experiments/lm_news.py', '--config'))
  _, news_model = train.model_config(news, news.data.tokenizer.vocab_size)
  tokens = news.train.steps * news.train.global_batch * news.data.seq_len
  budget = decoder.flops_per_token(news_model, news.data.seq_len) * tokens
  assert news.train.steps == 360 and f'{budget:.1e}' == '4.4e+13'
  for name, (config, info) in infos.items():
    assert config.objective == name and info['family'] == config.model.name
    per_step = info['flops'] / info['steps']
    assert abs(info['flops'] - budget) <= per_step / 2, (name, info, budget)
  assert infos['masked_lm'][0].model.name == 'encoder'
  # UL2 pads its rows to its longest denoiser's shapes: fewer steps than span corruption's.
  assert infos['ul2'][0].model.name == 'encdec'
  assert infos['ul2'][1]['steps'] < infos['span_corruption'][1]['steps'] < 360


def test_objective_comparison_refuses_a_run_of_another_budget(tmp_path):
  """A pretraining directory trained for another number of steps than the budget gives (an
  older FLOPs count) is refused in one sentence naming it, before anything trains."""
  from fm import ConfigError

  oc = _script('objective_comparison')
  (tmp_path / 'pretrain-ul2').mkdir()
  (tmp_path / 'pretrain-ul2' / 'config.json').write_text('{"config": {"train": {"steps": 298}}}')
  steps = oc.pretraining_config('ul2', smoke=False)[1]['steps']
  message = f'pretrain-ul2 is a run of 298 steps, but the budget gives ul2 {steps}; move it'
  with pytest.raises(ConfigError, match=message):
    oc.run(tmp_path, smoke=False, only=('ul2',))
  assert [p.name for p in tmp_path.iterdir()] == ['pretrain-ul2']


def test_objective_comparison_seeds_draw_the_training_order(tmp_path):
  """A fine-tuning seed draws the order of the training examples, not only a new head's init:
  a decoder's seq2seq fine-tuning adds no parameters, so the order is all its seeds vary."""
  from fm.data import pipeline

  oc = _script('objective_comparison')
  rows = {'tokens': np.arange(64, dtype=np.int32)[:, None]}
  for task in oc.TASKS:
    configs = [oc.finetuning_config(task, tmp_path, seed, smoke=False) for seed in oc.SEEDS]
    first = {
      tuple(next(iter(pipeline.example_dataset(rows, 8, c.data.seed)))['tokens'][:, 0])
      for c in configs
    }
    assert len(first) == len(oc.SEEDS), task


def test_objective_comparison_keeps_the_runs_not_reached_when_stopped():
  """What the JSON holds after each run: the runs so far, then those it had recorded that the
  rerun has not reached (`--objectives causal_lm` stopped mid-way loses no other objective)."""
  oc = _script('objective_comparison')
  row = lambda o, t, s, acc: dict(objective=o, task=t, seed=s, accuracy=acc)
  before = {
    'pretraining': {'causal_lm': {'loss': 3.0}, 'ul2': {'loss': 2.0}},
    'finetuning': [row('causal_lm', 'sentiment', 0, 0.7), row('causal_lm', 'sentiment', 1, 0.6)]
    + [row('ul2', 'sentiment', 0, 0.8)],
  }
  out = {
    'pretraining': {'causal_lm': {'loss': 3.1}},
    'finetuning': [row('causal_lm', 'sentiment', 0, 0.71)],
  }
  kept = oc.with_unreached(out, before)
  assert kept['pretraining'] == {'causal_lm': {'loss': 3.1}, 'ul2': {'loss': 2.0}}
  assert kept['finetuning'] == out['finetuning'] + before['finetuning'][1:]


@pytest.mark.slow
def test_objective_comparison_script_smoke(tmp_path):
  """The README's smoke command pretrains the five objectives and fine-tunes each on the three
  tasks (masked LM on the two it can do) and writes the table, JSON and loss plot."""
  command = _readme_command('objective_comparison') + [str(tmp_path), '--smoke']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads((tmp_path / 'objective_comparison.json').read_text())
  assert list(out['pretraining']) == [
    'causal_lm',
    'prefix_lm',
    'masked_lm',
    'span_corruption',
    'ul2',
  ]
  assert all(info['curve'] and info['params'] > 0 for info in out['pretraining'].values())
  done = {(r['objective'], r['task']) for r in out['finetuning']}
  assert len(done) == 14 and ('masked_lm', 'headline') not in done
  assert all(0 <= r['accuracy'] <= 1 for r in out['finetuning'] if 'accuracy' in r)
  table = (tmp_path / 'objective_comparison.md').read_text()
  assert sum(line.startswith('| ') for line in table.splitlines()) == 6 and '| n/a |' in table
  assert (tmp_path / 'pretraining_loss.png').stat().st_size > 1000
  assert all(info['minutes'] > 0 for info in out['pretraining'].values())
  # A rerun takes the finished runs as recorded: nothing trained or evaluated again (which
  # would append to a run's metrics).
  logs = {p: p.stat().st_mtime_ns for p in tmp_path.glob('*/metrics.jsonl')}
  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert len(logs) == 19 and logs == {p: p.stat().st_mtime_ns for p in logs}
  assert json.loads((tmp_path / 'objective_comparison.json').read_text()) == out
  # One objective rerun alone keeps the others as the JSON recorded them, even with their run
  # directories gone; an unknown objective is refused in one sentence.
  for run_dir in tmp_path.glob('*causal_lm*'):
    shutil.rmtree(run_dir)
  logs = {p: p.stat().st_mtime_ns for p in tmp_path.glob('*/metrics.jsonl')}
  alone = subprocess.run(
    command + ['--objectives', 'ul2'], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert alone.returncode == 0, alone.stderr[-3000:]
  assert logs == {p: p.stat().st_mtime_ns for p in logs}
  assert json.loads((tmp_path / 'objective_comparison.json').read_text()) == out
  wrong = subprocess.run(
    command + ['--objectives', 'ul3'], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert wrong.returncode == 2 and '--objectives ul3' in wrong.stderr


def test_the_readme_label_efficiency_trend_is_its_json():
  """The README's trend table (accuracy against pretraining tokens at 1% and 10% of the labels)
  is what its JSON and the study's own rows in experiments/results give."""
  study = _script('label_efficiency')
  results = ROOT / 'experiments' / 'results'
  runs_ = json.loads((results / 'label_efficiency_sentiment_trend.json').read_text())
  main = json.loads((results / 'label_efficiency_sentiment.json').read_text())
  final_tokens = 360 * runs_[0]['pretraining_tokens'] // runs_[0]['pretraining_steps']
  readme = (ROOT / 'README.md').read_text()
  start = readme.index('| backbone | pretraining tokens | 1% labels (102) | gain |')
  rows = readme[start:].split('\n\n')[0].splitlines()[2:]
  columns = []
  for fraction in (0.01, 0.1):
    points = study.trend_points(fraction, runs_, final_tokens, main)
    base = np.mean(points[0][1])
    column = []
    for tokens in sorted(points):
      acc = points[tokens][1]
      cell = f'{np.mean(acc):.1f} ± {np.std(acc, ddof=1):.1f}'
      column.append((f'{tokens:,}', cell, f'{np.mean(acc) - base:+.1f}' if tokens else ''))
    columns.append(column)
  table = [
    (tokens, cell1, gain1, cell10, gain10)
    for (tokens, cell1, gain1), (_, cell10, gain10) in zip(*columns)
  ]
  assert [tuple(c.strip() for c in row.split('|')[2:7]) for row in rows] == table


def _readme_table(header: str, columns: int = 3) -> dict[str, list[str]]:
  """A README table's cells (`columns` after the first) by its first column, the table
  starting at `header`."""
  readme = (ROOT / 'README.md').read_text()
  lines = readme[readme.index(header) :].split('\n\n')[0].splitlines()[2:]
  return {
    line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2 : 2 + columns]]
    for line in lines
  }


def _accuracies(rows: list[dict], model: str, fraction: float) -> list[float]:
  acc = [100 * r['accuracy'] for r in rows if r['model'] == model and r['fraction'] == fraction]
  assert len(acc) == 3, (model, fraction)
  return acc


FRACTIONS = (0.01, 0.1, 1.0)


def test_the_readme_label_efficiency_table_is_its_json():
  """The README's sentiment table (test accuracy per model and label budget, and the gains over
  random init) is what experiments/results/label_efficiency_sentiment.json gives."""
  results = ROOT / 'experiments' / 'results'
  rows = json.loads((results / 'label_efficiency_sentiment.json').read_text())
  cells = _readme_table('| model | 1% labels (102) | 10% labels (1,015) | 100% labels (10,150) |')
  names = {
    'pretrained on news, fine-tuned': 'pretrained',
    'news + task-adaptive pretraining': 'adapted',
    'same architecture, random init': 'random',
    'TF-IDF logistic regression (C chosen)': 'bag_of_words',
  }
  for label, model in names.items():
    got = [_accuracies(rows, model, f) for f in FRACTIONS]
    assert cells[label] == [f'{np.mean(a):.1f} ± {np.std(a, ddof=1):.1f}' for a in got], label
  for label, model in (
    ('gain, pretrained on news', 'pretrained'),
    ('gain, news + task-adaptive', 'adapted'),
  ):
    gains = [
      np.mean(_accuracies(rows, model, f)) - np.mean(_accuracies(rows, 'random', f))
      for f in FRACTIONS
    ]
    assert cells[label] == [f'{g:+.1f}' for g in gains], label
  # Task-adaptive pretraining of twice the length (--adapt_steps 1000), beside the study's.
  longer = json.loads((results / 'label_efficiency_sentiment_adapted1000.json').read_text())
  assert [r for r in longer if r['model'] != 'adapted'] == [
    r for r in rows if r['model'] != 'adapted' and r['fraction'] in (0.01, 0.1)
  ]
  cells = _readme_table('| task-adaptive pretraining | 1% labels (102) | gain |', columns=4)
  for label, model, source in (
    ('none (the news backbone)', 'pretrained', rows),
    ("500 steps (the study's)", 'adapted', rows),
    ('1,000 steps', 'adapted', longer),
  ):
    expected = []
    for f in (0.01, 0.1):
      acc = _accuracies(source, model, f)
      gain = np.mean(acc) - np.mean(_accuracies(rows, 'random', f))
      expected += [f'{np.mean(acc):.1f} ± {np.std(acc, ddof=1):.1f}', f'{gain:+.1f}']
    assert cells[label] == expected, label
  # The frozen-feature probe's table (--probe).
  rows = json.loads((results / 'label_efficiency_sentiment_probe.json').read_text())
  cells = _readme_table(
    '| features | 1% labels (102) | 10% labels (1,015) | 100% labels (10,150) |'
  )
  names = {
    'pretrained on news': 'pretrained',
    'news + task-adaptive pretraining': 'adapted',
    'random init': 'random',
  }
  assert set(cells) == set(names)
  for label, model in names.items():
    got = [_accuracies(rows, model, f) for f in FRACTIONS]
    assert cells[label] == [f'{np.mean(a):.1f} ± {np.std(a, ddof=1):.1f}' for a in got], label
