"""Runs: the entry every config goes through, and the runs a config depends on.

`run(config, workdir)` resolves the config (fm/configs.py) and checks it, then trains or finds
the runs it depends on (a fine-tuning run's backbone, `config.pretrained`; an objective's frozen
models such as a distillation teacher, `config.objective_args.<name>`), and hands it to
pretraining (fm/train.py) or, with a `task`, to adaptation (fm/finetune.py). Neither trainer
imports the other or this module.

A run spec (`pretrained`, `objective_args.teacher`) names a run in one of three ways:
  hf          a Hugging Face model directory, imported into WORKDIR/<name> once (fm/convert)
              and reused while it comes from the same directory. Takes precedence.
  workdir     a run's workdir (or one of its checkpoints), used as it is: its newest checkpoint
              is read, and nothing is ever trained or written there. Before `experiment`.
  experiment  an experiment file, with `overrides` ('key=value ...') applied to its config,
              trained into this run's WORKDIR/<name> (pretrained, teacher) unless it is finished
              there: a later command resumes or reuses it.
"""

import dataclasses
import json
import os
import pathlib
from typing import Any

import ml_collections

from fm import (
  ConfigError,
  checkpoint,
  configs,
  convert,
  finetune,
  local_directory,
  removed_if_left_empty,
  sharding,
  train,
)
from fm import metrics as metrics_lib


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
  """Trains and evaluates per `config` in `workdir`, after the runs it depends on; returns the
  final held-out metrics (and test/* ones), or {} when preempted, while training it or a
  dependency (rerunning the same command resumes it). Every config check runs before anything is written."""
  config = configs.resolve(config)
  workdir = local_directory(workdir, 'workdir', '--workdir /mnt/bucket/run')
  _check_own_workdir(workdir, config)
  with removed_if_left_empty(workdir):  # A run refused after _prepare leaves no empty workdir.
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, float]:
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  shape, batch_ways = dict(mesh.shape), sharding.batch_divisor(mesh, rules)
  if configs.is_finetuning(config):
    backbone = dependency(config.pretrained, 'config.pretrained', workdir / 'pretrained')
    finetune.validate(config, shape, batch_ways, backbone.config)
    _prepare(workdir)
    ckpt = None
    if config.finetune.init == 'pretrained':
      ckpt = obtain(backbone)
      if ckpt is None:
        return {}
    return finetune.train_and_evaluate(config, workdir, finetune.Backbone(backbone.config, ckpt))
  objective = train.validate(config, shape, batch_ways)
  frozen = {
    name: dependency(config.objective_args[name], f'config.objective_args.{name}', workdir / name)
    for name in objective.FROZEN
  }
  _prepare(workdir)
  ckpts = {name: obtain(spec) for name, spec in frozen.items()}
  if None in ckpts.values():
    return {}
  return train.train_and_evaluate(config, workdir, ckpts)


