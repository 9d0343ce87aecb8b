"""Every objective module (discovered with pkgutil) honours the interface and gives finite grads."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fm import registry, train
from fm.objectives import causal_lm

OBJECTIVES = registry.choices('objectives')


def tiny_batch(vocab=384, B=4, L=32):
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, vocab, (B, L)).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  seg[:, 20:] = 2
  seg[:, 28:] = 0  # Padding.
  pos = np.concatenate([np.arange(20), np.arange(8), np.zeros(4, int)])[None].repeat(B, 0)
  return {'tokens': jnp.asarray(tokens), 'segment_ids': jnp.asarray(seg),
          'positions': jnp.asarray(pos, jnp.int32), 'token_bytes': jnp.full((B, L), 2, jnp.int32)}


@pytest.mark.parametrize('name', OBJECTIVES)
def test_interface_and_finite_gradients(name):
  objective = registry.get('objectives', name)
  assert callable(objective.loss_fn) and callable(objective.summarize)
  for model_name in objective.COMPATIBLE_MODELS:
    config = ml_collections.ConfigDict(dict(model=dict(name=model_name, variant='tiny'),
                                            objective=name))
    module, cfg = train.model_config(config, vocab_size=384)
    model = module.Model(cfg)
    batch = tiny_batch()
    params = nn.unbox(model.init(jax.random.key(0), batch['tokens']))
    (loss, aux), grads = jax.value_and_grad(objective.loss_fn, argnums=1, has_aux=True)(
        model.apply, params, batch, jax.random.key(1), config)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    summary = objective.summarize(jax.tree.map(float, aux))
    assert np.isclose(summary['loss'], loss, rtol=1e-5)


def test_causal_lm_weights_skip_boundaries_and_padding():
  _, weights = causal_lm.targets_and_weights(tiny_batch())
  w = np.asarray(weights[0])
  assert w[:19].all() and not w[19]        # Last token of doc 1 does not predict doc 2.
  assert w[20:27].all() and not w[27]      # Last token of doc 2 does not predict padding.
  assert not w[28:].any()                  # Padding is never a target.


def test_bits_per_byte_of_uniform_model():
  """Uniform logits cost ln(V) nats per token; with 2 bytes per token that is log2(V)/2 bits/byte."""
  V = 256
  batch = tiny_batch(vocab=V)
  apply_fn = lambda params, tokens, seg, pos: jnp.zeros((*tokens.shape, V))
  _, aux = causal_lm.loss_fn(apply_fn, None, batch, None, None)
  summary = causal_lm.summarize(jax.tree.map(float, aux))
  assert math.isclose(summary['loss'], math.log(V), rel_tol=1e-6)
  assert math.isclose(summary['bits_per_byte'], math.log2(V) / 2, rel_tol=1e-6)
