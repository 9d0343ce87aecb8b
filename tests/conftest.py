"""Tests run on 8 fake CPU devices; the flag must be set before jax is imported."""

import os
import tempfile

# The 8 devices are threads on a few cores: on a busy machine one can reach a collective long
# after the others, so XLA's 40 s rendezvous deadline (which aborts the process) is raised.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  ' --xla_cpu_collective_call_terminate_timeout_seconds=900'
  ' --xla_cpu_collective_timeout_seconds=1800'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests compile the same smoke-sized programs, in this process and in subprocesses: share a
# persistent compilation cache for the session.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='fm-jax-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='session')
def shakespeare_data():
  """The real Shakespeare corpus with its SentencePiece tokenizer (downloaded and cached once)."""
  import ml_collections

  from fm.data import pipeline

  return pipeline.prepare(
    ml_collections.ConfigDict(
      dict(dataset='shakespeare', tokenizer=dict(kind='sentencepiece', vocab_size=4096))
    )
  )


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: a longer check (minutes); deselect with -m "not slow"')
