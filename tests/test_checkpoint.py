"""Checkpoints: exact resume after SIGKILL, cross-mesh resume, preemption, corruption, warm start."""

import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from workdirs import smoke_config
from workdirs import train_losses as losses

from fm import ConfigError, checkpoint, optim, runs, sharding, train
from fm.data import pipeline, tokenizer
from fm.models import decoder
from fm.objectives import causal_lm

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = 'experiments/lm_shakespeare.py:smoke'
STEPS = 16
FLAGS = [
  f'--config.train.steps={STEPS}',
  '--config.train.log_every=1',
  '--config.train.eval_every=1000',
  '--config.checkpoint.every_steps=4',
]


def launch(workdir, *extra):
  return subprocess.Popen(
    [sys.executable, '-m', 'fm.main', '--config', SMOKE, '--workdir', str(workdir), *FLAGS, *extra],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def final_params(workdir, step=STEPS):
  return ocp.PyTreeCheckpointer().restore(
    pathlib.Path(workdir) / 'checkpoints' / str(step) / 'state'
  )['params']


# Tests that read the reference run share one pytest-xdist worker, so it runs once.
ON_REFERENCE = pytest.mark.xdist_group('checkpoint_reference')


# Session-wide: xdist may run other modules' tests between these on the same worker, which
# would tear down a module fixture and run it again.
@pytest.fixture(scope='session')
def reference(tmp_path_factory):
  """A finished 16-step run of the smoke experiment, saved every 4 steps."""
  workdir = tmp_path_factory.mktemp('reference')
  proc = launch(workdir)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return workdir, losses(workdir)


def wait_until(predicate, proc, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.001)


# The kill during a save runs by default; before and after one in the slow set.
@ON_REFERENCE
@pytest.mark.parametrize(
  'when',
  [pytest.param('before_save', marks=pytest.mark.slow), 'during_save']
  + [pytest.param('after_save', marks=pytest.mark.slow)],
)
def test_sigkill_then_resume_is_exact(when, reference, tmp_path):
  ref_dir, ref_losses = reference
  proc = launch(tmp_path)
  ckpts = tmp_path / 'checkpoints'
  committed = lambda step: (ckpts / str(step)).is_dir() and not list(ckpts.glob(f'{step}.*'))
  if when == 'before_save':  # After step 7's log line (step 4's save committed), before step 8's.
    wait_until(lambda: 7 in losses(tmp_path) and committed(4), proc)
  elif when == 'during_save':  # As soon as orbax's temporary directory for step 8 appears.
    wait_until(
      lambda: any(p.name.startswith('8.') for p in ckpts.glob('*')) if ckpts.exists() else False,
      proc,
    )
  else:  # Once checkpoint 8 is committed.
    wait_until(
      lambda: (
        (ckpts / '8' / 'commit_success.txt').exists()
        or (ckpts / '8').is_dir()
        and not any(p.name.startswith('8.') for p in ckpts.glob('*'))
      ),
      proc,
    )
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(losses(tmp_path), default=0)

  resumed = launch(tmp_path)
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-3000:]
  assert 'resumed from' in out, out[-2000:]
  start = int(out.split('at step ')[1].split()[0])
  # The newest committed checkpoint: 4 before or during step 8's save (on a loaded machine step 8's
  # save may finish between the trigger and the kill: 8), 8 after it; never a fresh start.
  assert start in {'before_save': (4, 8), 'during_save': (4, 8), 'after_save': (8,)}[when]
  assert start <= killed_at
  after = {s: loss for s, loss in losses(tmp_path).items() if s > start}
  assert set(after) == set(range(start + 1, STEPS + 1))
  for s, loss in after.items():
    assert loss == ref_losses[s], f'step {s}: {loss} != {ref_losses[s]} (bitwise)'
  jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path), final_params(ref_dir))


