"""Command-line parsing shared by fm.main and fm.plan: every mistake in `--config` or its
overrides is one line on stderr and exit status 2, before anything runs or is created."""

import pathlib
import re
import sys

from absl import flags
from ml_collections import config_flags

from fm import ConfigError, configs


class _ExperimentFile(flags.ArgumentParser):
  """Loads an experiment file as ml_collections' `loader` does, with the dicts of the defaults
  table that it leaves out added (`configs.overridable`): an override may set any key of the
  table."""

  def __init__(self, loader: flags.ArgumentParser):
    self.loader = loader

  def parse(self, argument):
    return configs.overridable(self.loader.parse(argument))

  def flag_type(self):
    return self.loader.flag_type()


def define_config() -> None:
  """The `--config` flag: an experiment file, optionally with :variant, and `--config.a.b=v`
  overrides of any key of the defaults table (new keys are checked by `parse_flags`)."""
  config_flags.DEFINE_config_file(
    'config',
    None,
    'Experiment file, optionally with :variant.',
    lock_config=False,
    accept_new_attributes=True,
  )
  flags.FLAGS['config'].parser = _ExperimentFile(flags.FLAGS['config'].parser)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing of flags.FLAGS; a missing experiment file, an unknown variant and a bad
  `--config.*` override (a key no table knows, a value of the wrong type) are reported in one
  line instead of a traceback."""
  spec = _config_spec(argv)
  if spec is not None and not pathlib.Path(spec.partition(':')[0]).expanduser().is_file():
    _fail(
      f'--config={spec}: no such experiment file; give a path like '
      f'experiments/lm_shakespeare.py (optionally with :smoke).'
    )
  if spec is not None:  # Not an experiment file, or one that does not run: one line.
    try:
      configs.load(spec, '--config')
    except ConfigError as e:
      _fail(str(e))
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if 'Error whilst parsing config file' in message:  # get_config raised: its last line.
      _fail(f'--config={spec}: {message.strip().splitlines()[-1].partition(": ")[2]}')
    _fail(message)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(_override_error(argv, spec, e))
  if spec is not None:
    try:
      configs.resolve(flags.FLAGS.config)
    except ConfigError as e:  # Prefixed with the override that set the key, if one did.
      key = re.match(r'config\.[\w.]+', str(e))
      named = [a for a in argv if key and a[2:].partition('=')[0] == key.group()]
      _fail(f'{named[-1]}: {e}' if named else str(e))
  return rest


def _config_spec(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.partition('=')[2]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _override_error(argv: list[str], spec: str | None, error: Exception) -> str:
  """The sentence for the first `--config.a.b=v` whose key the experiment does not set, or
  whose value does not fit it."""
  overrides = [a for a in argv if a.startswith('--config.')]
  try:
    config = configs.overridable(configs.load(spec, '--config')) if spec else None
  except ConfigError:
    config = None
  for arg in overrides if config is not None else ():
    try:
      configs.find(config, arg[len('--config.') :].partition('=')[0], new=True)
    except ConfigError as e:
      return f'{arg}: {e}'
  detail = ' '.join(str(error).encode().decode('unicode_escape').replace("'", '').split())
  return (
    f'a --config override does not fit the experiment config ({detail}); check the value types '
    f'in: {" ".join(overrides)}'
  )


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)
