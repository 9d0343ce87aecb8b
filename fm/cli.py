"""Command-line parsing shared by fm.main and fm.plan: every mistake in `--config` or its
overrides is one line on stderr and exit status 2, before anything runs or is created."""

import pathlib
import sys

from absl import flags

from fm import ConfigError, configs


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing of flags.FLAGS; a missing experiment file, an unknown variant and a bad
  `--config.*` override are reported in one line instead of a traceback."""
  spec = _config_spec(argv)
  if spec is not None and not pathlib.Path(spec.partition(':')[0]).expanduser().is_file():
    _fail(
      f'--config={spec}: no such experiment file; give a path like '
      f'experiments/lm_shakespeare.py (optionally with :smoke).'
    )
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if 'Error whilst parsing config file' in message:  # get_config raised: its last line.
      _fail(f'--config={spec}: {message.strip().splitlines()[-1].partition(": ")[2]}')
    _fail(message)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(_override_error(argv, spec, e))


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
    config = configs.load(spec, '--config') if spec else None
  except ConfigError:
    config = None
  for arg in overrides if config is not None else ():
    try:
      configs.find(config, arg[len('--config.') :].partition('=')[0])
    except ConfigError as e:
      return f'{arg}: {e} Only keys that the experiment file sets can be overridden.'
  detail = ' '.join(str(error).encode().decode('unicode_escape').replace("'", '').split())
  return (
    f'a --config override does not fit the experiment config ({detail}); check the value types '
    f'in: {" ".join(overrides)}'
  )


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)
