"""Experiment files and what their runs leave in a workdir (shared by the end-to-end tests)."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_experiment(name: str):
  """The module experiments/<name>.py, loaded by path like `--config` does."""
  spec = importlib.util.spec_from_file_location(name, ROOT / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def train_losses(workdir) -> dict[int, float]:
  """Step -> training loss from metrics.jsonl (a line cut short by SIGKILL is skipped)."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return {}
  out = {}
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if 'train/loss' in record:
      out[record['step']] = record['train/loss']
  return out
