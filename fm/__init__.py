"""fm: pretrain foundation models with a self-supervised objective, then adapt them."""

import contextlib
import pathlib


class ConfigError(ValueError):
  """A bad experiment config or command-line flag; the message names the key and the fix.

  `fm.main` prints it as one line and exits non-zero, without a traceback.
  """


def local_directory(path, key: str, example: str) -> pathlib.Path:
  """`path` as a local directory (`~` expanded); a URL is refused in one sentence naming `key`:
  fm writes and reads workdirs and prepared corpora as files on a shared mount."""
  if '://' in str(path):
    raise ConfigError(
      f'{key} {path} is a URL; fm writes and reads it as files: give a directory every host and '
      f'worker mounts (NFS, Filestore, or the bucket mounted with gcsfuse, e.g. {example}).'
    )
  return pathlib.Path(path).expanduser()


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
