"""Metric writers (TensorBoard event files, metrics.jsonl), console progress, throughput and MFU."""

import functools
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter

# Dense bf16 peak FLOP/s per chip, from vendor datasheets, keyed by a substring of device_kind.
PEAK_FLOPS = (
  ('H200', 989e12),
  ('H100', 989e12),
  ('A100', 312e12),
  ('L4', 121e12),
  ('A10G', 70e12),
  ('TPU v6', 918e12),
  ('TPU v5p', 459e12),
  ('TPU v5', 197e12),
  ('TPU v4', 275e12),
)


@functools.cache
def measure_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of float32 matmuls on this process's CPU devices (the best of a few), as the
  host's peak."""
  return matmul_flops(n, jnp.float32, repeats, every_device=True)


def matmul_flops(n: int, dtype, repeats: int = 5, every_device: bool = False) -> float:
  """FLOP/s of the best of `repeats` n x n matmuls in `dtype` on the default device, or with
  `every_device` one on each local device at once, summed: fake CPU devices split the host's
  threads between them, so one of them alone reads a fraction of the host."""
  devices = jax.local_devices() if every_device else jax.local_devices()[:1]
  mesh = jax.sharding.Mesh(np.array(devices), ('devices',))
  spread = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('devices'))
  # Its own mesh of this process's devices: under a run's job-wide mesh an array made by jnp
  # would span other processes' devices, which this process cannot place data on.
  with jax.set_mesh(mesh):
    a = jax.device_put(np.ones((len(devices), n, n), dtype), spread)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(a).block_until_ready()
      best = min(best, time.perf_counter() - start)
  return len(devices) * 2 * n**3 / best


def peak_flops() -> float:
  """Peak FLOP/s of the whole job: per-chip table for accelerators, a measured probe on CPU.

  Fake CPU devices share the host's cores, so on CPU the peak is each host's, not per device.
  """
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return measure_cpu_peak() * jax.process_count()
  return chip_peak_flops(device.device_kind) * jax.device_count()


def chip_peak_flops(device_kind: str) -> float:
  """Dense bf16 peak FLOP/s of one accelerator from PEAK_FLOPS; nan when unknown (MFU is then
  reported as nan rather than guessed)."""
  return next((flops for name, flops in PEAK_FLOPS if name in device_kind), math.nan)


class Writer:
  """Scalars to TensorBoard and metrics.jsonl; only process 0 writes."""

  def __init__(self, workdir: str | pathlib.Path):
    self.active = jax.process_index() == 0
    if self.active:
      self.tb = SummaryWriter(str(workdir))
      self.jsonl = open(pathlib.Path(workdir) / 'metrics.jsonl', 'a')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self.jsonl.flush()

  def close(self) -> None:
    if self.active:
      self.tb.close()
      self.jsonl.close()


def series(workdir: str | pathlib.Path, key: str) -> list[tuple[int, float]]:
  """(step, value) of every record of `key` that a Writer put in WORKDIR/metrics.jsonl (none if
  the file is missing), in the order written; a line a killed process cut short is skipped."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  records = []
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return [(r['step'], r[key]) for r in records if key in r]


def write_json(path: str | pathlib.Path, value) -> None:
  """`value` as indented JSON at `path`, written whole: a temporary file renamed over it, so a
  study killed while writing keeps its previous results for the rerun to read."""
  path = pathlib.Path(path)
  partial = path.with_name(f'.{path.name}.partial')
  partial.write_text(json.dumps(value, indent=1))
  partial.replace(path)


def training_seconds(workdir: str | pathlib.Path) -> float:
  """Seconds a run spent in training steps, summed over every command that trained it: each
  logged window's steps over its steps per second (compilation, evaluation and checkpoints are
  outside the windows)."""
  total, previous = 0.0, 0
  for step, rate in series(workdir, 'steps_per_sec'):
    total += max(step - previous, 0) / rate
    previous = step
  return total


def log(line: str) -> None:
  if jax.process_index() == 0:
    print(line, file=sys.stdout, flush=True)


class Progress:
  """Steps/s, tokens/s, MFU and ETA over the steps since the last report."""

  def __init__(self, total_steps: int, tokens_per_step: int, flops_per_step: float, peak: float):
    self.total, self.tokens, self.flops, self.peak = (
      total_steps,
      tokens_per_step,
      flops_per_step,
      peak,
    )
    self.reset(0)

  def reset(self, step: int) -> None:
    """Starts a new timing window (also used to leave compilation and evals out of it)."""
    self.step, self.time = step, time.perf_counter()

  def report(self, step: int) -> dict[str, float]:
    """The rates over the steps since the window started, which then starts anew; {} when no
    step has finished in it (the window goes on)."""
    now = time.perf_counter()
    steps, seconds = step - self.step, now - self.time
    if steps <= 0 or seconds <= 0:
      return {}
    self.reset(step)
    sps = steps / seconds
    return {
      'steps_per_sec': sps,
      'tokens_per_sec': sps * self.tokens,
      'mfu': sps * self.flops / self.peak,
      'eta_sec': (self.total - step) / sps,
    }


def progress_line(step: int, total: int, scalars: dict[str, float]) -> str:
  """A log line; the rates read n/a where none was measured (the first step after compiling)."""
  eta = scalars.get('eta_sec', np.nan)
  eta_text = '?' if not np.isfinite(eta) else f'{int(eta // 60)}m{int(eta % 60):02d}s'
  rates = (
    f'{scalars["tokens_per_sec"]:,.0f} tok/s | MFU {100 * scalars["mfu"]:.1f}%'
    if 'tokens_per_sec' in scalars
    else 'n/a tok/s | MFU n/a'
  )
  return (
    f'step {step}/{total} | loss {scalars.get("train/loss", np.nan):.4f} | {rates} | ETA {eta_text}'
  )
