"""Importing a published model: wall time and peak host memory of `python -m fm.convert import`.

  python experiments/convert_bench.py --workdir /tmp/convert_bench
  python experiments/convert_bench.py --workdir /tmp/convert_bench --mesh fsdp=4 --devices 4

Writes a Llama-3.2-1B-shaped checkpoint in Hugging Face layout (config.json, random bfloat16
weights in safetensors shards of at most --shard_mb with their index; 1.24B params, 2.3 GiB),
once, then imports it in a fresh process and reports its wall time and peak resident set
(the kernel's high-water mark of that process, from wait4 when it exits) against the largest shard
and the largest tensor; then checks that the imported tensors are the written ones. Writes
convert_bench.md and convert_bench.json to the workdir and prints the table.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Llama 3.2 1B's config.json (the fields fm reads).
CONFIG = {
  'architectures': ['LlamaForCausalLM'],
  'model_type': 'llama',
  'vocab_size': 128256,
  'hidden_size': 2048,
  'intermediate_size': 8192,
  'num_hidden_layers': 16,
  'num_attention_heads': 32,
  'num_key_value_heads': 8,
  'head_dim': 64,
  'hidden_act': 'silu',
  'max_position_embeddings': 131072,
  'rms_norm_eps': 1e-5,
  'rope_theta': 500000.0,
  'rope_scaling': {
    'rope_type': 'llama3',
    'factor': 32.0,
    'low_freq_factor': 1.0,
    'high_freq_factor': 4.0,
    'original_max_position_embeddings': 8192,
  },
  'tie_word_embeddings': True,
  'torch_dtype': 'bfloat16',
}


def write_checkpoint(directory: pathlib.Path, shard_mb: int) -> dict:
  """The HF directory of random bf16 weights, written once (kept when complete)."""
  import ml_dtypes
  import safetensors.numpy

  from fm.convert import llama

  if (directory / 'model.safetensors.index.json').exists():
    return json.loads((directory / 'model.safetensors.index.json').read_text())
  directory.mkdir(parents=True, exist_ok=True)
  c = CONFIG
  D, F, K = c['hidden_size'], c['intermediate_size'], c['head_dim']
  H, G = c['num_attention_heads'], c['num_key_value_heads']
  shapes = {'model.embed_tokens.weight': (c['vocab_size'], D), 'model.norm.weight': (D,)}
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}.'
    shapes.update(
      {
        p + 'input_layernorm.weight': (D,),
        p + 'post_attention_layernorm.weight': (D,),
        p + 'self_attn.q_proj.weight': (H * K, D),
        p + 'self_attn.k_proj.weight': (G * K, D),
        p + 'self_attn.v_proj.weight': (G * K, D),
        p + 'self_attn.o_proj.weight': (D, H * K),
        p + 'mlp.gate_proj.weight': (F, D),
        p + 'mlp.up_proj.weight': (F, D),
        p + 'mlp.down_proj.weight': (D, F),
      }
    )
  fields = llama.config(CONFIG)
  assert {n for _, n, *_ in llama.tensors(fields)} == set(shapes)
  rng = np.random.default_rng(0)
  shards, current, size = [], [], 0
  for name, shape in shapes.items():  # Group names into shards of at most shard_mb.
    nbytes = 2 * int(np.prod(shape))
    if current and size + nbytes > shard_mb << 20:
      shards.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes
  shards.append(current)
  weight_map = {}
  for i, names in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    tensors = {
      n: (rng.standard_normal(shapes[n], np.float32) * 0.02).astype(ml_dtypes.bfloat16)
      for n in names
    }
    safetensors.numpy.save_file(tensors, str(directory / file), metadata={'format': 'pt'})
    weight_map.update(dict.fromkeys(names, file))
    del tensors
  (directory / 'config.json').write_text(json.dumps(CONFIG, indent=1))
  total = sum(2 * int(np.prod(s)) for s in shapes.values())
  index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
  (directory / 'model.safetensors.index.json').write_text(json.dumps(index, indent=1))
  return index


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--shard_mb', type=int, default=1024, help='largest shard written')
  parser.add_argument('--mesh', default='', help="python -m fm.convert import's --mesh")
  parser.add_argument('--devices', type=int, default=1, help='CPU devices of the import process')
  parser.add_argument('--write_only', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir).expanduser().absolute()
  hf = workdir / f'llama-1b-{args.shard_mb}mb'
  if args.write_only:
    write_checkpoint(hf, args.shard_mb)
    return 0
  # Written by another process: the import's peak is measured from this one's children, and a
  # child starts as a copy of this process (whose memory must stay small).
  subprocess.run([sys.executable, __file__, *sys.argv[1:], '--write_only'], check=True)
  index = json.loads((hf / 'model.safetensors.index.json').read_text())
  shard_sizes = [(hf / f).stat().st_size for f in sorted(set(index['weight_map'].values()))]

  out = workdir / 'imported'
  command = [sys.executable, '-m', 'fm.convert', 'import', str(hf), str(out), '--overwrite']
  command += ['--mesh', args.mesh] if args.mesh else []
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={args.devices}'}
  log = workdir / 'import.log'
  start = time.perf_counter()
  with open(log, 'w') as out_file:
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out_file, stderr=out_file)
    _, status, usage = os.wait4(child.pid, 0)  # This child's own peak.
  wall = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status):
    print(log.read_text()[-3000:], file=sys.stderr)
    return 1
  peak = usage.ru_maxrss * 1024

  # The imported tensors are the written ones (a few, read back onto one device).
  import jax
  import safetensors

  from fm import checkpoint

  _, params, _ = checkpoint.restore_local(out / 'checkpoints' / '0')
  flat = jax.tree_util.tree_flatten_with_path(params['params'])[0]
  imported = {checkpoint.key_name(path): leaf for path, leaf in flat}
  for path, name, transposed in (
    ('embed/embedding', 'model.embed_tokens.weight', False),
    ('layer_7/mlp/down', 'model.layers.7.mlp.down_proj.weight', True),
  ):
    with safetensors.safe_open(str(hf / index['weight_map'][name]), 'numpy') as f:
      want = f.get_tensor(name).astype(np.float32)
    assert np.array_equal(np.asarray(imported[path]), want.T if transposed else want), path
  largest_tensor = 2 * CONFIG['vocab_size'] * CONFIG['hidden_size']
  row = {
    'params': index['metadata']['total_size'] // 2,
    'shards': len(shard_sizes),
    'largest_shard': max(shard_sizes),
    'largest_tensor': largest_tensor,
    'mesh': args.mesh or 'one device',
    'wall_s': round(wall, 1),
    'peak_rss': peak,
    'peak_over_largest_shard': round(peak / max(shard_sizes), 2),
  }
  gib = lambda n: f'{n / 2**30:.2f} GiB'
  table = (
    '| checkpoint | shards (largest) | largest tensor | mesh | import wall | peak RSS | '
    'peak / largest shard |\n|---|---|---|---|---|---|---|\n'
    f'| Llama-3.2-1B-shaped, {row["params"] / 1e9:.2f}B params, bf16 | {row["shards"]} '
    f'({gib(row["largest_shard"])}) | {gib(largest_tensor)} | {row["mesh"]} | {wall:.1f} s | '
    f'{gib(peak)} | {row["peak_over_largest_shard"]}x |\n'
  )
  (workdir / 'convert_bench.md').write_text(table)
  (workdir / 'convert_bench.json').write_text(json.dumps(row, indent=1))
  print(table)
  return 0


if __name__ == '__main__':
  sys.exit(main())
