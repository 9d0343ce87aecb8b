"""Objective comparison (Raffel et al. 2020, T5, section 3.3 and Table 4), on one compute budget.

  python experiments/objective_comparison.py --workdir /tmp/objectives
  python experiments/objective_comparison.py --workdir /tmp/objectives_smoke --smoke

Five pretraining objectives on the news corpus, each on the model family it needs, `mini` size
and one SentencePiece vocabulary (4,096 pieces): causal LM and prefix LM (decoder), BERT-style
masked LM (encoder), T5 span corruption and UL2 (encoder-decoder). Each gets the training FLOPs
of experiments/lm_news.py (360 steps x 16 x 256 tokens of the decoder; steps = that budget /
train.step_flops: the family's flops_per_token x tokens per step, or, for the encoder-decoder,
flops_per_row at the shapes the objective's rows have, which UL2 pads to its longest
denoiser's). Each backbone is then fine-tuned, 3 seeds, on
  sentiment      Rotten Tomatoes (experiments/transfer_sentiment.py): test accuracy
  question_type  TREC question types (the same recipe, task=question_type): test accuracy
  headline       news article -> title (experiments/transfer_headline.py): test ROUGE-L of
                 greedy titles for 64 test articles, and the test target loss
(an encoder cannot write a title: masked LM has no headline score). Writes
WORKDIR/objective_comparison.{md,json} and pretraining_loss.png, with each run's minutes of
training steps, rewritten after every run (a stopped study has them for what it finished);
rerunning the command resumes a stopped run and takes finished ones as the JSON recorded them.
`--objectives ul2` runs one objective (or a comma-separated few) and keeps the others as the
JSON in WORKDIR recorded them, so a study can be finished or redone one objective at a time.
"""

import argparse
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Objective -> (pretraining experiment, config changes). lm_news.py's decoder sets the budget.
OBJECTIVES = {
  'causal_lm': ('experiments/lm_news.py', {}),
  'prefix_lm': ('experiments/lm_news.py', {'objective': 'prefix_lm'}),
  'masked_lm': ('experiments/lm_news.py', {'objective': 'masked_lm', 'model.name': 'encoder'}),
  'span_corruption': ('experiments/t5_news.py', {}),
  'ul2': ('experiments/ul2_news.py', {}),
}
# Task -> (fine-tuning experiment, task name, steps, the scores reported: test metric keys).
TASKS = {
  'sentiment': ('experiments/transfer_sentiment.py', 'sentiment', 300, ('accuracy',)),
  'question_type': ('experiments/transfer_sentiment.py', 'question_type', 300, ('accuracy',)),
  'headline': ('experiments/transfer_headline.py', 'headline', 300, ('greedy_rougeL', 'loss')),
}
SEEDS = (0, 1, 2)
# The paper's GLUE average / CNN-DailyMail ROUGE-2 for its encoder-decoder (Table 4: prefix LM
# against BERT-style denoising; Table 5: replacing corrupted spans with sentinels, the T5
# baseline), and for causal LM its decoder-only language model trained on the LM objective
# (Table 2): denoising ahead of language modelling for fine-tuning.
PAPER = {
  'causal_lm': '73.78 / 17.54 (Table 2: decoder-only)',
  'prefix_lm': '80.69 / 18.94',
  'masked_lm': '82.96 / 19.17',
  'span_corruption': '83.28 / 19.24',
}


