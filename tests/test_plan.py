"""fm.plan: the real train step compiled ahead of time for a topology, and what it reports."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import pytest
from workdirs import smoke_config

from fm import ConfigError, plan

ROOT = pathlib.Path(__file__).resolve().parents[1]


def smoke(**sections):
  return smoke_config(**sections)


def test_plan_command_on_host_devices(tmp_path):
  """The command as the README gives it, on 8 host devices: a verdict, the collectives of data
  parallelism, a roofline line and the per-param sharding table."""
  command = 'python -m fm.plan --config experiments/lm_shakespeare.py:smoke --topology cpu:8'
  assert command in (ROOT / 'README.md').read_text()
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'fm.plan',
      '--config',
      'experiments/lm_shakespeare.py:smoke',
      '--topology',
      'cpu:8',
      '--json',
      str(tmp_path / 'new' / 'plan.json'),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert ': fits' in out.stdout
  assert 'roofline step time' in out.stdout
  assert 'layer_0/attn/query' in out.stdout and 'embed,heads,head_dim' in out.stdout
  p = json.loads((tmp_path / 'new' / 'plan.json').read_text())['plan']
  assert p['devices'] == 8 and p['mesh']['data'] == 8 and p['fits']
  assert p['collectives']['all-reduce']['group'] == 8  # Gradients are averaged over 8 shards.
  assert p['param_bytes'] == sum(r['bytes_per_device'] for r in p['sharding'])
  # data=8 replicates every param: each device holds them all, float32 (the family's count).
  assert p['param_bytes'] == 4 * p['params']


@pytest.mark.slow  # Compiles four plans (about 40 s); CI runs it.
def test_remat_and_accumulation_lower_compiled_memory():
  """What fm.plan reads from the compiler: rematerialisation and microbatches shrink the
  temporaries of the same step (their loss and gradients are unchanged: test_models)."""
  devices = jax.devices()[:8]
  topology = plan.parse_topology('cpu:8')
  base = dict(model={'scan_layers': True}, train={'global_batch': 64}, data={'seq_len': 128})
  temp = {}
  for name, extra in (
    ('plain', {}),
    ('remat', {'model': {'remat': 'full'}}),
    ('micro', {'train': {'microbatches': 4}}),
  ):
    sections = {k: {**v, **extra.get(k, {})} for k, v in base.items()}
    temp[name] = plan.plan(smoke(**sections), topology, devices)['temp_bytes']
  assert temp['remat'] < temp['plain'] and temp['micro'] < temp['plain'], temp


HLO = """HloModule step

%body.1 (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %ag = f32[64,16]{1,0} all-gather(f32[8,16]{1,0} %x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %ars = (f32[8,16]{1,0}, f32[8,16]{1,0}) all-reduce-start(f32[8,16]{1,0} %y), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %w = (s32[], f32[8,16]) while((s32[], f32[8,16]) %t), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"12"}}
  ROOT %rs = bf16[2,16]{1,0} reduce-scatter(bf16[8,16]{1,0} %z), replica_groups=mesh['data'=4,'fsdp'=2] {'data'}, dimensions={0}
}
"""


def test_collectives_are_counted_per_loop_trip_with_their_groups():
  ops = plan.collectives(HLO, 8)
  assert ops['all-gather'] == {'count': 12, 'bytes': 12 * 64 * 16 * 4, 'group': 8}
  assert ops['all-reduce'] == {'count': 12, 'bytes': 12 * 8 * 16 * 4, 'group': 2}
  assert ops['reduce-scatter'] == {'count': 1, 'bytes': 2 * 16 * 2, 'group': 4}
  # Ring all-reduce over 2 moves 2(n-1)/n = 1 times its bytes; a TPU v5e link is 200 GB/s.
  v5e = plan.parse_topology('v5e:2x4')
  alone = plan.comm_seconds({'all-reduce': ops['all-reduce']}, v5e)
  assert alone == pytest.approx(12 * 8 * 16 * 4 / 200e9)


@pytest.mark.parametrize(
  'name,message',
  [
    ('v9x:4x4', r"--topology='v9x:4x4' is unknown; use CHIP:SHAPE with CHIP one of v4, v5e"),
    ('v5e', r"--topology='v5e' is unknown"),
    ('h100:2x2x2', r'h100 takes GPUS or HOSTSxGPUS'),
  ],
)
def test_unknown_topology_is_one_sentence(name, message):
  with pytest.raises(ConfigError, match=message):
    plan.parse_topology(name)


def test_mesh_and_batch_that_do_not_fit_the_topology_are_one_sentence():
  devices, topology = jax.devices()[:8], plan.parse_topology('cpu:8')
  with pytest.raises(
    ConfigError,
    match=r'config.mesh \(data=1,fsdp=3,sequence=1,tensor=1\) '
    r'spans 3 devices but 8 are available',
  ):
    plan.plan(smoke(mesh={'data': 1, 'fsdp': 3}), topology, devices)
  with pytest.raises(
    ConfigError,
    match=r'config.train.global_batch=12 is not divisible by the '
    r'8 batch shards',
  ):
    plan.plan(smoke(train={'global_batch': 12}), topology, devices)
  distill = smoke_config('distill_shakespeare')
  with pytest.raises(
    ConfigError,
    match=r"config.objective='distill' reads frozen models "
    r'\(teacher\), which fm.plan does not compile yet',
  ):
    plan.plan(distill, topology, devices)


def test_bad_topology_on_the_command_line_exits_with_one_line():
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'fm.plan',
      '--config',
      'experiments/lm_shakespeare.py:smoke',
      '--topology',
      'tpu-v5e-256',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert out.returncode == 2
  assert out.stderr.strip().count('\n') == 0 and "--topology='tpu-v5e-256' is unknown" in out.stderr


@pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None,
  reason='libtpu is not installed (pip install -r requirements-plan.txt)',
)
def test_plan_for_a_small_tpu_slice(tmp_path):
  """The smoke model compiled by libtpu for a v5e 2x2 slice, in a subprocess (libtpu wants its
  own process)."""
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'fm.plan',
      '--config',
      'experiments/lm_shakespeare.py:smoke',
      '--topology',
      'v5e:2x2',
      '--config.train.global_batch=8',
      '--json',
      str(tmp_path / 'new' / 'plan.json'),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  p = json.loads((tmp_path / 'new' / 'plan.json').read_text())['plan']
  assert p['compiler'] == 'libtpu' and p['devices'] == 4 and 'TPU v5' in p['device_kind']
  assert p['fits'] and p['capacity'] == 16 * 2**30 and p['collectives']


@pytest.mark.slow
def test_plan_of_a_published_model():
  """A fine-tuning config with pretrained.hf plans the imported model's own shapes (GPT-2's
  LayerNorm, learned positions, biases; T5's relative bias and untied head) at the run's batch
  and rows."""
  config = smoke_config('hf_sentiment')
  result = plan.plan(config, plan.parse_topology('cpu:8'), jax.devices()[:8])
  assert result['params'] == 86_208 and result['seq_len'] == 64 and result['global_batch'] == 8
  # An imported T5 on a seq2seq task: its rows are the source and target lengths together.
  result = plan.plan(smoke_config('hf_headline'), plan.parse_topology('cpu:8'), jax.devices()[:8])
  assert result['params'] == 181_056 and result['seq_len'] == 48 + 16 and result['fits']
  with pytest.raises(ConfigError, match=r'or give config.pretrained.hf to plan a published model'):
    plan.plan(smoke_config('transfer_sentiment'), plan.parse_topology('cpu:8'), jax.devices()[:8])
