"""Step benchmark: how much of the hardware the training step turns into training.

  python -m fm.bench                                  # shape llama-6x512, float32, this host
  python -m fm.bench --shape tiny --steps 2 --json /tmp/bench.json
  python -m fm.bench --shape 100m --dtype bfloat16 --profile /tmp/trace
  python -m fm.bench --shape llama-1b --dtype bfloat16 --attention cudnn   # on a GPU

One causal-LM training step (the decoder, AdamW, the trainer's own jitted step, `train.build`)
on synthetic tokens already on the devices, after `--warmup` steps: the median step time (from
the end of one step to the end of the next, the following step already queued, as the trainer
runs), tokens/s, model FLOPs per token, achieved FLOP/s and MFU, compile time and memory; then the
input pipeline alone on the real data path (the news corpus, prepared and packed as training
reads it, with BERT masking as the host-side transform) in windows/s against what the step
consumes. A console table and, with --json, a JSON file.

Model FLOPs per token (`decoder.flops_per_token`, PaLM's appendix B): 6 x (matmul params,
output projection included, embedding lookups not) + 6 x layers x 2 x heads x head_dim x
seq_len for the attention scores and their weighted sum. Causal attention is counted over the
whole square, as PaLM does (an implementation that skips the masked half does less work than
counted). MFU = achieved model FLOP/s / peak. The peak on CPU is a float32 matmul probe in this
process (the best of several sizes; printed), on GPU/TPU the datasheet's dense bf16 peak, with
a bf16 matmul probe printed beside it.
"""

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fm import ConfigError, configs, metrics, optim, sharding, train
from fm.models import decoder
from fm.objectives import causal_lm


@dataclasses.dataclass(frozen=True)
class Shape:
  model: dict  # Decoder Config fields.
  seq_len: int
  batch: int  # Global batch.
  note: str


SHAPES = {
  'tiny': Shape(dict(decoder.VARIANTS['tiny'], vocab_size=512), 64, 8, 'tests and smoke runs'),
  # The shape of the MaxText comparison (experiments/maxtext_compare.py).
  'llama-6x512': Shape(
    dict(
      num_layers=6,
      d_model=512,
      num_heads=8,
      num_kv_heads=8,
      head_dim=64,
      mlp_dim=2048,
      vocab_size=32768,
      max_len=256,
      tie_embeddings=False,
    ),
    256,
    8,
    'Llama-style, 6 layers of 512, MLP 2048, vocabulary 32768: the CPU comparison shape',
  ),
  '100m': Shape(
    dict(
      num_layers=12,
      d_model=768,
      num_heads=12,
      num_kv_heads=12,
      head_dim=64,
      mlp_dim=2048,
      vocab_size=32768,
      max_len=1024,
      tie_embeddings=False,
    ),
    1024,
    8,
    '135M params (12 x 768, SwiGLU 2048, untied vocabulary 32768)',
  ),
  'llama-1b': Shape(
    dict(decoder.VARIANTS['llama-1b'], max_len=2048), 2048, 8, 'Llama 3.2 1B, for accelerators'
  ),
}
DTYPES = ('float32', 'bfloat16')


def peak(platform: str, device_kind: str) -> dict:
  """The peak FLOP/s MFU is taken against, and where it comes from."""
  if platform == 'cpu':
    probe = cpu_probe()
    return {'peak_flops': probe, 'peak_source': 'float32 matmul probe', 'probe_flops': probe}
  probe = metrics.matmul_flops(8192, jnp.bfloat16) * jax.device_count()
  datasheet = metrics.chip_peak_flops(device_kind) * jax.device_count()
  if math.isnan(datasheet):
    return {'peak_flops': probe, 'peak_source': 'bfloat16 matmul probe', 'probe_flops': probe}
  return {'peak_flops': datasheet, 'peak_source': 'datasheet (dense bf16)', 'probe_flops': probe}


def cpu_probe() -> float:
  """The host's float32 matmul peak: the best over sizes (small ones miss it, large ones too)."""
  return max(metrics.matmul_flops(n, jnp.float32, every_device=True) for n in (512, 1024, 2048))


