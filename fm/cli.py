"""Command-line parsing shared by fm.main and fm.plan."""

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing of flags.FLAGS, with a bad `--config.*` override reported in one line instead
  of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    detail = ' '.join(str(e).encode().decode('unicode_escape').replace("'", '').split())
    overrides = ' '.join(a for a in argv if a.startswith('--config.'))
    print(
      f'error: a --config override does not fit the experiment config ({detail}); check '
      f'the key names and value types in: {overrides}',
      file=sys.stderr,
    )
    sys.exit(2)
