"""Tests run on 8 fake CPU devices; the flag must be set before jax is imported."""

import os
import shutil
import tempfile

# The 8 devices are threads on a few cores: on a busy machine one can reach a collective long
# after the others, so XLA's 40 s rendezvous deadline (which aborts the process) is raised.
# Tests compile hundreds of small programs and run each a few steps: XLA's CPU backend without
# its LLVM optimisations compiles them 2-3x faster (the default set's wall time is mostly
# compilation), and their results are checked the same way; runs keep the default level.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  ' --xla_cpu_collective_call_terminate_timeout_seconds=900'
  ' --xla_cpu_collective_timeout_seconds=1800'
  ' --xla_backend_optimization_level=0'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# XLA's CPU client sizes its thread pools to max(cores, devices): 8 threads for 8 devices on a
# 2-core machine. A device's program can hold two of them at once (one blocked in a collective),
# and a run then waited forever with 7 devices in an all-reduce and the 8th device's work queued
# behind the blocked threads. Twice the devices leaves room (fm.main.cpu_threads does the same).
os.environ.setdefault('PJRT_NPROC', '16')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
# Implicit broadcasting between arrays of different ranks is an error, not a silent reshape.
jax.config.update('jax_numpy_rank_promotion', 'raise')


# Many tests compile the same smoke-sized programs, in this process, in subprocesses and in the
# pytest-xdist workers: one persistent compilation cache for them all, made by the process
# that starts the session (the workers, started after it is configured, and subprocesses
# inherit its environment) and removed when the session ends (unless the caller gave one).
_own_cache = []


def pytest_configure(config):
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _own_cache.append(tempfile.mkdtemp(prefix='fm-jax-cache-'))
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _own_cache[0]
    jax.config.update('jax_compilation_cache_dir', _own_cache[0])


def pytest_unconfigure(config):
  for cache in _own_cache:
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope='session')
def shakespeare_data():
  """The real Shakespeare corpus with its SentencePiece tokenizer (downloaded and cached once)."""
  from workdirs import smoke_config

  from fm.data import pipeline

  return pipeline.prepare(smoke_config('lm_shakespeare').data)
