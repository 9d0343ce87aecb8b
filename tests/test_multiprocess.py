"""Two JAX processes on 127.0.0.1 (4 fake CPU devices each, started by launch/local.sh): save,
resume, same data shards."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from workdirs import train_losses as losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = [
  '--config',
  'experiments/lm_shakespeare.py:smoke',
  '--config.train.steps=8',
  '--config.train.log_every=1',
  '--config.train.eval_every=1000',
  '--config.checkpoint.every_steps=4',
]


def run_processes(workdir, num_processes=2, devices_each=4):
  """launch/local.sh: process 0's output comes back; the others log to files."""
  result = subprocess.run(
    [
      'bash',
      'launch/local.sh',
      '--processes',
      str(num_processes),
      '--devices',
      str(devices_each),
      '--',
      *FLAGS,
      '--workdir',
      str(workdir),
    ],
    cwd=ROOT,
    env={**os.environ, 'PYTHON': sys.executable, 'LOG_DIR': str(workdir.parent)},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return [result.stdout]


@pytest.mark.slow
def test_two_processes_save_and_resume_exactly(tmp_path):
  run_processes(tmp_path / 'a')
  first = losses(tmp_path / 'a')
  # Only process 0 writes metrics; both processes wrote their own iterator state.
  data_files = sorted(
    p.name for p in (tmp_path / 'a' / 'checkpoints' / '4' / 'data').glob('*.json')
  )
  assert data_files == ['process_0-of-2.json', 'process_1-of-2.json']

  shutil.copytree(tmp_path / 'a' / 'checkpoints' / '4', tmp_path / 'b' / 'checkpoints' / '4')
  outs = run_processes(tmp_path / 'b')
  assert 'at step 4' in outs[0]
  resumed = losses(tmp_path / 'b')
  assert {s: resumed[s] for s in range(5, 9)} == {s: first[s] for s in range(5, 9)}

  # One process with 8 devices computes the same thing.
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  result = subprocess.run(
    [sys.executable, '-m', 'fm.main', *FLAGS, '--workdir', str(tmp_path / 'c')],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  single = losses(tmp_path / 'c')
  for s in range(1, 9):
    assert abs(single[s] - first[s]) <= 1e-5 * abs(first[s])