def pretraining_config(objective: str, smoke: bool):
  """The objective's pretraining config with the budget's number of steps."""
  import ml_collections

  from fm import configs, registry, train

  experiment, changes = OBJECTIVES[objective]
  suffix = ':smoke' if smoke else ''
  reference = configs.load('experiments/lm_news.py' + suffix, 'objective_comparison')
  config = ml_collections.ConfigDict(configs.load(experiment + suffix, 'objective_comparison'))
  for key, value in changes.items():
    section, _, field = key.rpartition('.')
    (config[section] if section else config)[field] = value
  config = configs.resolve(config)

  def flops_per_step(c) -> float:
    objective = registry.get('objectives', c.objective)
    family, model_cfg = train.model_config(c, c.data.tokenizer.vocab_size + objective.EXTRA_TOKENS)
    args = c.objective_args
    return train.step_flops(
      family, model_cfg, objective, args, c.data.seq_len, c.train.global_batch
    )

  budget = flops_per_step(configs.resolve(reference)) * reference.train.steps
  steps = max(round(budget / flops_per_step(config)), 1)
  every = max(steps // 3, 1)
  config.train.update(steps=steps, eval_every=every, log_every=max(steps // 30, 1))
  config.checkpoint.every_steps = every
  return config, dict(family=config.model.name, steps=steps, flops=steps * flops_per_step(config))


def finetuning_config(task: str, backbone: pathlib.Path, seed: int, smoke: bool):
  import ml_collections

  from fm import configs

  experiment, name, steps, _ = TASKS[task]
  config = ml_collections.ConfigDict(
    configs.load(experiment + (':smoke' if smoke else ''), 'objective_comparison')
  )
  # A seed draws the new head's init and the order of the training examples (a decoder's
  # seq2seq fine-tuning adds no parameters: its seeds differ in the order alone).
  config.task, config.seed, config.data.seed = name, seed, seed
  config.pretrained.update(workdir=str(backbone), experiment='')
  steps = 4 if smoke else steps
  config.train.update(steps=steps, eval_every=steps, log_every=max(steps // 6, 1))
  config.checkpoint.every_steps = steps
  config.optim.warmup_steps = max(steps // 10, 1)
  if task == 'headline':
    config.task_args.eval_examples = 8 if smoke else 64
    config.finetune.beams = 2
  return config


def run(
  workdir: pathlib.Path, smoke: bool, only: tuple[str, ...] = tuple(OBJECTIVES)
) -> dict | None:
  """Every run of the study, in order, the table and JSON rewritten after each; None when a run
  was preempted (a rerun resumes it). Runs recorded in the JSON whose final checkpoint exists
  are taken as recorded, not evaluated again; objectives left out of `only` are kept exactly as
  the JSON recorded them (curve and minutes too), without their run directories. `minutes` are
  training steps' time (from the throughput each run logged, summed over the commands that
  trained it)."""
  from fm import checkpoint, runs
  from fm import metrics as metrics_lib

  seeds = SEEDS[:1] if smoke else SEEDS
  path = workdir / 'objective_comparison.json'
  before = json.loads(path.read_text()) if path.exists() else {}
  recorded = {(r['objective'], r['task'], r['seed']): r for r in before.get('finetuning', [])}
  out = {'pretraining': {}, 'finetuning': []}
  for objective in OBJECTIVES:
    if objective not in only:
      if objective in before.get('pretraining', {}):
        out['pretraining'][objective] = before['pretraining'][objective]
        out['finetuning'] += [r for r in before['finetuning'] if r['objective'] == objective]
      continue
    config, info = pretraining_config(objective, smoke)
    pretrain_dir = workdir / f'pretrain-{objective}'
    check_budget(pretrain_dir, objective, info['steps'], workdir)
    if (
      objective in before.get('pretraining', {})
      and checkpoint.latest_step(pretrain_dir) >= info['steps']
    ):
      info['loss'] = before['pretraining'][objective]['loss']
    else:
      metrics = runs.run(config, pretrain_dir)
      if not metrics:
        return None
      info['loss'] = metrics['loss']
    info['params'] = json.loads((pretrain_dir / 'config.json').read_text())['params']['total']
    info['curve'] = metrics_lib.series(pretrain_dir, 'train/loss')
    info['minutes'] = metrics_lib.training_seconds(pretrain_dir) / 60
    out['pretraining'][objective] = info
    write(workdir, with_unreached(out, before))
    for task, (_, _, _, keys) in TASKS.items():
      if task == 'headline' and config.model.name == 'encoder':
        continue  # An encoder cannot write a target.
      for seed in seeds:
        config_ft = finetuning_config(task, pretrain_dir, seed, smoke)
        run_dir = workdir / f'{objective}-{task}-{seed}'
        row = recorded.get((objective, task, seed))
        if not (row and checkpoint.latest_step(run_dir) >= config_ft.train.steps):
          metrics = runs.run(config_ft, run_dir)
          if not metrics:
            return None
          row = dict(objective=objective, task=task, seed=seed)
          row.update({k: metrics[f'test/{k}'] for k in keys})
        row['minutes'] = metrics_lib.training_seconds(run_dir) / 60
        out['finetuning'].append(row)
        write(workdir, with_unreached(out, before))
  write(workdir, out)  # Done: rows no longer in the study go.
  return out


def with_unreached(out: dict, before: dict) -> dict:
  """`out` so far plus what the JSON recorded for the runs not reached yet, so a stop keeps
  them (a rerun takes them as recorded)."""
  done = {(r['objective'], r['task'], r['seed']) for r in out['finetuning']}
  pretraining = {**before.get('pretraining', {}), **out['pretraining']}
  return {
    'pretraining': {o: pretraining[o] for o in OBJECTIVES if o in pretraining},
    'finetuning': out['finetuning']
    + [
      r for r in before.get('finetuning', []) if (r['objective'], r['task'], r['seed']) not in done
    ],
  }


def check_budget(pretrain_dir: pathlib.Path, objective: str, steps: int, workdir) -> None:
  """A pretraining run in the workdir made for another number of steps (another budget or
  FLOPs count) is refused, not resumed or reused as if it were this budget's."""
  from fm import ConfigError

  held = pretrain_dir / 'config.json'
  if held.exists():
    made = json.loads(held.read_text())['config']['train']['steps']
    if made != steps:
      raise ConfigError(
        f'{pretrain_dir} is a run of {made} steps, but the budget gives {objective} {steps}; '
        f'move it and its fine-tuning runs ({workdir}/{objective}-*) away, or use a new '
        f'--workdir.'
      )


def write(workdir: pathlib.Path, out: dict) -> str:
  from fm import metrics as metrics_lib

  metrics_lib.write_json(workdir / 'objective_comparison.json', out)
  markdown = table(out)
  (workdir / 'objective_comparison.md').write_text(markdown + '\n')
  plot(out, workdir / 'pretraining_loss.png')
  return markdown


def table(out: dict) -> str:
  """Downstream scores per objective, mean ± std over seeds, with parameters and steps."""
  columns = [(task, key) for task, (_, _, _, keys) in TASKS.items() for key in keys]
  head = ' | '.join(f'{t} {k.replace("greedy_", "")}' for t, k in columns)
  lines = [
    f'| objective | family | params | pretraining steps | minutes | final loss | {head} '
    '| paper (GLUE / CNNDM R-2) |',
    '|---|---|---|---|---|---|' + '---|' * len(columns) + '---|',
  ]
  for objective, info in out['pretraining'].items():
    cells = []
    for task, key in columns:
      values = [
        r[key] for r in out['finetuning'] if r['objective'] == objective and r['task'] == task
      ]
      scale = 100 if key == 'accuracy' else 1
      if not values:
        cells.append('n/a' if task == 'headline' and info['family'] == 'encoder' else '')
        continue
      std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
      cells.append(f'{statistics.mean(values) * scale:.2f} ± {std:.2f} (n={len(values)})')
    lines.append(
      f'| {objective} | {info["family"]} | {info["params"] / 1e6:.1f}M | {info["steps"]} '
      f'| {info["minutes"]:.1f} | {info["loss"]:.3f} | '
      + ' | '.join(cells)
      + f' | {PAPER.get(objective, "")} |'
    )
  return '\n'.join(lines)


def plot(out: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for objective, info in out['pretraining'].items():
    steps, loss = zip(*info['curve']) if info['curve'] else ((), ())
    ax.plot([s / info['steps'] for s in steps], loss, label=f'{objective} ({info["family"]})')
  ax.set_xlabel('share of the compute budget')
  ax.set_ylabel('training loss (each objective its own)')
  ax.set_title('Pretraining on news, equal FLOPs')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--smoke', action='store_true', help='tiny models, 1 seed, 4 steps')
  parser.add_argument(
    '--objectives',
    default=','.join(OBJECTIVES),
    help='comma-separated objectives to run (default: all); the others keep what '
    'WORKDIR/objective_comparison.json recorded for them',
  )
  args = parser.parse_args()
  only = tuple(o for o in args.objectives.split(',') if o)
  unknown = [o for o in only if o not in OBJECTIVES]
  if unknown:
    print(
      f'error: --objectives {",".join(unknown)} is not an objective of this study; '
      f'choose from {",".join(OBJECTIVES)}.',
      file=sys.stderr,
    )
    return 2
  workdir = pathlib.Path(args.workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  from fm import ConfigError

  try:
    out = run(workdir, args.smoke, only)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except FloatingPointError as e:  # A run diverged: its recipe in this file needs a change.
    print(f'error: {e}', file=sys.stderr)
    return 1
  if out is None:
    print('stopped (preempted); rerun the same command to resume.')
    return 0
  markdown = write(workdir, out)
  minutes = sum(i['minutes'] for i in out['pretraining'].values())
  tuned = sum(r['minutes'] for r in out['finetuning'])
  print(markdown)
  print(f'training steps: {minutes:.1f} minutes of pretraining, {tuned:.1f} of fine-tuning')
  return 0


if __name__ == '__main__':
  sys.exit(main())
