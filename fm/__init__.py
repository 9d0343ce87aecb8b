"""fm: pretrain foundation models with a self-supervised objective, then adapt them."""

import contextlib
import pathlib


class ConfigError(ValueError):
  """A bad experiment config or command-line flag; the message names the key and the fix.

  `fm.main` prints it as one line and exits non-zero, without a traceback.
  """


@contextlib.contextmanager
def removed_if_left_empty(directory: pathlib.Path):
  """Removes `directory`, when the block created it, if an error leaves it empty (a refused
  run or prepare leaves nothing behind)."""
  existed = directory.exists()
  try:
    yield
  except BaseException:
    if not existed and directory.is_dir() and not any(directory.iterdir()):
      directory.rmdir()
    raise
