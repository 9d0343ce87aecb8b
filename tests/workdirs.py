"""Experiment files and what their runs leave in a workdir (shared by the end-to-end tests)."""

import importlib.util
import json
import pathlib

import ml_collections

from fm import configs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_experiment(name: str):
  """The module experiments/<name>.py, loaded by path like `--config` does."""
  spec = importlib.util.spec_from_file_location(name, ROOT / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def smoke_config(name: str = 'lm_shakespeare', **sections) -> ml_collections.ConfigDict:
  """experiments/<name>.py:smoke, resolved, with each keyword's section updated (a dict) or set."""
  config = load_experiment(name).get_config('smoke')
  for key, value in sections.items():
    if isinstance(value, dict) and key in config:
      config[key].update(value)
    else:
      config[key] = value
  return configs.resolve(config)


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
