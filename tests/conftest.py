"""Tests run on 8 fake CPU devices; the flag must be set before jax is imported."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='session')
def shakespeare_data():
  """The real Shakespeare corpus with its SentencePiece tokenizer (downloaded and cached once)."""
  import ml_collections
  from fm.data import pipeline
  return pipeline.prepare(ml_collections.ConfigDict(dict(
      dataset='shakespeare', tokenizer=dict(kind='sentencepiece', vocab_size=4096))))


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: a longer check (minutes); deselect with -m "not slow"')
