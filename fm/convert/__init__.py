"""Published models in and out: Hugging Face checkpoints <-> fm checkpoints.

  python -m fm.convert import HF_DIR WORKDIR [--overwrite]
  python -m fm.convert export CHECKPOINT HF_DIR [--overwrite] [--shard_mb 2048]

`import` reads an HF directory (config.json and model.safetensors, or the shards its
model.safetensors.index.json names), one tensor at a time, and writes WORKDIR/checkpoints/0 (the
params as an orbax PyTree, the model's fields, the source and the tokenizer's identity in meta)
and the tokenizer's files into WORKDIR/tokenizer (--config.data.tokenizer.kind=hf
--config.data.tokenizer.model=WORKDIR/tokenizer): a checkpoint that
`init.from_checkpoint`, `python -m fm.checkpoint inspect` and decoding read like a pretrained
one. `export` writes a checkpoint (a workdir's newest, or one directory) in HF layout:
config.json and float32 safetensors shards with their index. Both write under a temporary name
and rename when whole.

Each family is mapped in one module of this package (llama.py, gpt2.py, bert.py, t5.py: MODEL_TYPES,
FAMILY, OBJECTIVE, `config`, `hf_config`, `exports`, `exported`, `tensors`); this module only
reads, reshapes, splits fused tensors and writes.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys

import numpy as np

from fm import ConfigError
from fm.convert import bert, gpt2, llama, t5

FAMILIES = (llama, gpt2, bert, t5)
MODEL_TYPES = {kind: family for family in FAMILIES for kind in family.MODEL_TYPES}


def family_of_type(model_type: str, where: str):
  if model_type not in MODEL_TYPES:
    raise ConfigError(
      f'{where}: model_type {model_type!r} is not supported; fm converts '
      f'{", ".join(sorted(MODEL_TYPES))}.'
    )
  return MODEL_TYPES[model_type]


class Reader:
  """The tensors of an HF directory, each read from its safetensors shard when asked for."""

  def __init__(self, directory: str | pathlib.Path):
    self.directory = pathlib.Path(directory).expanduser().absolute()
    config = self.directory / 'config.json'
    if not config.is_file():
      raise ConfigError(f'{config} is missing: {self.directory} is not an HF model directory.')
    self.config = json.loads(config.read_text())
    index = self.directory / 'model.safetensors.index.json'
    single = self.directory / 'model.safetensors'
    if index.is_file():
      self.weight_map = json.loads(index.read_text())['weight_map']
    elif single.is_file():
      self.weight_map = dict.fromkeys(self._open(single).keys(), single.name)
    else:
      raise ConfigError(
        f'{self.directory} has neither model.safetensors nor model.safetensors.index.json; '
        f'fm reads safetensors checkpoints.'
      )
    self.shard = (None, None)  # (path, handle): one shard open at a time.

  def _open(self, path: pathlib.Path):
    from safetensors import safe_open

    return safe_open(str(path), framework='numpy')

  def get(self, name: str) -> np.ndarray:
    if name not in self.weight_map:  # Older BERT files name LayerNorm params gamma and beta.
      legacy = name.replace('LayerNorm.weight', 'LayerNorm.gamma').replace(
        'LayerNorm.bias', 'LayerNorm.beta'
      )
      name = legacy if legacy in self.weight_map else name
    if name not in self.weight_map:
      raise ConfigError(f'{self.directory} has no tensor {name}; is it a complete checkpoint?')
    path = self.directory / self.weight_map[name]
    if self.shard[0] != path:
      if not path.is_file():
        raise ConfigError(
          f'{path} is missing (model.safetensors.index.json puts {name} there); download it.'
        )
      self.shard = (path, self._open(path))
    return self.shard[1].get_tensor(name)


def _entry(entry: tuple) -> tuple[tuple[str, ...], str, int, bool]:
  """(fm paths, HF name, n_in, HF holds (outputs, inputs)) of a family's `tensors` entry:
  (fm path or paths fused along the outputs, HF name, n_in[, 'linear' or 'conv1d'])."""
  fm, hf, n_in, *layout = entry
  return (
    (fm,) if isinstance(fm, str) else tuple(fm),
    hf,
    n_in,
    (layout or ['linear'])[0] == 'linear',
  )


def _hf_shape(shapes: list[tuple[int, ...]], n_in: int, transposed: bool) -> tuple[int, ...]:
  """The HF shape of the fm tensors `shapes`: n_in > 0 marks a projection whose first n_in fm
  dims are its inputs, 0 a tensor held as it is, -1 one held flattened (biases)."""
  if n_in > 0:
    ins, outs = math.prod(shapes[0][:n_in]), sum(math.prod(s[n_in:]) for s in shapes)
    return (outs, ins) if transposed else (ins, outs)
  return (sum(math.prod(s) for s in shapes),) if n_in < 0 else tuple(shapes[0])


def to_fm(array: np.ndarray, shapes: list, n_in: int, transposed: bool) -> list[np.ndarray]:
  if n_in == 0:
    return [array.reshape(shapes[0])]
  if n_in > 0:
    array = array.T if transposed else array
  sizes = [math.prod(s[n_in:]) if n_in > 0 else math.prod(s) for s in shapes]
  parts = np.split(array, np.cumsum(sizes)[:-1], axis=-1)
  return [p.reshape(s) for p, s in zip(parts, shapes)]


def to_hf(arrays: list[np.ndarray], n_in: int, transposed: bool) -> np.ndarray:
  if n_in == 0:
    return np.ascontiguousarray(arrays[0])
  if n_in < 0:
    return np.concatenate([a.reshape(-1) for a in arrays])
  joined = np.concatenate([a.reshape(math.prod(a.shape[:n_in]), -1) for a in arrays], axis=1)
  return np.ascontiguousarray(joined.T if transposed else joined)


def _nest(flat: dict[str, np.ndarray]) -> dict:
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _shapes(model_family, model_cfg) -> dict[str, tuple[int, ...]]:
  """fm param path -> shape, from the model's abstract init."""
  import jax
  import jax.numpy as jnp

  from fm import sharding
  from fm.checkpoint import key_name

  sample = model_family.inputs(model_cfg, jnp.zeros((1, 8), jnp.int32))
  abstract = jax.eval_shape(model_family.Model(model_cfg).init, jax.random.key(0), *sample)
  params = sharding.unbox(abstract)['params']
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {key_name(path): tuple(leaf.shape) for path, leaf in flat}


