"""Compile-only planning: does this experiment fit that topology, and how fast could it run?

  python -m fm.plan --config experiments/llama.py:8b --topology v5e:16x16
  python -m fm.plan --config experiments/llama.py:8b --topology v5e:2x4 --sweep
  python -m fm.plan --config experiments/llama.py:1b --topology h100:1 --max_batch
  python -m fm.plan --config experiments/lm_shakespeare.py:smoke --topology cpu:8

The real train step (the experiment's model, objective, optimizer, mesh and logical rules) is
lowered with abstract inputs and compiled ahead of time for the named topology on this machine:
  - TPU (`v4`, `v5e`, `v5p`, `v6e` with the slice shape, e.g. v5e:16x16) through libtpu, which
    `pip install -r requirements-plan.txt` adds; its compiler sizes every buffer as on the pod.
  - GPU (`h100`, `h200`, `a100` with GPUS or HOSTSxGPUS, e.g. h100:8x8): the same sharded
    program is compiled by the host CPU backend on as many fake devices, a stand-in for the
    CUDA compiler (whose fusion and buffer assignment differ): its memory is an estimate.
  - `cpu:N`: this host's CPU backend on N devices (what the tests use).

Printed: params and optimizer bytes per device, the compiler's argument/temporary/total bytes
per device against the device memory (fits, or by how much it does not), model and compiled
FLOPs per step, each collective in the compiled program with its bytes (loop bodies counted
once per trip), and a roofline estimate of step time and MFU from the chip's published peak
FLOP/s, memory bandwidth and interconnect bandwidth. Then the per-param sharding table.
`--sweep` compiles every remat policy x microbatch count and reports the fastest that fits;
`--max_batch` finds the largest global batch that fits (a multiple of the batch shards).
"""

import dataclasses
import json
import math
import os
import pathlib
import re
import sys

from absl import app, flags

from fm import ConfigError
from fm.cli import define_config, parse_flags

FLAGS = flags.FLAGS
define_config()
flags.declare_key_flag('config')  # Listed by --help with this command's own flags.
flags.DEFINE_string(
  'topology',
  None,
  'Target: v5e:16x16, v5p:4x4x4, v4:2x2x1, v6e:4x4, h100:8x8 (hosts x GPUs), h100:1, cpu:8.',
)
flags.DEFINE_bool(
  'sweep', False, 'Try remat policies x microbatch counts; report the fastest that fits.'
)
flags.DEFINE_bool('max_batch', False, 'Find the largest global batch that fits.')
flags.DEFINE_string('json', None, 'Also write the plan(s) to this JSON file.')
flags.mark_flags_as_required(['config', 'topology'])

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  platform: str  # tpu, gpu or cpu
  kind: str  # Substring of jax's device_kind, for metrics.PEAK_FLOPS.
  memory: float  # Bytes of device memory.
  hbm_bw: float  # Bytes/s of device memory bandwidth.
  link_bw: float  # Bytes/s of interconnect per device (TPU ICI; GPU NVLink in a host).
  network_bw: float = 0.0  # Bytes/s per GPU between hosts (InfiniBand / RoCE).
  per_host: int = 0  # GPUs per host.


