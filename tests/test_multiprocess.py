"""Two JAX processes on 127.0.0.1 (4 fake CPU devices each, started by launch/local.sh): save,
resume, same data shards, and resume across process counts (2 -> 1, 1 -> 2)."""

import json
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


def run_single(workdir):
  """One process with 8 fake devices."""
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  result = subprocess.run(
    [sys.executable, '-m', 'fm.main', *FLAGS, '--workdir', str(workdir)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def close(a: dict, b: dict, steps) -> None:
  """The same losses to float32 rounding (the processes assemble a batch's rows in another
  order, so sums run in another order)."""
  for s in steps:
    assert abs(a[s] - b[s]) <= 1e-5 * abs(b[s]), (s, a[s], b[s])


@pytest.mark.slow
def test_resume_exactly_on_the_same_and_another_number_of_processes(tmp_path):
  run_processes(tmp_path / 'two')
  two = losses(tmp_path / 'two')
  # The data position is one small JSON item, the same for every process.
  state = json.loads(
    (tmp_path / 'two' / 'checkpoints' / '4' / 'data_state' / 'metadata').read_text()
  )
  assert state == {'global_next_index': 4 * 8}

  # Two processes resume two processes' checkpoint bitwise.
  shutil.copytree(tmp_path / 'two' / 'checkpoints' / '4', tmp_path / 'b' / 'checkpoints' / '4')
  assert 'at step 4' in run_processes(tmp_path / 'b')[0]
  resumed = losses(tmp_path / 'b')
  assert {s: resumed[s] for s in range(5, 9)} == {s: two[s] for s in range(5, 9)}

  # One process with 8 devices computes the same thing, ...
  run_single(tmp_path / 'one')
  one = losses(tmp_path / 'one')
  close(one, two, range(1, 9))
  # ... resumes the two processes' checkpoint (2 -> 1), ...
  shutil.copytree(tmp_path / 'two' / 'checkpoints' / '4', tmp_path / 'c' / 'checkpoints' / '4')
  assert 'at step 4' in run_single(tmp_path / 'c')
  close(losses(tmp_path / 'c'), one, range(5, 9))
  # ... and two processes resume its checkpoint (1 -> 2).
  shutil.copytree(tmp_path / 'one' / 'checkpoints' / '4', tmp_path / 'd' / 'checkpoints' / '4')
  assert 'at step 4' in run_processes(tmp_path / 'd')[0]
  close(losses(tmp_path / 'd'), two, range(5, 9))


PREEMPTED = """
import os, signal, sys, time
import jax
process, port, sig = int(sys.argv[1]), sys.argv[2], getattr(signal, sys.argv[3])
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process)
from fm import checkpoint
preemption = checkpoint.Preemption()
if process == 1:
  os.kill(os.getpid(), sig)  # This host's notice alone.
stopped = None
for step in range(1, 121):
  time.sleep(0.1)
  if preemption.reached(step):
    stopped = step
    break
preemption.restore_handlers()
print('stopped at', stopped, preemption.signal, flush=True)
"""


@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGINT'])
def test_a_notice_to_one_host_stops_every_host_at_the_same_step(sig, tmp_path):
  """SIGTERM or SIGINT to one process: both stop at the same step (one stopping alone would
  leave the other in the next step's collectives)."""
  import socket

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  script = tmp_path / 'preempted.py'
  script.write_text(PREEMPTED)
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(i), str(port), sig],
      cwd=ROOT,
      env={**os.environ, 'PYTHONPATH': str(ROOT)},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
  stops = [out.split('stopped at ')[1].split()[0] for out, _ in outs]
  assert stops[0] == stops[1] != 'None', outs