def _target(path: str | pathlib.Path, overwrite: bool, key: str) -> pathlib.Path:
  path = pathlib.Path(path).expanduser().absolute()
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise ConfigError(f'{key} {path} exists; give another or add --overwrite to replace it.')
  return path


def _publish(partial: pathlib.Path, final: pathlib.Path) -> None:
  """Renames a whole `partial` directory to `final`, replacing what was there."""
  old = final.with_name(f'.{final.name}.{os.getpid()}.old')
  if final.exists():
    final.rename(old)
  partial.rename(final)
  shutil.rmtree(old, ignore_errors=True)


TOKENIZER = 'tokenizer'  # WORKDIR/tokenizer: --config.data.tokenizer.model with kind=hf.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')


def _tokenizer(directory: pathlib.Path, vocab_size: int):
  """The HF directory's tokenizer, if it has one; more tokens than the embedding has rows is
  an error."""
  from fm.data import tokenizer as tokenizer_lib

  if not (directory / 'tokenizer.json').exists():
    return None
  tok = tokenizer_lib.load_hf(str(directory))
  if tok.vocab_size > vocab_size:
    raise ConfigError(
      f'{directory / "tokenizer.json"} has {tok.vocab_size} tokens, more than the {vocab_size} '
      f"rows of the model's embedding (config.json vocab_size); they belong to different models."
    )
  return tok