# Vendor datasheets: HBM capacity and bandwidth, ICI / NVLink / per-GPU network bandwidth.
CHIPS = {
  'v4': Chip('tpu', 'TPU v4', 32 * GIB, 1228e9, 300e9),
  'v5e': Chip('tpu', 'TPU v5', 16 * GIB, 819e9, 200e9),
  'v5p': Chip('tpu', 'TPU v5p', 95 * GIB, 2765e9, 600e9),
  'v6e': Chip('tpu', 'TPU v6', 32 * GIB, 1640e9, 448e9),
  'a100': Chip('gpu', 'A100', 80e9, 2039e9, 600e9, 25e9, 8),
  'h100': Chip('gpu', 'H100', 80 * GIB, 3350e9, 900e9, 50e9, 8),
  'h200': Chip('gpu', 'H200', 141e9, 4800e9, 900e9, 50e9, 8),
  'cpu': Chip('cpu', 'cpu', 0.0, 0.0, 0.0),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  chip_name: str
  dims: tuple[int, ...]

  @property
  def chip(self) -> Chip:
    return CHIPS[self.chip_name]

  @property
  def hosts(self) -> int:
    return self.dims[0] if self.chip.platform == 'gpu' and len(self.dims) == 2 else 1


def parse_topology(name: str) -> Topology:
  chip, _, shape = (name or '').partition(':')
  if chip not in CHIPS or not re.fullmatch(r'[1-9][0-9]*(x[1-9][0-9]*)*', shape):
    raise ConfigError(
      f'--topology={name!r} is unknown; use CHIP:SHAPE with CHIP one of {", ".join(CHIPS)} '
      f'(TPU slice shape like v5e:16x16 or v5p:4x4x4; GPUs as h100:8 or HOSTSxGPUS h100:8x8; '
      f'cpu:8).'
    )
  dims = tuple(int(d) for d in shape.split('x'))
  if CHIPS[chip].platform != 'tpu' and len(dims) > 2:
    raise ConfigError(f'--topology={name!r}: {chip} takes GPUS or HOSTSxGPUS, e.g. {chip}:8x8.')
  return Topology(name, chip, dims)


def topology_devices(topology: Topology) -> list:
  """The devices to compile for: libtpu's description of the slice, or host CPU devices."""
  import jax

  if topology.chip.platform == 'tpu':
    from jax.experimental import topologies

    try:
      return list(topologies.get_topology_desc(platform='tpu', topology_name=topology.name).devices)
    except RuntimeError as e:
      if 'not installed' in str(e):
        raise ConfigError(
          f'--topology={topology.name} needs libtpu; install it with '
          f'`pip install -r requirements-plan.txt`.'
        ) from None
      raise ConfigError(
        f'libtpu cannot describe --topology={topology.name} '
        f'({str(e).splitlines()[0]}); check the slice shape.'
      ) from None
  n = math.prod(topology.dims)
  devices = jax.devices('cpu')
  if len(devices) < n:
    raise ConfigError(
      f'--topology={topology.name} needs {n} host devices but jax was started '
      f'with {len(devices)}; run fm.plan as a command (it sets XLA_FLAGS) or set '
      f'XLA_FLAGS=--xla_force_host_platform_device_count={n}.'
    )
  return devices[:n]


# =============================================================================================
# Reading the compiled program
# =============================================================================================
DTYPE_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  's16': 2,
  'u16': 2,
  'f16': 2,
  'bf16': 2,
  's32': 4,
  'u32': 4,
  'f32': 4,
  's64': 8,
  'u64': 8,
  'f64': 8,
  'f8e4m3fn': 1,
  'f8e5m2': 1,
}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_SHAPE = re.compile(r'\b(' + '|'.join(DTYPE_BYTES) + r')\[([0-9,]*)\]')
_INSTR = re.compile(
  r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\('
)


def shape_bytes(text: str) -> int:
  return sum(
    DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(',') if x)
    for d, dims in _SHAPE.findall(text)
  )


def _group_size(line: str, num_devices: int) -> int:
  """Devices per replica group, from any of XLA's three spellings."""
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line)
  if m:
    return int(m.group(2))
  m = re.search(r'replica_groups=\{\{([0-9,]*)\}', line)
  if m:
    return len(m.group(1).split(','))
  m = re.search(r'replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}', line)
  if m:
    sizes = {k.strip("'"): int(v) for k, v in re.findall(r"('?\w+'?)=(\d+)", m.group(1))}
    return math.prod(sizes.get(a.strip().strip("'"), 1) for a in m.group(2).split(',') if a)
  if 'source_target_pairs' in line:
    return 2
  return num_devices