def config_for(args) -> ml_collections.ConfigDict:
  """A causal-LM pretraining config of the shape: lm_news.py's data, optimizer and mesh."""
  shape = SHAPES[args.shape]
  config = configs.load('experiments/lm_news.py', 'fm.bench')
  config.model.update(
    dtype=args.dtype, remat=args.remat, scan_layers=args.scan_layers, attention_impl=args.attention
  )
  config.model.update(shape.model)
  config.data.seq_len = args.seq_len or shape.seq_len
  config.train.global_batch = args.batch or shape.batch
  config.train.steps = args.warmup + args.steps
  config.objective_args = {'vocab_chunk': args.vocab_chunk}
  return configs.resolve(config)


def measure(args) -> dict:
  config = config_for(args)
  seq_len, batch = config.data.seq_len, config.train.global_batch
  family, model_cfg = train.model_config(config)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config)
  try:
    train.check_batch(config, dict(mesh.shape), sharding.batch_divisor(mesh, rules))
  except ConfigError as e:  # Named as this command's flag.
    raise ConfigError(str(e).replace('config.train.global_batch=', '--batch ')) from None
  device = jax.devices()[0]
  result = {
    'shape': args.shape,
    'model': {
      k: getattr(model_cfg, k)
      for k in (*SHAPES[args.shape].model, 'dtype', 'remat', 'scan_layers', 'attention_impl')
    },
    'params': family.param_count(model_cfg)['total'],
    'seq_len': seq_len,
    'global_batch': batch,
    'dtype': args.dtype,
    'vocab_chunk': args.vocab_chunk,
    'platform': device.platform,
    'device_kind': device.device_kind,
    'devices': jax.device_count(),
    'mesh': dict(mesh.shape),
  }
  flops_per_token = family.flops_per_token(model_cfg, seq_len)
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, model_cfg.vocab_size, (batch, seq_len)).astype(np.int32)
  host_batch = {
    'tokens': tokens,
    'segment_ids': np.ones_like(tokens),
    'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy(),
  }
  with sharding.use(mesh, rules):
    program = train.build(
      family.Model(model_cfg),
      optim.make(config.optim, config.train.steps),
      functools.partial(causal_lm.loss_fn, args=config.objective_args),
      config,
      mesh,
      rules,
      train.sample_inputs(family, model_cfg, batch, seq_len),
    )
    state = program.init(jax.random.key(0))
    batch_on_devices = sharding.put_batch(host_batch, mesh, rules)
    step_rng = jax.random.key(1)
    started = time.perf_counter()
    compiled = program.jitted_step.lower(state, batch_on_devices, step_rng, {}).compile()
    result['compile_s'] = time.perf_counter() - started
    memory = compiled.memory_analysis()
    # A step's time runs from the previous step's end to its own, the next step already queued
    # (as in the trainer, which never waits on the step it just dispatched): no dispatch gaps.
    losses, times = [], []
    done = time.perf_counter()

    def finish(out) -> None:
      nonlocal done
      losses.append(float(out['loss']))  # Waits for that step.
      times.append(time.perf_counter() - done)
      done = time.perf_counter()

    previous = None
    for i in range(args.warmup + args.steps):
      if args.profile and i == args.warmup:
        jax.profiler.start_trace(args.profile)
      state, out = compiled(state, batch_on_devices, step_rng, {})
      if previous is not None:
        finish(previous)  # The step before, this one already queued.
      previous = out
    finish(previous)
    if args.profile:
      jax.profiler.stop_trace()
  step_s = statistics.median(times[args.warmup :])
  result.update(
    steps=args.steps,
    warmup=args.warmup,
    step_time_s=step_s,
    step_times_s=times[args.warmup :],
    tokens_per_s=batch * seq_len / step_s,
    flops_per_token=flops_per_token,
    flops_formula='6 x matmul params (output projection included) + 6 x layers x 2 x heads x '
    'head_dim x seq_len (attention; causal counted whole, as in PaLM)',
    achieved_flops=flops_per_token * batch * seq_len / step_s,
    loss_first=losses[0],
    loss_last=losses[-1],
  )
  stats = device.memory_stats() or {}  # Before the probe's own matmuls.
  result.update(peak(device.platform, device.device_kind))
  result['mfu'] = result['achieved_flops'] / result['peak_flops']
  result['memory'] = {
    'peak_device_bytes': stats.get('peak_bytes_in_use'),  # None on CPU.
    'compiled_temp_bytes': getattr(memory, 'temp_size_in_bytes', None),
    'compiled_argument_bytes': getattr(memory, 'argument_size_in_bytes', None),
    'host_peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }
  if args.pipeline_batches:
    try:
      windows = pipeline_speed(config, args.pipeline_batches)
    except ConfigError as e:  # No corpus here (no network): the step's figures still stand.
      result['input'] = {'dataset': config.data.dataset, 'error': str(e)}
      return result
    consumed = batch / step_s
    result['input'] = {
      'dataset': config.data.dataset,
      'windows_per_s': windows,
      'step_consumes_windows_per_s': consumed,
      'ratio': windows / consumed,
    }
  return result


def pipeline_speed(config: ml_collections.ConfigDict, batches: int) -> float:
  """Windows per second that the training pipeline delivers alone (prepared news windows of the
  shape's length, packed, with BERT masking as the host-side transform)."""
  from fm.data import pipeline
  from fm.objectives import masked_lm

  data = pipeline.prepare(config.data)
  corrupt = masked_lm.host_transform(
    data.tokenizer.vocab_size, ml_collections.ConfigDict(masked_lm.ARGS)
  )
  seq_len, batch = config.data.seq_len, config.train.global_batch
  it = iter(pipeline.train_dataset(data.train, seq_len, batch, 0, transform=corrupt))
  next(it)
  started = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - started)


