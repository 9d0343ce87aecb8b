"""fm's training step against MaxText's on the same model, alternating in one run.

  python experiments/maxtext_compare.py --workdir /tmp/maxtext_compare
  python experiments/maxtext_compare.py --workdir /tmp/maxtext_compare --rounds 3 --steps 15

Installs MaxText from PyPI (maxtext[tpu]==0.2.5, which runs on the CPU too; it needs Python
3.12: --python, else the newest ~/.pyenv/versions/3.12* or python3.12 on PATH) into its own
virtual environment (--venv, default ~/.cache/fm/maxtext-venv; created once), never into fm's.
Then, `--rounds` times in turn: MaxText's trainer with its defaults, MaxText with its best
settings here (remat_policy=minimal_with_context scan_layers=false), and fm.bench, all on the
shape fm.bench calls llama-6x512 (6 layers, d_model 512, 8 heads of 64, SwiGLU MLP 2048,
vocabulary 32768 untied, sequences of 256, global batch 8, float32, AdamW with gradient
clipping, synthetic tokens). Each run's tokens/s is the median over its steps after the first
`--skip` (compilation and MaxText's asynchronous first steps). Prints a table of every run and
the ratios of the medians; writes WORKDIR/maxtext_compare.json and the logs.
"""

import argparse
import glob
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAXTEXT = 'maxtext[tpu]==0.2.5'
SEQ_LEN, BATCH = 256, 8
MODEL = (
  'base_num_decoder_layers=6 base_emb_dim=512 base_num_query_heads=8 base_num_kv_heads=8 '
  'head_dim=64 base_mlp_dim=2048 vocab_size=32768 logits_via_embedding=false'
).split()
SETTINGS = {
  'maxtext_defaults': [],
  'maxtext_tuned': ['remat_policy=minimal_with_context', 'scan_layers=false'],
}
STEP = re.compile(r'completed step: (\d+), seconds: ([0-9.]+)')


def environment(**extra) -> dict[str, str]:
  """This process's environment on one CPU device (no fake devices), plus `extra`."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'PYTHONPATH')}
  return {**env, 'JAX_PLATFORMS': 'cpu', **extra}


def python312(given: str) -> str:
  if given:
    return given
  found = sorted(glob.glob(str(pathlib.Path('~/.pyenv/versions/3.12*/bin/python').expanduser())))
  if found:
    return found[-1]
  if shutil.which('python3.12'):
    return shutil.which('python3.12')
  sys.exit('error: MaxText needs Python 3.12; install it (pyenv install 3.12) or pass --python.')


def ensure_venv(venv: pathlib.Path, python: str) -> pathlib.Path:
  """The venv's python, with MaxText installed (once)."""
  py = venv / 'bin' / 'python'
  check = [str(py), '-c', 'import maxtext']
  if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
    return py
  print(f'installing {MAXTEXT} into {venv} (once; a few minutes)', flush=True)
  subprocess.run([python, '-m', 'venv', str(venv)], check=True)
  subprocess.run([str(py), '-m', 'pip', 'install', '--quiet', MAXTEXT], check=True)
  return py


def run_maxtext(py: pathlib.Path, name: str, extra: list[str], steps: int, log: pathlib.Path):
  """Seconds of each MaxText step, from its log."""
  package = subprocess.run(
    [str(py), '-c', 'import maxtext, os; print(os.path.dirname(maxtext.__file__))'],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  command = [
    str(py),
    '-m',
    'maxtext.trainers.pre_train.train',
    f'{package}/configs/base.yml',
    f'run_name={name}',
    f'base_output_directory={log.parent / "maxtext_out"}',
    'hardware=cpu',
    'skip_jax_distributed_system=true',
    'dataset_type=synthetic',
    'enable_checkpointing=false',
    f'steps={steps}',
    f'per_device_batch_size={BATCH}',
    f'max_target_length={SEQ_LEN}',
    'dtype=float32',
    'weight_dtype=float32',
    *MODEL,
    *extra,
  ]
  with open(log, 'w') as f:
    result = subprocess.run(
      command, stdout=f, stderr=subprocess.STDOUT, env=environment(), cwd=log.parent
    )
  if result.returncode:
    sys.exit(f'error: MaxText failed (exit {result.returncode}); see {log}')
  return [(int(k), float(s)) for k, s in STEP.findall(log.read_text())]


def run_fm(steps: int, log: pathlib.Path) -> list[tuple[int, float]]:
  """Seconds of each fm.bench step (after its warm-up step)."""
  out = log.with_suffix('.json')
  command = [
    sys.executable,
    '-m',
    'fm.bench',
    '--shape',
    'llama-6x512',
    '--steps',
    str(steps - 1),
    '--warmup',
    '1',
    '--pipeline_batches',
    '0',
    '--json',
    str(out),
  ]
  with open(log, 'w') as f:
    result = subprocess.run(
      command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=environment()
    )
  if result.returncode:
    sys.exit(f'error: fm.bench failed (exit {result.returncode}); see {log}')
  times = json.loads(out.read_text())['step_times_s']
  return [(i + 1, t) for i, t in enumerate(times)]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--steps', type=int, default=12, help='steps per run')
  parser.add_argument('--skip', type=int, default=3, help='first steps left out of the median')
  parser.add_argument('--python', default='', help='a Python 3.12 for MaxText')
  parser.add_argument('--venv', default='~/.cache/fm/maxtext-venv')
  args = parser.parse_args()
  if args.steps <= args.skip + 1:
    parser.error('--steps must exceed --skip + 1.')
  workdir = pathlib.Path(args.workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  py = ensure_venv(pathlib.Path(args.venv).expanduser(), python312(args.python))
  runs = {name: [] for name in (*SETTINGS, 'fm')}
  for round_ in range(args.rounds):
    for name in runs:
      log = workdir / f'{name}-{round_}.log'
      if name == 'fm':
        steps = run_fm(args.steps, log)
      else:
        steps = run_maxtext(py, f'{name}-{round_}', SETTINGS[name], args.steps, log)
      times = [s for k, s in steps if k >= args.skip]
      tokens = BATCH * SEQ_LEN / statistics.median(times)
      runs[name].append(tokens)
      print(f'round {round_ + 1} {name}: {tokens:,.0f} tokens/s', flush=True)
  medians = {name: statistics.median(v) for name, v in runs.items()}
  print('\n| run | tokens/s per round | median |\n|---|---|---|')
  for name, values in runs.items():
    print(f'| {name} | {" / ".join(f"{v:,.0f}" for v in values)} | {medians[name]:,.0f} |')
  ratios = {f'fm / {name}': medians['fm'] / medians[name] for name in SETTINGS}
  for key, value in ratios.items():
    print(f'{key}: {value:.2f}x')
  result = {'tokens_per_s': runs, 'median': medians, 'ratios': ratios, 'maxtext': MAXTEXT}
  (workdir / 'maxtext_compare.json').write_text(json.dumps(result, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
