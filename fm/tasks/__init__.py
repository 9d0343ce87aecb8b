"""Downstream tasks: one module per task, chosen by `config.task`.

This file is the contract of a task module, checked when `fm.registry.get('tasks', name)` looks
one up. A task owns its data (`load`) and names its KIND, a module `fm/tasks/_<KIND>.py`
(`classification`, `seq2seq`, `image`) that encodes its examples, gives its head, loss and metrics, and
adds the names a task of that kind must define (the kind's own Protocol, e.g. LABELS) with the
defaults of its optional ones. Adding a task is one file here plus one experiment file.
"""

import importlib
from types import ModuleType
from typing import Any, Protocol

from fm import ConfigError

KINDS = ('classification', 'seq2seq', 'image')


class Task(Protocol):
  """What every task module provides (a module satisfies it structurally)."""

  # The kind of task: a module fm/tasks/_<KIND>.py (one of KINDS).
  KIND: str
  # `config.finetune.mode` values it accepts. Optional (default: its kind's).
  MODES: tuple[str, ...]

  def load(self, seed: int = 0) -> dict[str, list]:
    """{'train', 'validation', 'test'}: lists of examples (for the kind: (text, label index) or
    (source, target) pairs), from a pinned registry package; `seed` fixes the split."""


class Kind(Protocol):
  """What a kind module (fm/tasks/_<kind>.py) provides to fm/finetune.py, which calls nothing
  else of a task. `family` is the backbone's model module (fm/models/__init__.py)."""

  # The Protocol its tasks satisfy (extending Task) and the defaults of their optional names.
  TaskContract: type
  TASK_DEFAULTS: dict[str, Any]
  # Required config.data keys of its runs; config.task_args and config.finetune keys of the
  # kind, with their defaults (fm/configs.py adds them to the shared ones).
  DATA_KEYS: tuple[str, ...]
  ARGS: dict[str, Any]
  FINETUNE: dict[str, Any]

  def row_length(self, config) -> int:
    """Tokens per row (for the model's max_len and FLOPs; 0: the model's own length)."""

  def load(self, task, config) -> dict[str, list]:
    """The task's examples per split, from `task.load` (with the config's seed, dataset)."""

  def transform(self, task, config):
    """A host-side transform of training rows (augmentation; fm/data/pipeline.py), or None."""

  def validate(self, task, config) -> None:
    """Checks that need neither data nor the backbone; raise ConfigError."""

  def check_backbone(self, task, config, family_name: str, family) -> None:
    """Checks that the backbone's family can serve the task in the configured mode."""

  def trains(self, config) -> bool:
    """Whether the configured mode trains at all (zero-shot scoring does not)."""

  def model_fields(self, task, config, family) -> dict[str, Any]:
    """Fields of the backbone's Config that put the task's head on it."""

  def encode_splits(self, task, named: dict[str, list], tokenizer, config, family) -> dict:
    """{'train', 'validation', 'test'}: examples -> rows of numpy arrays (one per example)."""

  def make_loss(self, task, config, family, model_cfg) -> Any:
    """(apply_fn, params, batch, rng) -> (mean loss, summable metrics) of a batch of rows."""

  def summarize(self, sums: dict) -> dict[str, float]:
    """Summed metric parts -> metrics."""

  def generation(self, task, config, tokenizer, family, model_cfg, examples, mesh, rules, workdir):
    """params -> metrics of generated text on test `examples`, or None."""


PRIVATE = ()


def kind_of(task: Any) -> ModuleType:
  """The module of a task's kind: what encodes, trains and scores it."""
  return importlib.import_module(f'fm.tasks._{task.KIND}')


def contract(module) -> tuple[type, dict[str, Any]]:
  """(the Protocol, the defaults of its optional names) of a task module: its kind's."""
  kind = vars(module).get('KIND')
  if kind not in KINDS:
    raise ConfigError(
      f'{module.__name__}.KIND={kind!r} is not a kind of task; set it to one of: '
      f'{", ".join(KINDS)} (a module fm/tasks/_<KIND>.py).'
    )
  kind_module = kind_of(module)
  return kind_module.TaskContract, kind_module.TASK_DEFAULTS