def import_hf(hf_dir: str, workdir: str, overwrite: bool = False) -> pathlib.Path:
  """Converts an HF directory into WORKDIR/checkpoints/0; returns that checkpoint directory."""
  import orbax.checkpoint as ocp

  from fm import registry

  reader = Reader(hf_dir)
  family = family_of_type(reader.config.get('model_type'), str(reader.directory / 'config.json'))
  model_family = registry.get('models', family.FAMILY)
  model_cfg = model_family.Config(**family.config(reader.config))
  fields = dataclasses.asdict(model_cfg)
  shapes = _shapes(model_family, model_cfg)
  flat = {}
  for entry in family.tensors(fields):
    fm_paths, hf_name, n_in, transposed = _entry(entry)
    want = _hf_shape([shapes[p] for p in fm_paths], n_in, transposed)
    array = reader.get(hf_name)
    if tuple(array.shape) != want:
      raise ConfigError(
        f'{reader.directory}: tensor {hf_name} has shape {tuple(array.shape)}, but config.json '
        f'makes it {want}; the checkpoint and its config.json do not match.'
      )
    parts = to_fm(array.astype(np.float32), [shapes[p] for p in fm_paths], n_in, transposed)
    flat.update(zip(fm_paths, parts))
  missing = sorted(set(shapes) - set(flat))
  assert not missing, f'{family.__name__} maps no HF tensor to {missing}'
  tok = _tokenizer(reader.directory, model_cfg.vocab_size)
  out = _target(workdir, overwrite, 'WORKDIR')
  partial = out.with_name(f'.{out.name}.{os.getpid()}.partial')
  shutil.rmtree(partial, ignore_errors=True)
  ckpt = partial / 'checkpoints' / '0'
  if tok:
    (partial / TOKENIZER).mkdir(parents=True)
    for name in TOKENIZER_FILES:
      if (reader.directory / name).exists():
        shutil.copy(reader.directory / name, partial / TOKENIZER / name)
  ocp.PyTreeCheckpointer().save(ckpt / 'state', {'params': {'params': _nest(flat)}})
  meta = {
    'family': family.FAMILY,
    'model': fields,
    'source': {'hf': str(reader.directory), 'config': reader.config},
    'tokenizer': tok.identity if tok else None,
  }
  (ckpt / 'meta').mkdir()
  (ckpt / 'meta' / 'metadata').write_text(json.dumps(meta, indent=1))
  _publish(partial, out)
  return out / 'checkpoints' / '0'


