"""Entry point: python -m fm.main --config experiments/X.py[:variant] --workdir DIR [--config.a.b=v]."""

import os
import re
import sys

from absl import app, flags, logging

from fm import ConfigError
from fm.cli import define_config, parse_flags

FLAGS = flags.FLAGS
define_config()
flags.declare_key_flag('config')  # Listed by --help with this command's own flags.
flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints and the resolved config.')
flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0, for multi-process runs '
  'outside TPU VMs and SLURM (where they are detected from the environment).',
)
flags.DEFINE_integer('num_processes', None, 'Number of JAX processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process (with --coordinator_address).')
flags.mark_flags_as_required(['config', 'workdir'])


def cluster() -> str | None:
  """The multi-host environment JAX can configure itself from, if this process runs in one: a
  SLURM step with several tasks, or a TPU slice with several workers."""
  if int(os.environ.get('SLURM_STEP_NUM_TASKS', '1')) > 1:  # Inside srun, not the batch script.
    return 'slurm'
  if len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return 'tpu'
  return None


def cpu_threads() -> None:
  """With N fake CPU devices (--xla_force_host_platform_device_count=N), XLA's CPU client gives
  its thread pools max(cores, N) threads; a program of each device can hold two at once (one
  blocked in a collective), and with exactly N a run was seen to wait forever in an all-reduce.
  Ask for 2N (PJRT_NPROC), unless it is set already. Call before jax starts."""
  found = re.search(
    r'--xla_force_host_platform_device_count=(\d+)', os.environ.get('XLA_FLAGS', '')
  )
  if found:
    os.environ.setdefault('PJRT_NPROC', str(2 * int(found.group(1))))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax

  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif cluster():
    jax.distributed.initialize()  # Coordinator, process count and id from the environment.
  from fm import runs

  try:
    runs.run(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  cpu_threads()  # Before parse_flags, whose config check imports jax.
  app.run(main, flags_parser=parse_flags)
