"""Entry point: python -m fm.main --config experiments/X.py[:variant] --workdir DIR [--config.a.b=v]."""
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fm import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment file, optionally with :variant.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints and the resolved config.')
flags.mark_flags_as_required(['config', 'workdir'])


def prepare_workdir(path: str) -> pathlib.Path:
  """Creates the workdir and proves it is writable, before anything expensive happens."""
  workdir = pathlib.Path(path).expanduser()
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.write-probe-{os.getpid()}'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'--workdir={path} is not writable ({e.strerror}); choose a directory '
                      f'you can write to.') from None
  return workdir


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from fm import train  # Imported here so flag errors do not pay for importing jax.
  try:
    workdir = prepare_workdir(FLAGS.workdir)
    train.train_and_evaluate(FLAGS.config, str(workdir))
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
