"""End to end: the README's smoke command, a 2-step run of every experiment, and bad input."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from workdirs import load_experiment, train_losses

from fm import ConfigError, checkpoint, registry, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Experiment files (configs); scripts such as label_efficiency.py are run by their own tests.
EXPERIMENTS = sorted(
  p.stem for p in (ROOT / 'experiments').glob('*.py') if 'def get_config' in p.read_text()
)


def run_main(*args, timeout=300):
  # conftest's XLA_FLAGS are inherited: the subprocess sees the same 8 fake devices.
  return subprocess.run(
    [sys.executable, '-m', 'fm.main', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def readme_commands() -> list[list[str]]:
  """The README's smoke-sized `python -m fm.main` commands, as argument lists."""
  lines = [line.strip() for line in (ROOT / 'README.md').read_text().splitlines()]
  return [shlex.split(line) for line in lines if 'python -m fm.main' in line and ':smoke' in line]


def run_readme_command(cmd: list[str], workdir: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  while '=' in cmd[0]:  # Leading VAR=value assignments.
    key, value = cmd.pop(0).split('=', 1)
    env[key] = value
  cmd[cmd.index('--workdir') + 1] = str(workdir)
  assert cmd[:3] == ['python', '-m', 'fm.main']
  return subprocess.run(
    [sys.executable] + cmd[1:], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )


def test_readme_smoke_commands(tmp_path):
  """The smoke command writes what the README says; the fsdp=8 variant computes the same."""
  commands = [c for c in readme_commands() if 'experiments/lm_shakespeare.py:smoke' in c]
  assert len(commands) == 2, commands
  plain, fsdp = sorted(commands, key=lambda c: 'XLA_FLAGS' in c[0])
  result = run_readme_command(plain, tmp_path / 'w')
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r'step \d+/\d+ \| loss .* tok/s \| MFU .* ETA', result.stdout)
  workdir = tmp_path / 'w'
  assert list(workdir.glob('events.out.tfevents.*'))
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  final = [r for r in records if 'eval/bits_per_byte' in r][-1]
  assert 0 < final['eval/bits_per_byte'] < 8
  resolved = json.loads((workdir / 'config.json').read_text())
  assert resolved['config']['objective'] == 'causal_lm'
  assert resolved['tokenizer']['kind'] == 'sentencepiece'

  result = run_readme_command(fsdp, tmp_path / 'fsdp')
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((tmp_path / 'fsdp' / 'config.json').read_text())['mesh'] == {
    'data': 1,
    'fsdp': 8,
    'sequence': 1,
    'tensor': 1,
  }
  a, b = train_losses(tmp_path / 'w'), train_losses(tmp_path / 'fsdp')
  assert a.keys() == b.keys()
  for step in a:
    assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def test_readme_transfer_command_reuses_the_backbone(tmp_path):
  """The README's transfer command pretrains, fine-tunes and tests; run again, it trains
  nothing and reports the test accuracy again."""
  [command] = [c for c in readme_commands() if 'experiments/transfer_sentiment.py:smoke' in c]
  workdir = tmp_path / 't'
  first = run_readme_command(list(command), workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'training experiments/lm_shakespeare.py:smoke' in first.stdout
  tested = [
    json.loads(line)
    for line in (workdir / 'metrics.jsonl').read_text().splitlines()
    if 'test/accuracy' in line
  ]
  assert len(tested) == 1 and 0 <= tested[0]['test/accuracy'] <= 1
  pretraining = (workdir / 'pretrained' / 'metrics.jsonl').read_text()
  second = run_readme_command(list(command), workdir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'training experiments' not in second.stdout and 'nothing to train' in second.stdout
  assert 'test @ 20: loss' in second.stdout
  assert (workdir / 'pretrained' / 'metrics.jsonl').read_text() == pretraining


# In the slow set: distillation and transfer_sentiment (covered by larger tests here:
# test_distill_trains_the_teacher_once and the README command above) and llama (the 8b recipe at
# test size: fsdp, bf16, scanned and rematerialised layers, each also tested in test_models and
# test_sharding).
COVERED_ELSEWHERE = ('distill_shakespeare', 'llama', 'transfer_sentiment')


@pytest.mark.parametrize(
  'name',
  [pytest.param(e, marks=pytest.mark.slow) if e in COVERED_ELSEWHERE else e for e in EXPERIMENTS],
)
def test_every_experiment_runs_two_steps(name, tmp_path):
  config = load_experiment(name).get_config('smoke')
  config.train.steps, config.train.log_every, config.train.eval_every = 2, 1, 2
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics and all(v == v for v in metrics.values())  # Present and not NaN.


BAD_INPUT = [
  (['--config.model.name=gpt5'], r"config.model.name='gpt5' is unknown; choose one of: decoder"),
  (
    ['--config.objective=telepathy'],
    r"config.objective='telepathy' is unknown; choose one of: .*causal_lm",
  ),
  (
    ['--config.mesh.data=3'],
    r'config.mesh \(data=3,fsdp=1,sequence=1,tensor=1\) spans 3 devices but 8 are',
  ),
  (['--config.train.global_batch=7'], r'config.train.global_batch=7 is not divisible by the 8'),
  (['--config.data.seq_len=4096'], r'config.data.seq_len=4096 exceeds the model max_len'),
  (['--config.data.dataset=wikipedia'], r"config.data.dataset='wikipedia' is unknown"),
  (['--config.train.stepz=3'], r'--config override .*Did you mean "steps"'),
  (['--config.train.steps=abc'], r'--config.train.steps=abc'),
  (
    ['--config.train.nonfinite=ignore'],
    r"config.train.nonfinite='ignore' is unknown; choose raise or skip",
  ),
  (
    ['--config.objective=distill'],
    r'config.objective_args.teacher needs a workdir of a finished run',
  ),
  (
    ['--config.train.microbatches=3'],
    r'config.train.microbatches=3 must be >= 1 and split config.train.global_batch=8 into slices that the 8 batch shards divide',
  ),
  (
    ['--config.objective=ul2'],
    r"config.objective='ul2' does not work with config.model.name='decoder'; compatible models: encdec",
  ),
]
# (experiment, flags, message) for the objectives' own arguments.
BAD_OBJECTIVE_ARGS = [
  (
    'ul2_news',
    ['--config.objective_args.mixture.S=-1.0'],
    r'config.objective_args.mixture=.* must give a weight >= 0',
  ),
  (
    'distill_shakespeare',
    ['--config.objective_args.teacher.experiment=experiments/nope.py'],
    r"config.objective_args.teacher.experiment='experiments/nope.py': no such experiment file",
  ),
  (
    'distill_shakespeare',
    [
      '--config.objective_args.teacher.experiment=',
      '--config.objective_args.teacher.workdir=/nonexistent',
    ],
    r"config.objective_args.teacher.workdir='/nonexistent' holds no checkpoint",
  ),
  (
    'distill_shakespeare',
    ['--config.objective_args.temperature=0'],
    r'config.objective_args.temperature=0.0 must be > 0',
  ),
]


def test_distill_trains_the_teacher_once(tmp_path):
  """The first run trains the teacher into WORKDIR/teacher; a later run reuses it."""
  config = load_experiment('distill_shakespeare').get_config('smoke')
  config.train.update(steps=2, log_every=1, eval_every=2)
  train.train_and_evaluate(config, str(tmp_path))
  teacher = tmp_path / 'teacher'
  assert checkpoint.latest_step(teacher) == 20
  trained = (teacher / 'metrics.jsonl').read_text()
  config.train.steps = 4
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert (teacher / 'metrics.jsonl').read_text() == trained  # Not trained again.
  frozen = json.loads((tmp_path / 'config.json').read_text())['frozen']
  assert frozen == {'teacher': str(teacher / 'checkpoints' / '20')}
  assert 0 < metrics['teacher_loss'] and 0 <= metrics['kl']


def test_teacher_with_another_tokenizer_is_refused():
  meta = {
    'config': {'model': {'name': 'decoder'}},
    'tokenizer': {'kind': 'byte'},
    'model': {'vocab_size': 384},
  }
  _, student = train.model_config(load_experiment('distill_shakespeare').get_config('smoke'), 4096)
  with pytest.raises(
    ConfigError,
    match=r'config.objective_args.teacher: /t was trained with '
    r'tokenizer .* set config.data to the same',
  ):
    train._check_frozen(
      'teacher',
      '/t',
      meta,
      registry.get('objectives', 'distill'),
      student,
      {'kind': 'sentencepiece'},
    )
  meta['config']['model']['name'] = 'encdec'
  with pytest.raises(ConfigError, match=r"holds a 'encdec' model; fm.objectives.distill needs"):
    train._check_frozen(
      'teacher', '/t', meta, registry.get('objectives', 'distill'), student, {'kind': 'byte'}
    )


@pytest.mark.parametrize('flags,message', BAD_INPUT)
def test_bad_input_is_one_line(flags, message, tmp_path):
  check_one_line_error('lm_shakespeare', flags, message, tmp_path)


@pytest.mark.parametrize('experiment,flags,message', BAD_OBJECTIVE_ARGS)
def test_bad_objective_args_are_one_line(experiment, flags, message, tmp_path):
  check_one_line_error(experiment, flags, message, tmp_path)


def check_one_line_error(experiment, flags, message, tmp_path):
  result = run_main(
    '--config', f'experiments/{experiment}.py:smoke', '--workdir', str(tmp_path / 'w'), *flags
  )
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  if message:
    assert re.search(message, lines[0]), lines[0]


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  result = run_main(
    '--config', 'experiments/lm_shakespeare.py:smoke', '--workdir', str(blocker / 'w')
  )
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert re.fullmatch(r'error: --workdir=.* is not writable .*\n', result.stderr)