def export_hf(checkpoint_path: str, hf_dir: str, overwrite: bool = False, shard_mb: int = 2048):
  """Writes a checkpoint in HF layout into `hf_dir`; returns the HF config."""
  import jax
  import safetensors.numpy

  from fm import checkpoint

  ckpt = checkpoint.resolve(checkpoint_path, 'CHECKPOINT')
  meta = checkpoint.read_meta(ckpt)
  name, fields = checkpoint.family(meta), dict(meta['model'])
  if name not in {f.FAMILY for f in FAMILIES}:
    raise ConfigError(
      f'{ckpt} is a {name} model; fm exports {", ".join(sorted({f.FAMILY for f in FAMILIES}))} '
      f'models so far.'
    )
  if fields.get('lora_rank') or fields.get('num_classes'):
    raise ConfigError(
      f'{ckpt} has LoRA adapters or a classification head; export a pretrained model, or merge '
      f'adapters first (python -m fm.finetune merge).'
    )
  out = _target(hf_dir, overwrite, 'HF_DIR')
  model, params, _ = checkpoint.restore_local(ckpt)
  fields = dataclasses.asdict(model.model_cfg)  # With the defaults of fields added since.
  family = next((f for f in FAMILIES if f.FAMILY == name and f.exports(fields)), None)
  if family is None:
    raise ConfigError(f'{ckpt}: no HF layout fm writes holds this {name} ({model.model_cfg}).')
  flat = {
    checkpoint.key_name(path): np.asarray(leaf, np.float32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params['params'])[0]
  }
  fields, flat = family.exported(fields, flat)
  partial = out.with_name(f'.{out.name}.{os.getpid()}.partial')
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  shards, current, size = [], {}, 0
  for entry in family.tensors(fields):
    fm_paths, hf_name, n_in, transposed = _entry(entry)
    array = to_hf([flat[p] for p in fm_paths], n_in, transposed)
    if current and size + array.nbytes > shard_mb << 20:
      shards.append(current)
      current, size = {}, 0
    current[hf_name], size = array, size + array.nbytes
  shards.append(current)
  names = (
    ['model.safetensors']
    if len(shards) == 1
    else [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  )
  for shard_name, tensors in zip(names, shards):
    safetensors.numpy.save_file(tensors, str(partial / shard_name), metadata={'format': 'pt'})
  if len(shards) > 1:
    index = {
      'metadata': {'total_size': sum(a.nbytes for s in shards for a in s.values())},
      'weight_map': {t: n for n, s in zip(names, shards) for t in s},
    }
    (partial / 'model.safetensors.index.json').write_text(json.dumps(index, indent=1))
  hf = family.hf_config(fields)
  tokenizer_dir = ckpt.parents[1] / TOKENIZER
  if (meta.get('tokenizer') or {}).get('kind') == 'hf' and tokenizer_dir.is_dir():
    tok = _tokenizer(tokenizer_dir, fields['vocab_size'])
    hf.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    for name in TOKENIZER_FILES:
      if (tokenizer_dir / name).exists():
        shutil.copy(tokenizer_dir / name, partial / name)
  (partial / 'config.json').write_text(json.dumps(hf, indent=1))
  _publish(partial, out)
  return hf


def run_config(hf_dir: str, key: str):
  """The resolved pretraining config an HF model stands for as a backbone (`pretrained.hf`): its
  family and fields, its family's objective and its tokenizer (kind hf). Reads config.json,
  the index and tokenizer files, no tensor."""
  import ml_collections

  from fm import configs

  reader = Reader(hf_dir)
  family = family_of_type(reader.config.get('model_type'), f'{key}={hf_dir!r}')
  fields = family.config(reader.config)
  if not (reader.directory / 'tokenizer.json').exists():
    raise ConfigError(
      f'{key}={hf_dir!r} has no tokenizer.json; a backbone is fine-tuned with its own tokenizer.'
    )
  config = ml_collections.ConfigDict(
    {
      'objective': family.OBJECTIVE,
      'model': {'name': family.FAMILY, **fields},
      'data': {
        'dataset': 'prepared',
        'seq_len': min(fields['max_len'], 2048),
        'tokenizer': {'kind': 'hf', 'model': str(reader.directory)},
      },
      'train': {'steps': 0, 'global_batch': 1},  # Trained elsewhere: imported.
      'optim': {'lr': 0.0},
    }
  )
  return configs.resolve(config)


def imported(hf_dir: str, workdir: pathlib.Path, key: str) -> pathlib.Path:
  """The checkpoint of `hf_dir` imported into `workdir`: made once (by process 0), reused while
  it comes from the same directory."""
  import jax
  from jax.experimental import multihost_utils

  from fm import checkpoint
  from fm import metrics as metrics_lib

  source = str(pathlib.Path(hf_dir).expanduser().absolute())
  workdir = pathlib.Path(workdir)
  ckpt = workdir / 'checkpoints' / '0'
  meta = checkpoint.read_meta(ckpt) if (ckpt / 'state').is_dir() else {}
  if (meta.get('source') or {}).get('hf') != source:
    if workdir.exists() and any(workdir.iterdir()) and not meta.get('source'):
      raise ConfigError(
        f'{key}={hf_dir!r}: {workdir} holds another run; move it away to import there.'
      )
    metrics_lib.log(f'{key}: importing {hf_dir} into {workdir}')
    if jax.process_index() == 0:
      import_hf(hf_dir, workdir, overwrite=True)
    multihost_utils.sync_global_devices(f'fm-import-{workdir}')
  return ckpt


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m fm.convert', description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  read = commands.add_parser('import', help='an HF directory into an fm workdir')
  read.add_argument('hf_dir')
  read.add_argument('workdir')
  read.add_argument('--overwrite', action='store_true')
  write = commands.add_parser('export', help='an fm checkpoint into an HF directory')
  write.add_argument('checkpoint', help='a workdir (its newest checkpoint) or a checkpoint dir')
  write.add_argument('hf_dir')
  write.add_argument('--overwrite', action='store_true')
  write.add_argument('--shard_mb', type=int, default=2048, help='largest safetensors shard')
  args = parser.parse_args(argv)
  try:
    if args.command == 'import':
      ckpt = import_hf(args.hf_dir, args.workdir, args.overwrite)
      print(f'imported {args.hf_dir} into {ckpt}')
    else:
      hf = export_hf(args.checkpoint, args.hf_dir, args.overwrite, args.shard_mb)
      print(f'exported {args.checkpoint} as {hf["model_type"]} into {args.hf_dir}')
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0