def _computations(hlo: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in hlo.splitlines():
    m = re.match(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if m and not line.startswith(' '):
      name = 'ENTRY' if line.startswith('ENTRY') else m.group(1)
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  return comps


def _trip_counts(comps: dict[str, list[str]]) -> dict[str, int]:
  """How many times each computation runs per step: while bodies by their known trip count."""
  runs = {'ENTRY': 1}
  todo = ['ENTRY']
  while todo:
    name = todo.pop()
    for line in comps.get(name, ()):
      trips = 1
      if re.search(r'\swhile\(', line):
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        trips = int(m.group(1)) if m else 1
      for key, callee in re.findall(
        r'\b(body|condition|to_apply|calls|branch_computations)='
        r'\{?%?([\w.\-]+)',
        line,
      ):
        n = runs[name] * (trips if key in ('body', 'condition') else 1)
        if runs.get(callee, 0) < n:
          runs[callee] = n
          todo.append(callee)
  return runs


def collectives(hlo: str, num_devices: int) -> dict[str, dict]:
  """{op: {count, bytes, group}} per step and device: result bytes of every collective (the
  async `-start` halves), times the trip count of the loop it sits in."""
  comps = _computations(hlo)
  runs = _trip_counts(comps)
  out = {}
  for name, lines in comps.items():
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      result, op = m.group(1), m.group(2)
      shapes = [f'{d}[{dims}]' for d, dims in _SHAPE.findall(result)]
      if m.group(3) and len(shapes) > 1:  # An async start's tuple holds (inputs, outputs).
        shapes = shapes[len(shapes) // 2 :]
      nbytes = shape_bytes(' '.join(shapes))
      entry = out.setdefault(op, {'count': 0, 'bytes': 0, 'group': 1})
      entry['count'] += runs.get(name, 1)
      entry['bytes'] += nbytes * runs.get(name, 1)
      entry['group'] = max(entry['group'], _group_size(line, num_devices))
  return out


def comm_seconds(ops: dict[str, dict], topology: Topology) -> float:
  """Ring-algorithm time of the collectives at the interconnect's bandwidth (GPU groups larger
  than a host at the network's): all-reduce moves 2(n-1)/n of its bytes, gathers and all-to-all
  (n-1)/n, reduce-scatter n-1 times its (scattered) result, permutes their bytes once."""
  chip = topology.chip
  if not chip.link_bw:
    return 0.0
  total = 0.0
  for op, e in ops.items():
    n = max(e['group'], 1)
    bw = (
      chip.network_bw
      if chip.per_host and n > min(chip.per_host, topology.dims[-1])
      else (chip.link_bw)
    )
    factor = {
      'all-reduce': 2 * (n - 1) / n,
      'all-gather': (n - 1) / n,
      'all-to-all': (n - 1) / n,
      'reduce-scatter': n - 1,
      'collective-permute': 1.0,
    }[op]
    total += e['bytes'] * factor / bw
  return total


# libtpu's two ways of saying that a program does not fit: (needed, available).
_OOM = (
  re.compile(r'Used ([0-9.]+)([KMGT]?) of ([0-9.]+)([KMGT]?) hbm'),
  re.compile(
    r'required for HLO temporaries \(([0-9.]+)([KMGT]?)\) exceeds available HBM '
    r'\(([0-9.]+)([KMGT]?)\)'
  ),
)


def _bytes(value: str, unit: str) -> float:
  return float(value) * 1024 ** ' KMGT'.index(unit or ' ')


# =============================================================================================
# The plan
# =============================================================================================
def _leaf_rows(abstract, shardings, boxed=None):
  """(path, shape, dtype, sharding, logical axes) of every leaf."""
  import flax.linen as nn
  import jax

  logical = {}
  if boxed is not None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]:
      if isinstance(leaf, nn.Partitioned):
        logical[jax.tree_util.keystr(path)] = tuple(leaf.names)
  rows = []
  for (path, leaf), sh in zip(
    jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(shardings)
  ):
    name = jax.tree_util.keystr(path, simple=True, separator='/').removeprefix('params/')
    rows.append((name, leaf.shape, leaf.dtype, sh, logical.get(jax.tree_util.keystr(path))))
  return rows


def _per_device_bytes(rows) -> int:
  return sum(math.prod(sh.shard_shape(shape)) * dtype.itemsize for _, shape, dtype, sh, _ in rows)


def _hosts(topology: Topology, devices: list) -> int:
  """Processes that read the batch: libtpu's hosts of the slice, or HOSTS of a GPU topology."""
  if topology.chip.platform == 'tpu':
    return len({d.process_index for d in devices})
  return topology.hosts


def recompute_factor(module, model_cfg, objective, args, seq_len: int) -> float:
  """Training FLOPs with rematerialisation over those without: `full` recomputes the forward
  pass (8/6), `minimal` the attention einsums, which have batch dimensions (their share: the
  part of a row's FLOPs that grows with the square of its lengths, from the row and the row
  twice as long; the rows the objective makes where it states them, as train.step_flops
  counts), `dots_saveable` keeps every matmul (only cheap elementwise work is redone)."""
  if objective.row_lengths is not None and module.flops_per_row is not None:
    source, target = objective.row_lengths(seq_len, args)
    flops = lambda k: module.flops_per_row(model_cfg, k * source, k * target)
  else:
    flops = lambda k: module.flops_per_token(model_cfg, k * seq_len) * k * seq_len
  share = (flops(2) - 2 * flops(1)) / (2 * flops(1))
  return {'none': 1.0, 'dots_saveable': 1.0, 'minimal': 1 + share / 3, 'full': 4 / 3}[
    getattr(model_cfg, 'remat', 'none')  # (A family without the option: none.)
  ]


def _imported_backbone(config):
  """A fine-tuning config whose backbone is a Hugging Face model (`pretrained.hf`) as the
  pretraining config fm.plan compiles: the imported model's own config (fm/convert), trained
  with the run's batch, rows, mesh, optimizer and steps, the cost of full fine-tuning."""
  from fm import configs, convert, registry, tasks

  if not config.pretrained.hf:
    raise ConfigError(
      f'--config is a fine-tuning experiment (task {config.task!r}); fm.plan compiles '
      f'pretraining steps: plan its backbone experiment (config.pretrained.experiment), or give '
      f'config.pretrained.hf to plan a published model.'
    )
  backbone = convert.run_config(config.pretrained.hf, 'config.pretrained.hf').to_dict()
  for section in ('train', 'optim', 'mesh', 'sharding'):
    backbone[section] = config[section].to_dict()
  # The task's rows (an encoder-decoder's source and target side by side: as many tokens).
  backbone['data']['seq_len'] = tasks.kind_of(registry.get('tasks', config.task)).row_length(config)
  return configs.resolve(backbone)


def plan(config, topology: Topology, devices: list) -> dict:
  """Compiles the train step of `config` for `devices`; returns the plan's figures."""
  import functools

  import jax
  import numpy as np

  from fm import configs, optim, sharding, train
  from fm import metrics as metrics_lib
  from fm.data import pipeline, tokenizer

  config = configs.resolve(config)
  imported = configs.is_finetuning(config)
  if imported:
    config = _imported_backbone(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config)
  objective = train.validate(
    config,
    dict(mesh.shape),
    sharding.batch_divisor(mesh, rules),
    _hosts(topology, devices),
    corpus=not imported,
  )
  if objective.FROZEN:
    raise ConfigError(
      f'config.objective={config.objective!r} reads frozen models '
      f'({", ".join(objective.FROZEN)}), which fm.plan does not compile yet; plan '
      f'the same model with config.objective=causal_lm.'
    )
  B = config.train.global_batch
  if objective.MODALITY != 'text':  # One image (and caption) per row.
    module, model_cfg, caption_tokenizer = train.image_model_config(config, objective)
    L, size = module.sequence_length(model_cfg), model_cfg.num_patches
    c = model_cfg
    pixels = np.zeros((1, c.image_size, c.image_size, c.channels), np.uint8)
    rows = train.image_rows(c, pixels, caption_tokenizer and [''])
    window = {k: v[0] for k, v in rows.items()}
  else:
    size = tokenizer.declared_vocab_size(config.data.tokenizer)
    module, model_cfg = train.model_config(config, size + objective.EXTRA_TOKENS)
    L = config.data.seq_len
    window = pipeline.padding_window(L)
  model = module.Model(model_cfg)
  # One row's shapes as the data pipeline hands them over, after the objective's corruption.
  if objective.host_transform:
    window = objective.host_transform(size, config.objective_args)(window, np.random.default_rng(0))
  tx = optim.make(config.optim, config.train.steps)
  sample = tuple(  # (An encoder-decoder's segment ids are None: all real.)
    x if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype)
    for x in train.sample_inputs(module, model_cfg, B, L)
  )
  # The training run's own jitted step, built outside the target's mesh (no array may land on
  # its devices) and lowered inside it. The second init trace names the params' logical axes.
  loss_fn = functools.partial(objective.loss_fn, args=config.objective_args)
  program = train.build(model, tx, loss_fn, config, mesh, rules, sample)
  abstract, shardings = program.abstract, program.shardings
  boxed = jax.eval_shape(model.init, jax.random.key(0), *sample)
  batch_sh = sharding.batch_sharding(mesh, rules)
  batch = {
    k: jax.ShapeDtypeStruct((B, *v.shape), v.dtype, sharding=batch_sh) for k, v in window.items()
  }
  state = jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings
  )
  key = jax.ShapeDtypeStruct(
    (),
    jax.eval_shape(lambda: jax.random.key(0)).dtype,
    sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )
  with sharding.use(mesh, rules):
    lowered = program.jitted_step.lower(state, batch, key, {})
  param_rows = _leaf_rows(abstract['params'], shardings['params'], boxed)
  opt_rows = _leaf_rows(abstract['opt_state'], shardings['opt_state'])
  chip = topology.chip
  capacity = chip.memory or float(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))
  result = {
    'topology': topology.name,
    'devices': len(devices),
    'device_kind': devices[0].device_kind,
    'mesh': dict(mesh.shape),
    'model': f'{config.model.name}/{config.model.variant}',
    'params': module.param_count(model_cfg)['total'],
    'global_batch': B,
    'seq_len': L,
    'remat': getattr(model_cfg, 'remat', 'none'),
    'scan_layers': getattr(model_cfg, 'scan_layers', False),
    'microbatches': config.train.microbatches,
    'dtype': model_cfg.dtype,
    'param_dtype': model_cfg.param_dtype,
    'param_bytes': _per_device_bytes(param_rows),
    'opt_bytes': _per_device_bytes(opt_rows),
    'capacity': capacity,
    'compiler': 'libtpu' if chip.platform == 'tpu' else 'host CPU',
    'model_flops': train.step_flops(module, model_cfg, objective, config.objective_args, L, B),
    'sharding': [
      {
        'name': n,
        'shape': list(s),
        'logical': list(lg) if lg else None,
        'mesh': str(tuple(sh.spec)),
        'bytes_per_device': math.prod(sh.shard_shape(s)) * d.itemsize,
      }
      for n, s, d, sh, lg in param_rows
    ],
  }
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA's error type is not public.
    m = next(filter(None, (pattern.search(str(e)) for pattern in _OOM)), None)
    if not m:
      raise
    used, cap = _bytes(*m.group(1, 2)), _bytes(*m.group(3, 4))
    if 'temporaries' in m.group(0):  # The state comes on top of the temporaries.
      used += result['param_bytes'] + result['opt_bytes']
    result.update(
      fits=False,
      total_bytes=used,
      capacity=cap,
      over_by=used - cap,
      oom=str(e).splitlines()[0].split(': ', 1)[-1][:300],
    )
    return result
  mem = compiled.memory_analysis()
  total = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
    + mem.generated_code_size_in_bytes
  )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ops = collectives(compiled.as_text(), len(devices))
  peak = (
    metrics_lib.chip_peak_flops(chip.kind)
    if chip.platform != 'cpu'
    else (metrics_lib.measure_cpu_peak() / len(devices))
  )
  # Per device: the model's FLOPs plus what remat recomputes (XLA's own count takes a loop body
  # once), the bytes the compiler expects to move through memory, and the collectives.
  t_compute = (
    (
      result['model_flops']
      * recompute_factor(module, model_cfg, objective, config.objective_args, L)
      / len(devices)
      / peak
    )
    if peak
    else math.nan
  )
  t_memory = float(cost.get('bytes accessed', 0.0)) / chip.hbm_bw if chip.hbm_bw else 0.0
  t_comm = comm_seconds(ops, topology)
  step_time = max(t_compute, t_memory, t_comm)
  result.update(
    fits=total <= capacity,
    total_bytes=total,
    over_by=max(0.0, total - capacity),
    argument_bytes=mem.argument_size_in_bytes,
    output_bytes=mem.output_size_in_bytes,
    alias_bytes=mem.alias_size_in_bytes,
    temp_bytes=mem.temp_size_in_bytes,
    code_bytes=mem.generated_code_size_in_bytes,
    compiled_flops=float(cost.get('flops', 0.0)),
    bytes_accessed=float(cost.get('bytes accessed', 0.0)),
    collectives=ops,
    peak_flops=peak,
    t_compute=t_compute,
    t_memory=t_memory,
    t_comm=t_comm,
    step_time=step_time,
    bound=('compute', 'memory', 'communication')[int(np.argmax([t_compute, t_memory, t_comm]))],
    mfu=(result['model_flops'] / (len(devices) * peak * step_time))
    if peak and step_time
    else math.nan,
    tokens_per_sec=B * L / step_time if step_time else math.nan,
  )
  return result