def _prepare(workdir: pathlib.Path) -> None:
  """Creates the workdir and proves it is writable, before anything expensive happens."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.write-probe-{os.getpid()}'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise ConfigError(
      f'workdir {workdir} is not writable ({e.strerror}); choose a directory you can write to.'
    ) from None


# =============================================================================================
# Runs a config depends on
# =============================================================================================
@dataclasses.dataclass(frozen=True)
class Dependency:
  """A run that another needs, as its spec names it (see the module docstring)."""

  key: str  # Where the spec sits: 'config.pretrained', 'config.objective_args.teacher'.
  config: ml_collections.ConfigDict  # The run's resolved config.
  workdir: pathlib.Path
  experiment: str  # The experiment that trains it; '' for a workdir used as it is.
  ckpt: pathlib.Path | None  # Its checkpoint, when given by a workdir.
  hf: str = ''  # A Hugging Face model directory imported into `workdir`.


def dependency(spec: ml_collections.ConfigDict, key: str, default_workdir: pathlib.Path):
  """The run a spec names, checked without training anything."""
  if spec.hf:
    config = convert.run_config(spec.hf, f'{key}.hf')
    return Dependency(key, config, default_workdir, '', None, spec.hf)
  if spec.workdir:
    ckpt = checkpoint.resolve(spec.workdir, f'{key}.workdir')
    meta = checkpoint.read_meta(ckpt)
    held, source = meta.get('config'), (meta.get('source') or {}).get('hf')
    if not held and source:
      raise ConfigError(
        f'{key}.workdir={spec.workdir!r}: {ckpt} is a Hugging Face model imported by fm.convert, '
        f'which carries no run config; give {key}.hf={source!r} (the directory it came from) '
        f'instead of {key}.workdir.'
      )
    if not held:
      raise ConfigError(
        f'{key}.workdir={spec.workdir!r}: {ckpt} carries no run config (not an fm '
        f'checkpoint); point it at the workdir of an fm pretraining run.'
      )
    if held.get('task'):
      raise ConfigError(
        f'{key}.workdir={spec.workdir!r} holds a fine-tuning run (task {held["task"]!r}), not '
        f'a pretraining run; point it at a pretraining workdir (a fine-tuning run keeps its '
        f'backbone in WORKDIR/pretrained).'
      )
    return Dependency(key, configs.resolve(held), pathlib.Path(spec.workdir), '', ckpt)
  if not spec.experiment:
    raise ConfigError(
      f'{key} needs a Hugging Face model directory (.hf=DIR), a workdir of a finished run '
      f'(.workdir=PATH) or an experiment that trains one (.experiment=experiments/lm_shakespeare.py).'
    )
  config = configs.load(spec.experiment, f'{key}.experiment')
  configs.apply_overrides(config, spec.overrides, f'{key}.overrides')
  config = configs.resolve(config)
  if configs.is_finetuning(config):
    raise ConfigError(
      f'{key}.experiment={spec.experiment!r} is a fine-tuning experiment; name a pretraining '
      f'one, such as experiments/lm_shakespeare.py.'
    )
  _check_same_run(default_workdir, config, spec.experiment, key)
  return Dependency(key, config, default_workdir, spec.experiment, None)


def obtain(dependency: Dependency) -> pathlib.Path | None:
  """The dependency's checkpoint, training it first (or resuming it) when its experiment has
  not reached its final step in its workdir; None when that training was preempted."""
  if dependency.ckpt is not None:
    return dependency.ckpt
  if dependency.hf:
    return convert.imported(dependency.hf, dependency.workdir, dependency.key)
  steps = dependency.config.train.steps
  if checkpoint.latest_step(dependency.workdir) < steps:
    metrics_lib.log(
      f'{dependency.key}: training {dependency.experiment} in {dependency.workdir} first'
    )
    run(dependency.config, dependency.workdir)
    if checkpoint.latest_step(dependency.workdir) < steps:
      metrics_lib.log(f'stopped while training {dependency.key}; rerun the same command to resume.')
      return None
  return checkpoint.resolve(dependency.workdir, f'{dependency.key}.workdir')


# What makes a workdir's run the one a config trains: resuming may change anything else (the
# mesh, data.workers, remat, more steps).
IDENTITY = (
  'task',
  'objective',
  'model.name',
  'model.variant',
  'data.dataset',
  'data.tokenizer',
  'data.seq_len',
  'data.train',
  'data.validation',
  'data.path',
  'data.mixture',
)


def config_differences(workdir: pathlib.Path, config, keys) -> list[tuple[str, Any, Any]]:
  """(key, the workdir's value, `config`'s value) for each dotted key at which the run config
  in WORKDIR/config.json differs from `config`; [] when there is none yet (or it is unreadable:
  the checkpoints' own checks speak for them). A key the recorded config lacks (written before
  fm had it) is not compared."""
  try:
    held = json.loads((workdir / 'config.json').read_text()).get('config', {})
  except (OSError, ValueError, AttributeError):
    return []
  try:
    held = train.as_json(configs.resolve(held).to_dict())  # With the defaults it left out.
  except ConfigError:
    pass  # Compared as it is.
  missing = object()

  def at(tree, dotted):
    for name in dotted.split('.'):
      tree = tree.get(name, missing) if isinstance(tree, dict) else missing
    return tree

  wanted = train.as_json(config.to_dict())
  return [
    (k, at(held, k), at(wanted, k))
    for k in keys
    if at(held, k) is not missing and at(held, k) != at(wanted, k)
  ]


def _check_own_workdir(workdir: pathlib.Path, config) -> None:
  """Refuses a workdir whose config.json is another run's (another task, objective, model or
  data), before anything is written: resuming there would restore, or refuse, that run's
  checkpoints as this one's."""
  differing = config_differences(workdir, config, IDENTITY)
  if differing:
    (first, held, wanted), *_ = differing
    raise ConfigError(
      f'workdir {workdir} holds another run (its config.json has {first}={held!r}, this config '
      f'{wanted!r}; it differs in {", ".join(k for k, _, _ in differing)}); give another '
      f'--workdir, or move {workdir} away to start this run there.'
    )


def _check_same_run(workdir: pathlib.Path, config, experiment: str, key: str) -> None:
  """Refuses a default workdir that holds another run than `experiment` would train (a
  fine-tuning run, another model, dataset, optimiser, seed, length or batch), so its checkpoints
  are never taken for broken ones, trained further or reused as a shorter run's."""
  sections = (
    'task',
    'objective',
    'model',
    'data',
    'optim',
    'seed',
    'train.steps',
    'train.global_batch',
  )
  differing = [k for k, _, _ in config_differences(workdir, config, sections)]
  if differing:
    raise ConfigError(
      f'{key}: {workdir} holds another run than {experiment} trains (its config differs in '
      f'{", ".join(differing)}); move it away, or point {key}.workdir at it to use it as it is.'
    )