def table(result: dict) -> str:
  gib = lambda b: f'{b / 2**30:.2f} GiB' if b else 'n/a'
  rows = [
    (
      'shape',
      f'{result["shape"]} ({result["params"]:,} params, seq {result["seq_len"]}, '
      f'batch {result["global_batch"]}, {result["dtype"]})',
    ),
    ('device', f'{result["devices"]} x {result["device_kind"]} ({result["platform"]})'),
    ('step time (median)', f'{1000 * result["step_time_s"]:.1f} ms over {result["steps"]} steps'),
    ('tokens/s', f'{result["tokens_per_s"]:,.0f}'),
    ('model FLOPs/token', f'{result["flops_per_token"] / 1e6:,.1f} M'),
    ('achieved', f'{result["achieved_flops"] / 1e12:.3f} TFLOP/s'),
    (
      'peak',
      f'{result["peak_flops"] / 1e12:.3f} TFLOP/s ({result["peak_source"]}; probe '
      f'{result["probe_flops"] / 1e12:.3f})',
    ),
    ('MFU', f'{100 * result["mfu"]:.1f}%'),
    ('compile', f'{result["compile_s"]:.1f} s'),
    (
      'memory',
      f'device peak {gib(result["memory"]["peak_device_bytes"])}, compiled temp '
      f'{gib(result["memory"]["compiled_temp_bytes"])}, host RSS '
      f'{gib(result["memory"]["host_peak_rss_bytes"])}',
    ),
  ]
  if 'error' in result.get('input', {}):
    rows.append(
      (
        'input pipeline',
        f'not measured: {result["input"]["error"]} (--pipeline_batches 0 skips it)',
      )
    )
  elif 'input' in result:
    i = result['input']
    rows.append(
      (
        'input pipeline',
        f'{i["windows_per_s"]:,.0f} windows/s ({i["dataset"]}, '
        f'masking on) = {i["ratio"]:.1f}x what the step consumes',
      )
    )
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m fm.bench', description=__doc__.splitlines()[0])
  parser.add_argument('--shape', default='llama-6x512', choices=sorted(SHAPES))
  parser.add_argument('--dtype', default='float32', choices=DTYPES, help='compute dtype')
  parser.add_argument('--steps', type=int, default=10, help='timed steps')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps first')
  parser.add_argument('--batch', type=int, default=0, help="global batch (0: the shape's)")
  parser.add_argument('--seq_len', type=int, default=0, help="0: the shape's")
  parser.add_argument('--remat', default='none', help='a layers.REMAT_POLICIES name')
  parser.add_argument('--scan_layers', action='store_true')
  parser.add_argument('--attention', default='xla', choices=('xla', 'cudnn'))
  parser.add_argument(
    '--vocab_chunk', type=int, default=0, help='cross-entropy over vocabulary chunks (0: whole)'
  )
  parser.add_argument(
    '--pipeline_batches',
    type=int,
    default=20,
    help='batches of the input-pipeline measurement (0: skip it)',
  )
  parser.add_argument('--json', default='', help='also write the result here')
  parser.add_argument('--profile', default='', help='a jax.profiler trace of the timed steps')
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 1:
    parser.error('--steps and --warmup must be >= 1 (the first step compiles).')
  try:
    result = measure(args)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(table(result))
  if args.json:
    path = pathlib.Path(args.json).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