# =============================================================================================
# Printing
# =============================================================================================
def _gib(x: float) -> str:
  return f'{x / GIB:.2f} GiB'


def _seconds(x: float) -> str:
  return f'{x * 1e3:.1f} ms' if x < 10 else f'{x:.1f} s'


def _count(n: float) -> str:
  """A parameter count as 0.22B, 4.46M or 51K."""
  for scale, unit in ((1e9, 'B'), (1e6, 'M'), (1e3, 'K')):
    if n >= scale:
      return f'{n / scale:.2f}{unit}'
  return f'{n:.0f}'


def summary(p: dict) -> str:
  lines = [
    f'{p["model"]} ({_count(p["params"])} params) on {p["topology"]}: {p["devices"]} x '
    f'{p["device_kind"]}, mesh {p["mesh"]}, compiled by {p["compiler"]}',
    f'global batch {p["global_batch"]} x {p["seq_len"]} tokens, microbatches '
    f'{p["microbatches"]}, remat {p["remat"]}, scan_layers {p["scan_layers"]}, compute '
    f'{p["dtype"]}, params {p["param_dtype"]}',
    '',
  ]
  rows = [
    ('params per device', _gib(p['param_bytes'])),
    ('optimizer state per device', _gib(p['opt_bytes'])),
  ]
  if 'temp_bytes' in p:
    rows += [
      ('arguments (state + batch)', _gib(p['argument_bytes'])),
      ('temporaries (activations, gradients)', _gib(p['temp_bytes'])),
      ('outputs not aliased to inputs', _gib(p['output_bytes'] - p['alias_bytes'])),
      ('generated code', _gib(p['code_bytes'])),
    ]
  verdict = 'fits' if p['fits'] else f'DOES NOT FIT, over by {_gib(p["over_by"])}'
  rows += [('total per device', f'{_gib(p["total_bytes"])} of {_gib(p["capacity"])}: {verdict}')]
  if 'temp_bytes' in p:
    rows += [
      ('model FLOPs per step', f'{p["model_flops"]:.3e}'),
      ('compiled FLOPs per device (loops once)', f'{p["compiled_flops"]:.3e}'),
      ('HBM bytes accessed per device', _gib(p['bytes_accessed'])),
    ]
    for op, e in sorted(p['collectives'].items()):
      rows.append((f'{op} (x{e["count"]}, groups of {e["group"]})', _gib(e['bytes'])))
    rows += [
      (
        'roofline: compute / memory / comm',
        ' / '.join(_seconds(t) for t in (p['t_compute'], p['t_memory'], p['t_comm'])),
      ),
      (
        'roofline step time',
        f'{_seconds(p["step_time"])} ({p["bound"]}-bound), '
        f'MFU {100 * p["mfu"]:.1f}%, {p["tokens_per_sec"]:,.0f} tokens/s',
      ),
    ]
  elif p.get('oom'):
    rows.append(('compiler', p['oom']))
  width = max(len(k) for k, _ in rows)
  return '\n'.join(lines + [f'  {k:<{width}}  {v}' for k, v in rows])


