"""End to end: the README's smoke command, a 2-step run of every experiment, and bad input."""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from fm import train
from workdirs import load_experiment, train_losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / 'experiments').glob('*.py'))


def run_main(*args, timeout=300):
  # conftest's XLA_FLAGS are inherited: the subprocess sees the same 8 fake devices.
  return subprocess.run([sys.executable, '-m', 'fm.main', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def readme_commands() -> list[list[str]]:
  """The README's smoke-sized `python -m fm.main` commands, as argument lists."""
  lines = [l.strip() for l in (ROOT / 'README.md').read_text().splitlines()]
  return [shlex.split(l) for l in lines if 'python -m fm.main' in l and ':smoke' in l]


def run_readme_command(cmd: list[str], workdir: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  while '=' in cmd[0]:  # Leading VAR=value assignments.
    key, value = cmd.pop(0).split('=', 1)
    env[key] = value
  cmd[cmd.index('--workdir') + 1] = str(workdir)
  assert cmd[:3] == ['python', '-m', 'fm.main']
  return subprocess.run([sys.executable] + cmd[1:], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_readme_smoke_commands(tmp_path):
  """The smoke command writes what the README says; the fsdp=8 variant computes the same."""
  commands = readme_commands()
  assert len(commands) == 2, commands
  plain, fsdp = sorted(commands, key=lambda c: 'XLA_FLAGS' in c[0])
  result = run_readme_command(plain, tmp_path / 'w')
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r'step \d+/\d+ \| loss .* tok/s \| MFU .* ETA', result.stdout)
  workdir = tmp_path / 'w'
  assert list(workdir.glob('events.out.tfevents.*'))
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  final = [r for r in records if 'eval/bits_per_byte' in r][-1]
  assert 0 < final['eval/bits_per_byte'] < 8
  resolved = json.loads((workdir / 'config.json').read_text())
  assert resolved['config']['objective'] == 'causal_lm'
  assert resolved['tokenizer']['kind'] == 'sentencepiece'

  result = run_readme_command(fsdp, tmp_path / 'fsdp')
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((tmp_path / 'fsdp' / 'config.json').read_text())['mesh'] == {
      'data': 1, 'fsdp': 8, 'tensor': 1}
  a, b = train_losses(tmp_path / 'w'), train_losses(tmp_path / 'fsdp')
  assert a.keys() == b.keys()
  for step in a:
    assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_every_experiment_runs_two_steps(name, tmp_path):
  config = load_experiment(name).get_config('smoke')
  config.train.steps, config.train.log_every, config.train.eval_every = 2, 1, 2
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics and all(v == v for v in metrics.values())  # Present and not NaN.


BAD_INPUT = [
    (['--config.model.name=gpt5'], r"config.model.name='gpt5' is unknown; choose one of: decoder"),
    (['--config.objective=telepathy'], r"config.objective='telepathy' is unknown; choose one of: .*causal_lm"),
    (['--config.mesh.data=3'], r'config.mesh \(data=3,fsdp=1,tensor=1\) spans 3 devices but 8 are'),
    (['--config.train.global_batch=7'], r'config.train.global_batch=7 is not divisible by the 8'),
    (['--config.data.seq_len=4096'], r'config.data.seq_len=4096 exceeds the model max_len'),
    (['--config.data.dataset=wikipedia'], r"config.data.dataset='wikipedia' is unknown"),
    (['--config.train.stepz=3'], r'--config override .*Did you mean "steps"'),
    (['--config.train.steps=abc'], r'--config.train.steps=abc'),
    (['--config.train.nonfinite=ignore'], r"config.train.nonfinite='ignore' is unknown; choose raise or skip"),
]


@pytest.mark.parametrize('flags,message', BAD_INPUT)
def test_bad_input_is_one_line(flags, message, tmp_path):
  result = run_main('--config', 'experiments/lm_shakespeare.py:smoke', '--workdir',
                    str(tmp_path / 'w'), *flags)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  if message:
    assert re.search(message, lines[0]), lines[0]


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  result = run_main('--config', 'experiments/lm_shakespeare.py:smoke', '--workdir',
                    str(blocker / 'w'))
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert re.fullmatch(r'error: --workdir=.* is not writable .*\n', result.stderr)
