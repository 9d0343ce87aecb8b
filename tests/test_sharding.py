"""Sharding changes nothing: same init and batch give the same loss and params on every mesh."""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from workdirs import smoke_config

from fm import ConfigError, optim, sharding, train
from fm.models import decoder
from fm.objectives import causal_lm

# 8 heads and an MLP of 128 split evenly over tensor=8; 4 kv heads do not, and stay replicated.
CFG = decoder.Config(
  vocab_size=384,
  num_layers=2,
  d_model=64,
  num_heads=8,
  num_kv_heads=4,
  head_dim=8,
  mlp_dim=128,
  max_len=64,
)
B, L = 16, 32


def config():
  # Adam's first update is g / (|g| + eps): with a tiny eps it turns float rounding in a
  # near-zero gradient into a full-size step, so eps is raised to keep the comparison meaningful.
  return smoke_config(
    optim=dict(lr=1e-3, warmup_steps=0, weight_decay=0.1, clip_norm=1.0, eps=1e-4)
  )


def batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CFG.vocab_size, (B, L)).astype(np.int32)
  seg = np.repeat(np.array([[1] * 20 + [2] * 12]), B, 0).astype(np.int32)
  pos = np.repeat(np.array([list(range(20)) + list(range(12))]), B, 0).astype(np.int32)
  return {
    'tokens': tokens,
    'segment_ids': seg,
    'positions': pos,
    'token_bytes': np.full((B, L), 3, np.int32),
  }


def build(mesh, rules):
  """The test decoder's train program on `mesh` (call inside sharding.use) and its first state."""
  model, tx = decoder.Model(CFG), optim.make(config().optim, total_steps=10)
  sample = train.sample_inputs(decoder, CFG, B, L)
  loss_fn = functools.partial(causal_lm.loss_fn, args=None)
  program = train.build(model, tx, loss_fn, config(), mesh, rules, sample)
  return program, program.init(jax.random.key(0))


def mesh_config(name: str) -> dict[str, int]:
  """'data=2,tensor=4' -> the mesh config, unnamed axes 1."""
  return {'data': 1, 'fsdp': 1, 'tensor': 1} | {
    k: int(v) for k, v in (kv.split('=') for kv in name.split(','))
  }


def one_step(mesh_cfg: dict, devices):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_cfg), devices)
  rules = sharding.DEFAULT_RULES
  with sharding.use(mesh, rules):
    program, state = build(mesh, rules)
    init_params = jax.device_get(state['params'])
    state, metrics = program.train_step(
      state, sharding.put_batch(batch(), mesh, rules), jax.random.key(1)
    )
  return init_params, state, jax.device_get(metrics)


@pytest.fixture(scope='module')
def reference():
  init_params, state, metrics = one_step(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  return init_params, jax.device_get(state['params']), metrics


def shard_shape(x):
  return x.sharding.shard_shape(x.shape)


# Per-device shapes of: query kernel (D, H, K), key kernel (D, G, K), MLP up (D, F), embedding (V, D).
EXPECTED_SHARDS = {
  'data=8': ((64, 8, 8), (64, 4, 8), (64, 128), (384, 64)),
  'fsdp=8': ((8, 8, 8), (8, 4, 8), (8, 128), (384, 8)),
  'tensor=8': ((64, 1, 8), (64, 4, 8), (64, 16), (48, 64)),
  'data=2,fsdp=2,tensor=2': ((32, 4, 8), (32, 2, 8), (32, 64), (192, 32)),
  # The sequence axis splits activations along their length; weights are as with data=2,tensor=2.
  'data=2,sequence=2,tensor=2': ((64, 4, 8), (64, 2, 8), (64, 64), (192, 64)),
}


# The fsdp and combined meshes in the slow set (25-30 s each on a 2-core AVX2 machine); CI runs
# them.
@pytest.mark.parametrize(
  'mesh_name',
  [
    m if m in ('data=8', 'tensor=8') else pytest.param(m, marks=pytest.mark.slow)
    for m in EXPECTED_SHARDS
  ],
)
def test_sharded_step_equals_single_device(mesh_name, reference):
  init_params, state, metrics = one_step(mesh_config(mesh_name), jax.devices())
  ref_init, ref_params, ref_metrics = reference

  p = state['params']['params']
  layer = p['layer_0']
  got = (
    shard_shape(layer['attn']['query']),
    shard_shape(layer['attn']['key']),
    shard_shape(layer['mlp']['up']),
    shard_shape(p['embed']['embedding']),
  )
  assert got == EXPECTED_SHARDS[mesh_name]
  # Optimizer moments are sharded like their params; scalar counts are replicated on the mesh.
  mu = state['opt_state'][1][0].mu['params']['layer_0']['attn']['query']
  assert mu.sharding == layer['attn']['query'].sharding
  for leaf in jax.tree.leaves(state['opt_state']):
    assert isinstance(leaf.sharding, jax.sharding.NamedSharding)
    assert len(leaf.sharding.device_set) == 8

  jax.tree.map(np.testing.assert_array_equal, init_params, ref_init)
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    jax.device_get(state['params']),
    ref_params,
  )


def test_mesh_errors():
  with pytest.raises(ConfigError, match='config.mesh'):
    sharding.mesh_shape(ml_collections.ConfigDict(dict(data=3, fsdp=1, tensor=1)), 8)
  with pytest.raises(ConfigError, match='at most one axis'):
    sharding.mesh_shape(ml_collections.ConfigDict(dict(data=-1, fsdp=-1, tensor=1)), 8)
  assert sharding.mesh_shape(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=2)), 8) == {
    'data': 2,
    'fsdp': 2,
    'tensor': 2,
  }


def step_collectives(mesh_cfg: dict) -> dict[str, dict]:
  """fm.plan's count and bytes of each collective in the test decoder's compiled train step."""
  from fm import plan

  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_cfg), jax.devices())
  rules = sharding.DEFAULT_RULES
  with sharding.use(mesh, rules):
    program, state = build(mesh, rules)
    on_mesh = sharding.put_batch(batch(), mesh, rules)
    hlo = program.jitted_step.lower(state, on_mesh, jax.random.key(1), {}).compile().as_text()
  return plan.collectives(hlo, mesh.size)


@pytest.mark.slow  # Two compilations of the sharded step each (~15 s).
@pytest.mark.parametrize('mesh_name', ['data=2,fsdp=2,tensor=2', 'data=2,sequence=2,tensor=2'])
def test_flattened_projections_add_no_collectives(mesh_name, monkeypatch):
  """layers.project's one 2-D matmul (batch and length merged) compiles to no more collectives
  than the contraction with its dims kept; where the mesh splits the length, merging would
  reshard the activations, so project keeps the dims there."""
  from fm.models import layers

  ours = step_collectives(mesh_config(mesh_name))
  monkeypatch.setattr(layers, 'project', lambda x, w, n_in=1: jax.numpy.tensordot(x, w, n_in))
  kept = step_collectives(mesh_config(mesh_name))
  for op, entry in ours.items():
    assert op in kept and entry['count'] <= kept[op]['count'], (ours, kept)
    assert entry['bytes'] <= kept[op]['bytes'], (ours, kept)
  assert ours  # The count sees collectives at all.