def sharding_table(p: dict) -> str:
  header = ('param', 'shape', 'logical axes', 'mesh axes', 'per device')
  rows = [
    (
      r['name'],
      'x'.join(map(str, r['shape'])),
      ','.join(str(a) for a in r['logical'] or ()),
      r['mesh'],
      f'{r["bytes_per_device"] / 2**20:.2f} MiB',
    )
    for r in p['sharding']
  ]
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  fmt = lambda row: '  '.join(f'{x:<{w}}' for x, w in zip(row, widths))
  return '\n'.join([fmt(header)] + [fmt(r) for r in rows])


# =============================================================================================
# Searches
# =============================================================================================
def sweep(config, topology, devices, log=print) -> tuple[list[dict], dict | None]:
  """Every remat policy x microbatch count (powers of two the per-shard batch divides); the
  fastest plan that fits (ties: least memory)."""
  from fm.models import layers

  per_shard = config.train.global_batch // _batch_ways(config, devices)
  counts = [k for k in (1, 2, 4, 8, 16, 32) if per_shard % k == 0]
  plans = []
  for remat in layers.REMAT_POLICIES:
    for k in counts:
      trial = _with(config, model={'remat': remat}, train={'microbatches': k})
      p = plan(trial, topology, devices)
      plans.append(p)
      log(
        f'remat {remat:<13} microbatches {k:<3} {_gib(p["total_bytes"]):>11} '
        f'{"fits" if p["fits"] else "does not fit"}'
        + (f', roofline {_seconds(p["step_time"])}' if 'step_time' in p else '')
      )
  fitting = [p for p in plans if p['fits']]
  best = (
    min(fitting, key=lambda p: (round(p['step_time'], 4), p['total_bytes'])) if fitting else None
  )
  return plans, best