@pytest.mark.slow  # A subprocess start; what a killed save leaves is test_sigkill's by default.
@ON_REFERENCE
def test_partial_save_on_disk_is_ignored(reference, tmp_path):
  """What a kill mid-save leaves (orbax's temporary directory) never counts as a checkpoint."""
  ref_dir, ref_losses = reference
  shutil.copytree(ref_dir / 'checkpoints' / '8', tmp_path / 'checkpoints' / '8')
  partial = tmp_path / 'checkpoints' / '12.orbax-checkpoint-tmp-1234'
  shutil.copytree(ref_dir / 'checkpoints' / '12', partial)
  for f in list(partial.rglob('*'))[::2]:
    if f.is_file():
      f.unlink()
  proc = launch(tmp_path)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert 'at step 8' in out
  assert all(losses(tmp_path)[s] == ref_losses[s] for s in range(9, STEPS + 1))


@pytest.mark.slow  # Subprocess runs (about 40 s each); resume after a kill runs by default.
@pytest.mark.parametrize(
  'every', [pytest.param(1000, id='no_save_in_flight'), pytest.param(1, id='save_every_step')]
)
def test_sigterm_saves_and_exits_zero(every, tmp_path):
  proc = launch(tmp_path, f'--config.checkpoint.every_steps={every}')
  wait_until(lambda: 3 in losses(tmp_path), proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  line = next(line for line in out.splitlines() if line.startswith('preempted'))
  step = int(line.split('at step ')[1].split(':')[0])
  assert step < STEPS and (tmp_path / 'checkpoints' / str(step) / 'state').is_dir()
  proc = launch(tmp_path, f'--config.checkpoint.every_steps={every}')
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert f'at step {step}' in out and max(losses(tmp_path)) == STEPS


@pytest.mark.slow  # A subprocess run (about 40 s).
def test_ctrl_c_with_data_workers_saves_quietly(tmp_path):
  """Ctrl-C reaches every process of the terminal's group, grain's workers too: the run saves
  and stops, and the workers (left to the run to stop) print no KeyboardInterrupt. (grain's
  buffers in flight may still draw multiprocessing's note that it frees their shared memory.)"""
  proc = subprocess.Popen(
    [sys.executable, '-m', 'fm.main', '--config', SMOKE, '--workdir', str(tmp_path), *FLAGS]
    + ['--config.data.workers=2', '--config.checkpoint.every_steps=1000'],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,  # Its own process group, as a terminal's foreground job.
  )
  wait_until(lambda: 3 in losses(tmp_path), proc)
  os.killpg(proc.pid, signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  step = int(out.split('preempted (SIGINT) at step ')[1].split(':')[0])
  assert (tmp_path / 'checkpoints' / str(step) / 'state').is_dir()
  assert 'KeyboardInterrupt' not in err, err[-3000:]


@pytest.mark.slow  # A subprocess start (about 20 s); CI runs it.
@ON_REFERENCE
def test_corrupt_checkpoint_is_skipped(reference, tmp_path):
  ref_dir, ref_losses = reference
  for step in (8, 12):
    shutil.copytree(ref_dir / 'checkpoints' / str(step), tmp_path / 'checkpoints' / str(step))
  data_files = sorted(
    p
    for p in (tmp_path / 'checkpoints' / '12' / 'state').rglob('*')
    if p.is_file() and p.stat().st_size > 1000
  )
  for f in data_files:
    f.write_bytes(f.read_bytes()[:100])  # Truncated.
  proc = launch(tmp_path)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert 'warning: checkpoint' in out and '/checkpoints/12 is unreadable' in out
  assert 'at step 8' in out
  assert (tmp_path / 'checkpoints-corrupt' / '12').is_dir()  # Moved aside, not deleted.
  assert all(losses(tmp_path)[s] == ref_losses[s] for s in range(9, STEPS + 1))


class _Position:
  """A data iterator's position, as the checkpointer saves and restores it."""

  def __init__(self, at: int = 0):
    self.at = at

  def get_state(self):
    return {'at': self.at}

  def set_state(self, state):
    self.at = state['at']


def test_a_checkpoint_with_a_damaged_meta_is_moved_aside(tmp_path):
  """A truncated meta file makes its checkpoint unreadable like any other damaged file: moved to
  checkpoints-corrupt/ with a warning, and the one before restored."""
  cfg = ml_collections.ConfigDict({'every_steps': 1, 'keep': 3})
  ckpt = checkpoint.Checkpointer(tmp_path, cfg)
  for step in (1, 2):
    state = {'params': {'w': jnp.full(3, float(step))}}
    ckpt.save(step, state, _Position(step), {'config': {'train': {'select': ''}}})
  ckpt.close()
  (tmp_path / 'checkpoints' / '2' / 'meta' / 'metadata').write_text('{"config": {"tra')
  said = []
  ckpt = checkpoint.Checkpointer(tmp_path, cfg, log=said.append)
  position = _Position()
  state, step = ckpt.restore_latest({'params': {'w': jnp.zeros(3)}}, position)
  ckpt.close()
  assert step == 1 and position.at == 1 and float(state['params']['w'][0]) == 1.0
  assert len(said) == 1 and '/checkpoints/2 is unreadable (JSONDecodeError' in said[0]
  assert (tmp_path / 'checkpoints-corrupt' / '2' / 'meta').is_dir()


@pytest.mark.slow  # A subprocess start (~15 s), beside the corrupt-checkpoint path's.
@ON_REFERENCE
def test_checkpoint_of_another_model_is_refused_not_moved_aside(reference, tmp_path):
  """A workdir holding another model's state is refused in one sentence naming what differs;
  its checkpoint stays where it is (nothing taken for corrupt and moved aside)."""
  ref_dir, _ = reference
  shutil.copytree(ref_dir / 'checkpoints' / '8', tmp_path / 'checkpoints' / '8')
  proc = launch(tmp_path, '--config.model.variant=mini')
  out, err = proc.communicate(timeout=600)
  assert proc.returncode != 0 and 'holds the params of another model' in err, (out, err[-2000:])
  assert 'start this run in a new workdir' in err and 'layer_2/attn/key missing' in err
  assert 'Metadata file does not exist' not in err  # Orbax's warning, silenced.
  assert (tmp_path / 'checkpoints' / '8' / 'state').is_dir()
  assert not (tmp_path / 'checkpoints-corrupt').exists()


# ---------------------------------------------------------------------------------------------
# In-process: cross-mesh restore, non-finite policy, warm start.
# ---------------------------------------------------------------------------------------------
def eight_steps(**train_overrides):
  return smoke_config(
    train=dict(steps=8, log_every=1, eval_every=1000, **train_overrides),
    checkpoint=dict(every_steps=4),
  )


@pytest.mark.slow
def test_resume_on_another_mesh(tmp_path, capsys):
  config = eight_steps()
  config.mesh.update(data=1, fsdp=8, tensor=1)
  runs.run(config, tmp_path / 'a')
  ref = losses(tmp_path / 'a')
  shutil.copytree(tmp_path / 'a' / 'checkpoints' / '4', tmp_path / 'b' / 'checkpoints' / '4')
  config.mesh.update(data=2, fsdp=1, tensor=4)
  runs.run(config, tmp_path / 'b')
  assert 'at step 4' in capsys.readouterr().out
  got = losses(tmp_path / 'b')
  for s in range(5, 9):
    np.testing.assert_allclose(got[s], ref[s], rtol=1e-5)

  # The restored arrays carry the new mesh's shardings.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.DEFAULT_RULES
  model_cfg = decoder.Config(**{**decoder.VARIANTS['tiny'], 'vocab_size': 4096})
  sample = train.sample_inputs(decoder, model_cfg, 8, 64)
  loss_fn = functools.partial(causal_lm.loss_fn, args=None)
  with sharding.use(mesh, rules):
    model, tx = decoder.Model(model_cfg), optim.make(config.optim, 8)
    program = train.build(model, tx, loss_fn, config, mesh, rules, sample)
    ckpt = checkpoint.Checkpointer(tmp_path / 'a', config.checkpoint)
    target = checkpoint.with_shardings(program.abstract, program.shardings)
    data_iter = iter(pipeline.elastic(grain.MapDataset.range(64), 8, 0, 1))
    state, step = ckpt.restore_latest(target, data_iter)
    ckpt.close()
  assert step == 8
  mlp_up = state['params']['params']['layer_0']['mlp']['up']
  assert mlp_up.sharding.mesh.shape == {'data': 2, 'fsdp': 1, 'sequence': 1, 'tensor': 4}
  assert mlp_up.sharding.shard_shape(mlp_up.shape) == (64, 192 // 4)


def test_zero_steps_evaluate_and_write_the_metrics(tmp_path):
  """train.steps=0 trains nothing, saves nothing, and writes its evaluation like a final one."""
  metrics = runs.run(smoke_config(train=dict(steps=0)), tmp_path)
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert records == [{'step': 0, **{f'eval/{k}': v for k, v in metrics.items()}}]
  assert not list((tmp_path / 'checkpoints').glob('[0-9]*'))
  # The run's tokenizer, in the files fm.convert export ships (and kind=hf reads).
  tok = pipeline.load_tokenizer(smoke_config().data)
  assert (tmp_path / 'tokenizer' / 'tokenizer.model').read_bytes() == tok.proto
  text = 'To be, or not to be: that is the question.\n'
  assert tokenizer.load_hf(str(tmp_path / 'tokenizer')).encode(text) == tok.encode(text)


def test_nonfinite_raise_saves_nothing(tmp_path):
  config = eight_steps()
  config.optim.lr = float('nan')
  with pytest.raises(FloatingPointError, match='at step 1;'):
    runs.run(config, tmp_path)
  assert not list((tmp_path / 'checkpoints').glob('[0-9]*'))


@pytest.mark.slow  # An 8-step run (about 20 s); the raise policy's runs by default.
def test_nonfinite_skip_counts_and_keeps_params(tmp_path):
  config = eight_steps(nonfinite='skip')
  config.optim.lr = float('nan')
  runs.run(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['train/nonfinite_skipped'] for r in records if 'train/loss' in r] == list(range(1, 9))
  # Every update was skipped, so the saved params are the initial ones and still finite.
  params = final_params(tmp_path, 8)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  init = final_params(tmp_path, 4)
  jax.tree.map(np.testing.assert_array_equal, params, init)


@pytest.mark.slow  # About 35 s; warm starting through the config runs by default.
@ON_REFERENCE
def test_warm_start_loads_backbone_and_keeps_fresh_head(reference, capsys):
  ref_dir, _ = reference
  pretrained = final_params(ref_dir)

  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  rules = sharding.DEFAULT_RULES
  cfg = decoder.Config(**{**decoder.VARIANTS['tiny'], 'vocab_size': 4096})
  with sharding.use(mesh, rules):
    boxed = decoder.Model(cfg).init(jax.random.key(7), jnp.zeros((2, 8), jnp.int32))
    params = jax.jit(nn.unbox, out_shardings=sharding.tree_shardings(boxed, mesh, rules))(boxed)
    head = jax.random.normal(jax.random.key(8), (64, 2))
    params = {'params': {**params['params'], 'head': {'kernel': head}}}
    loaded = checkpoint.load_backbone(str(ref_dir), params)
  jax.tree.map(
    np.testing.assert_array_equal,
    {'params': {k: v for k, v in loaded['params'].items() if k != 'head'}},
    pretrained,
  )
  np.testing.assert_array_equal(loaded['params']['head']['kernel'], head)
  query = loaded['params']['layer_0']['attn']['query']
  assert query.sharding.mesh.shape == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert 'freshly initialised: params/head/kernel' in capsys.readouterr().out

  wrong = decoder.Config(**{**decoder.VARIANTS['tiny'], 'vocab_size': 4096, 'mlp_dim': 96})
  bad = nn.unbox(decoder.Model(wrong).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  with pytest.raises(
    ConfigError,
    match=r'param params/layer_0/mlp/down has shape \(192, 64\) '
    r'in the checkpoint but \(96, 64\)',
  ):
    checkpoint.load_backbone(str(ref_dir), bad)


@ON_REFERENCE
def test_warm_start_through_config(reference, tmp_path, capsys):
  config = smoke_config(train=dict(steps=2, log_every=1, eval_every=1000))
  config.init.from_checkpoint = str(reference[0])
  runs.run(config, tmp_path)
  assert 'warm start: 20 params from' in capsys.readouterr().out
  # The loaded params are the ones trained: the first loss is far below the fresh run's first
  # (the reference falls from ref[1] to ref[16] in 16 steps).
  ref = reference[1]
  assert losses(tmp_path)[1] < ref[1] - 0.5 * (ref[1] - ref[STEPS])


@ON_REFERENCE
def test_inspect_cli(reference):
  ref_dir, _ = reference
  result = subprocess.run(
    [sys.executable, '-m', 'fm.checkpoint', 'inspect', str(ref_dir)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert f'step {STEPS}' in result.stdout and 'params 360,768 in 20 arrays' in result.stdout
  assert 'params/layer_0/attn/query' in result.stdout and '(64, 4, 16)' in result.stdout


def test_device_prefetch_state_is_that_of_the_batches_handed_out():
  """One batch is held ahead, but the state a checkpoint saves resumes on the next batch."""

  class Counter:
    def __init__(self):
      self.position = 0

    def __next__(self):
      self.position += 1
      return {'x': self.position}

    def get_state(self):
      return {'position': self.position}

    def set_state(self, state):
      self.position = state['position']

  inner = Counter()
  batches = train.DevicePrefetch(inner, lambda b: {'x': b['x'] * 10})
  assert batches.get_state() == {'position': 0}
  assert [next(batches)['x'] for _ in range(3)] == [10, 20, 30]
  batches.fill()  # As the loop does after dispatching a step.
  assert inner.position == 4 and batches.get_state() == {'position': 3}  # 4th held back.
  resumed = train.DevicePrefetch(Counter(), lambda b: {'x': b['x'] * 10})
  resumed.set_state(batches.get_state())
  assert next(resumed)['x'] == next(batches)['x'] == 40


def test_a_notice_in_the_last_step_stops_the_next_run(tmp_path, monkeypatch):
  """SIGTERM in a run's last step or while it finishes (its final evaluation, no step left to
  stop at): the run finishes, and the notice carries to the next run in the process, which
  stops before training and writes nothing; one a loop answered does not carry."""
  config = smoke_config(train=dict(steps=3, eval_every=3, log_every=1))
  reached = checkpoint.Preemption.reached

  def last_step_signalled(self, step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # Caught by the loop's handler.
    return reached(self, step)

  try:
    with monkeypatch.context() as patch:
      patch.setattr(checkpoint.Preemption, 'reached', last_step_signalled)
      finished = runs.run(config, tmp_path / 'a')
    assert 'loss' in finished and checkpoint.latest_step(tmp_path / 'a') == 3
    assert checkpoint.Preemption.unanswered == 'SIGTERM'
    assert runs.run(config, tmp_path / 'b') == {}
    assert checkpoint.latest_step(tmp_path / 'b') == 0 and not losses(tmp_path / 'b')
    assert checkpoint.Preemption.unanswered is None  # Answered by stopping.
    assert 'loss' in runs.run(config, tmp_path / 'c')
  finally:
    checkpoint.Preemption.unanswered = None
  first = checkpoint.Preemption()
  os.kill(os.getpid(), signal.SIGTERM)
  first.answered()
  first.restore_handlers()
  assert checkpoint.Preemption.unanswered is None