def max_batch(config, topology, devices, log=print) -> tuple[dict | None, dict | None]:
  """The largest global batch (a multiple of the batch shards) that fits: doubling, then
  bisection. Returns (largest plan that fits, smallest that does not)."""
  unit = math.lcm(
    _batch_ways(config, devices) * max(1, config.train.microbatches), _hosts(topology, devices)
  )

  def attempt(n):
    p = plan(_with(config, train={'global_batch': n * unit}), topology, devices)
    log(
      f'global batch {n * unit:>6}: {_gib(p["total_bytes"]):>11} '
      f'{"fits" if p["fits"] else "does not fit"}'
    )
    return p

  good, bad, n = None, None, 1
  while True:
    p = attempt(n)
    if not p['fits']:
      bad = p
      break
    good, n = p, n * 2
    if n > 1 << 16:
      return good, None
  lo, hi = (good['global_batch'] // unit if good else 0), n
  while hi - lo > 1:
    mid = (lo + hi) // 2
    p = attempt(mid)
    if p['fits']:
      good, lo = p, mid
    else:
      bad, hi = p, mid
  return good, bad


def _batch_ways(config, devices) -> int:
  from fm import sharding

  return sharding.batch_divisor(
    sharding.make_mesh(config.mesh, devices), sharding.rules_from_config(config)
  )


def _with(config, **sections):
  import ml_collections

  out = ml_collections.ConfigDict(config.to_dict())
  for section, values in sections.items():
    out[section].update(values)
  return out


# =============================================================================================
# Command line
# =============================================================================================
def _set_host_devices(argv: list[str]) -> None:
  """GPU and CPU topologies compile on host devices: as many as the topology has, requested
  before jax starts."""
  name = next((a.split('=', 1)[1] for a in argv if a.startswith('--topology=')), None)
  if name is None and '--topology' in argv[:-1]:
    name = argv[argv.index('--topology') + 1]
  try:
    topology = parse_topology(name or '')
  except ConfigError:
    return  # Reported after flag parsing.
  if topology.chip.platform != 'tpu':
    flags_now = os.environ.get('XLA_FLAGS', '')
    n = math.prod(topology.dims)
    os.environ['XLA_FLAGS'] = (
      re.sub(r'--xla_force_host_platform_device_count=\d+', '', flags_now)
      + f' --xla_force_host_platform_device_count={n}'
    )
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # libtpu only describes the slice, so several
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # plans may run at once.


def main(argv):
  del argv
  try:
    topology = parse_topology(FLAGS.topology)
    devices = topology_devices(topology)
    from fm import configs

    config = configs.resolve(FLAGS.config)
    out = {}
    if FLAGS.sweep:
      plans, best = sweep(config, topology, devices)
      out['sweep'] = plans
      if best is None:
        print(
          '\nno remat policy x microbatch count fits; shard wider (config.mesh) or lower '
          'config.train.global_batch.'
        )
      else:
        print(f'\nfastest that fits: remat {best["remat"]}, microbatches {best["microbatches"]}\n')
        print(summary(best))
      p = best
    elif FLAGS.max_batch:
      good, bad = max_batch(config, topology, devices)
      out['largest'], out['first_too_large'] = good, bad
      if good is None:
        print(f'\nnot even the smallest global batch fits:\n\n{summary(bad)}')
      else:
        print(
          f'\nlargest global batch that fits: {good["global_batch"]}'
          + (f' ({bad["global_batch"]} needs {_gib(bad["total_bytes"])})' if bad else '')
          + f'\n\n{summary(good)}'
        )
      p = good
    else:
      p = out['plan'] = plan(config, topology, devices)
      print(summary(p))
    if p is not None:
      print('\n' + sharding_table(p))
    if FLAGS.json:  # Its folder made, as fm.bench's.
      path = pathlib.Path(FLAGS.json).expanduser()
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(out, indent=1, default=str))
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def run():
  _set_host_devices(sys.argv)
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
