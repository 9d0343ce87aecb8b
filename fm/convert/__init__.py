"""Published models in and out: Hugging Face checkpoints <-> fm checkpoints.

  python -m fm.convert import HF_DIR WORKDIR [--overwrite] [--mesh fsdp=8]
  python -m fm.convert export CHECKPOINT HF_DIR [--overwrite] [--shard_mb 2048]

`import` reads an HF directory (config.json and model.safetensors, or the shards its
model.safetensors.index.json names) one tensor at a time, each placed on `--mesh` and added to
the checkpoint before the next is read (host memory holds about one tensor), and writes
WORKDIR/checkpoints/0 (the params as an orbax PyTree, sharded for the mesh, in their published
dtype; the model's fields, the source and the tokenizer's identity in meta)
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
import gc
import json
import math
import os
import pathlib
import shutil
import sys

import numpy as np

from fm import ConfigError
from fm.convert import bert, gpt2, llama, t5
from fm.data import tokenizer as tokenizer_lib

FAMILIES = (llama, gpt2, bert, t5)
MODEL_TYPES = {kind: family for family in FAMILIES for kind in family.MODEL_TYPES}


def family_of_type(model_type: str, where: str):
  if model_type not in MODEL_TYPES:
    raise ConfigError(
      f'{where}: model_type {model_type!r} is not supported; fm converts '
      f'{", ".join(sorted(MODEL_TYPES))}.'
    )
  return MODEL_TYPES[model_type]


# safetensors' dtype names (its header's "dtype") -> numpy's.
DTYPES = {
  'F64': 'float64',
  'F32': 'float32',
  'F16': 'float16',
  'BF16': 'bfloat16',
  'I64': 'int64',
  'I32': 'int32',
  'I16': 'int16',
  'I8': 'int8',
  'U8': 'uint8',
  'BOOL': 'bool',
}


class Reader:
  """The tensors of an HF directory, each read from its safetensors shard when asked for.

  A shard is an 8-byte little-endian header length, a JSON header (per tensor its dtype,
  shape and byte range after the header) and the tensors' bytes. A tensor is read with plain
  file reads into its own array, not through a memory map, whose pages would stay resident
  while the shard is open: host memory holds the tensor asked for and nothing else."""

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
      self.weight_map = dict.fromkeys(self._header(single)[0], single.name)
    else:
      raise ConfigError(
        f'{self.directory} has neither model.safetensors nor model.safetensors.index.json; '
        f'fm reads safetensors checkpoints.'
      )
    self.headers = {}  # Shard name -> (its tensors' entries, where their bytes start).

  def _header(self, path: pathlib.Path) -> tuple[dict, int]:
    with open(path, 'rb') as f:
      head = f.read(8)
      size = int.from_bytes(head, 'little') if len(head) == 8 else -1
      try:
        header = json.loads(f.read(size)) if 0 < size < 1 << 30 else None
      except ValueError:
        header = None
    if not isinstance(header, dict):
      raise ConfigError(f'{path} is not a safetensors file (its header does not parse).')
    header.pop('__metadata__', None)
    return header, 8 + size

  def get(self, name: str) -> np.ndarray:
    import ml_dtypes  # noqa: F401  (numpy's bfloat16)

    if name not in self.weight_map:  # Older BERT files name LayerNorm params gamma and beta.
      legacy = name.replace('LayerNorm.weight', 'LayerNorm.gamma').replace(
        'LayerNorm.bias', 'LayerNorm.beta'
      )
      name = legacy if legacy in self.weight_map else name
    if name not in self.weight_map:
      raise ConfigError(f'{self.directory} has no tensor {name}; is it a complete checkpoint?')
    shard = self.weight_map[name]
    path = self.directory / shard
    if not path.is_file():
      raise ConfigError(
        f'{path} is missing (model.safetensors.index.json puts {name} there); download it.'
      )
    if shard not in self.headers:
      self.headers[shard] = self._header(path)
    header, data = self.headers[shard]
    entry = header.get(name) or {}
    if entry.get('dtype') not in DTYPES:
      raise ConfigError(
        f'{path} holds no tensor {name} of a dtype fm reads '
        f'({entry.get("dtype") or "absent"}); the index and the shard do not match.'
      )
    begin, end = entry['data_offsets']
    array = np.empty(entry['shape'], np.dtype(DTYPES[entry['dtype']]))
    if array.nbytes != end - begin:
      raise ConfigError(
        f'{path}: tensor {name} has {end - begin} bytes for shape {entry["shape"]}.'
      )
    with open(path, 'rb') as f:
      f.seek(data + begin)
      if f.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
        raise ConfigError(f'{path} ends inside tensor {name}: the file is truncated; download it.')
    return array


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


def _abstract(model_family, model_cfg, mesh=None) -> dict[str, tuple]:
  """fm param path -> (shape, sharding on `mesh` by the default rules), from the model's
  abstract init."""
  import jax

  from fm import models, sharding
  from fm.checkpoint import key_name

  mesh = mesh or sharding.local_mesh()
  sample = models.sample_inputs(model_family, model_cfg, 1, 8)
  with sharding.use(mesh, sharding.DEFAULT_RULES):
    boxed = jax.eval_shape(model_family.Model(model_cfg).init, jax.random.key(0), *sample)
    shardings = sharding.tree_shardings(boxed, mesh, sharding.DEFAULT_RULES)['params']
  flat = jax.tree_util.tree_flatten_with_path(sharding.unbox(boxed)['params'])[0]
  placed = dict(jax.tree_util.tree_flatten_with_path(shardings)[0])
  return {key_name(path): (tuple(leaf.shape), placed[path]) for path, leaf in flat}


def parse_mesh(text: str):
  """`--mesh data=1,fsdp=4,tensor=2` (the trainer's config.mesh axes, 1 where not given; one
  may be -1) -> a mesh of this process's devices."""
  import jax
  import ml_collections

  from fm import sharding

  try:
    axes = {k.strip(): int(v) for k, v in (part.split('=') for part in text.split(','))}
  except ValueError:
    raise ConfigError(
      f'--mesh {text!r} is not a list of axis=size; give e.g. --mesh fsdp=4,tensor=2.'
    ) from None
  unknown = sorted(set(axes) - set(sharding.AXES))
  if unknown:
    raise ConfigError(
      f'--mesh names {", ".join(unknown)}; the axes are {", ".join(sharding.AXES)}.'
    )
  try:
    mesh_cfg = ml_collections.ConfigDict({**dict.fromkeys(sharding.AXES, 1), **axes})
    return sharding.make_mesh(mesh_cfg, jax.local_devices())
  except ConfigError as e:
    raise ConfigError(
      str(e).replace('config.mesh.', '--mesh ').replace('config.mesh', '--mesh')
    ) from None


def _target(
  path: str | pathlib.Path, overwrite: bool, key: str, source: pathlib.Path
) -> pathlib.Path:
  """The directory to write, refused when it is a file, holds `source` (what is converted:
  replacing it would delete it) or exists without `overwrite`."""
  path = pathlib.Path(path).expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise ConfigError(f'{key} {path} is a file; give a directory to write.')
  if path == source or path in source.parents:
    raise ConfigError(f'{key} {path} holds {source}, which is converted; give another directory.')
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


# WORKDIR/tokenizer: the tokenizer's Hugging Face files (an import's, or a run's: train.record).
TOKENIZER = 'tokenizer'
TOKENIZER_FILES = tokenizer_lib.HF_FILES


def _tokenizer(directory: pathlib.Path, vocab_size: int):
  """The HF directory's tokenizer, if it has one; more tokens than the embedding has rows is
  an error."""
  if not (directory / 'tokenizer.json').exists():
    return None
  try:
    tok = tokenizer_lib.load_hf(str(directory))
  except ConfigError as e:  # Named as this command's argument, not as a run's config key.
    raise ConfigError(
      str(e).replace(f'config.data.tokenizer.model={str(directory)!r}', f'HF_DIR {directory}')
    ) from None
  if tok.vocab_size > vocab_size:
    raise ConfigError(
      f'{directory / "tokenizer.json"} has {tok.vocab_size} tokens, more than the {vocab_size} '
      f"rows of the model's embedding (config.json vocab_size); they belong to different models."
    )
  return tok


FLOATS = ('float32', 'bfloat16', 'float16')  # Kept as published; anything else -> float32.
# Small tensors are written together, up to this many bytes besides the one being read.
BUFFER_BYTES = 64 << 20


def import_hf(hf_dir: str, workdir: str, overwrite: bool = False, mesh=None) -> pathlib.Path:
  """Converts an HF directory into WORKDIR/checkpoints/0; returns that checkpoint directory.

  Streams: each tensor is read from its shard, reshaped, placed on `mesh` (a jax Mesh of this
  process's devices, default one device) with the params' own shardings, and added to the
  checkpoint (orbax's partial save), before the next is read; host memory holds about one
  tensor. Tensors keep their published float dtype (a run restores them into its own)."""
  import jax
  from orbax.checkpoint.experimental.v1 import partial as partial_save

  from fm import registry

  reader = Reader(hf_dir)
  family = family_of_type(reader.config.get('model_type'), str(reader.directory / 'config.json'))
  model_family = registry.get('models', family.FAMILY)
  model_cfg = model_family.Config(**family.config(reader.config))
  fields = dataclasses.asdict(model_cfg)
  abstract = _abstract(model_family, model_cfg, mesh)
  entries = [_entry(entry) for entry in family.tensors(fields)]
  missing = sorted(set(abstract) - {p for paths, *_ in entries for p in paths})
  assert not missing, f'{family.__name__} maps no HF tensor to {missing}'
  tok = _tokenizer(reader.directory, model_cfg.vocab_size)
  out = _target(workdir, overwrite, 'WORKDIR', reader.directory.absolute())
  partial = out.with_name(f'.{out.name}.{os.getpid()}.partial')
  shutil.rmtree(partial, ignore_errors=True)
  ckpt = partial / 'checkpoints' / '0'
  ckpt.parent.mkdir(parents=True)
  pending, pending_bytes = {}, 0  # Placed tensors not yet written: at most BUFFER_BYTES more.

  def write(pending: dict) -> None:
    partial_save.save(ckpt, {'params': {'params': _nest(pending)}})
    pending.clear()
    gc.collect()  # Some arrays are freed only with a reference cycle (orbax's, jax's).

  try:
    for fm_paths, hf_name, n_in, transposed in entries:
      shapes = [abstract[p][0] for p in fm_paths]
      want = _hf_shape(shapes, n_in, transposed)
      if pending and pending_bytes + 4 * math.prod(want) > BUFFER_BYTES:  # Written first.
        write(pending)
        pending_bytes = 0
      array = reader.get(hf_name)
      if tuple(array.shape) != want:
        raise ConfigError(
          f'{reader.directory}: tensor {hf_name} has shape {tuple(array.shape)}, but config.json '
          f'makes it {want}; the checkpoint and its config.json do not match.'
        )
      if array.dtype.name not in FLOATS:
        array = array.astype(np.float32)
      for path, part in zip(fm_paths, to_fm(array, shapes, n_in, transposed)):
        pending[path] = jax.make_array_from_callback(
          part.shape, abstract[path][1], part.__getitem__
        )
      pending_bytes += array.nbytes
      del array, part
    write(pending)
    partial_save.finalize(ckpt)
    if tok:
      (partial / TOKENIZER).mkdir(parents=True)
      for name in TOKENIZER_FILES:
        if (reader.directory / name).exists():
          shutil.copy(reader.directory / name, partial / TOKENIZER / name)
    meta = {
      'family': family.FAMILY,
      'model': fields,
      'source': {'hf': str(reader.directory), 'config': reader.config},
      'tokenizer': tok.identity if tok else None,
    }
    (ckpt / 'meta').mkdir()
    (ckpt / 'meta' / 'metadata').write_text(json.dumps(meta, indent=1))
  except BaseException:  # Nothing half-written is left.
    shutil.rmtree(partial, ignore_errors=True)
    raise
  _publish(partial, out)
  return out / 'checkpoints' / '0'


def export_hf(checkpoint_path: str, hf_dir: str, overwrite: bool = False, shard_mb: int = 2048):
  """Writes a checkpoint in HF layout into `hf_dir`; returns the HF config."""
  import jax

  from fm import checkpoint

  ckpt = checkpoint.resolve(checkpoint_path, 'CHECKPOINT')
  meta = checkpoint.read_meta(ckpt)
  name, fields = checkpoint.family(meta), dict(meta['model'])
  if name not in {f.FAMILY for f in FAMILIES}:
    raise ConfigError(
      f'{ckpt} is a {name} model; fm exports {", ".join(sorted({f.FAMILY for f in FAMILIES}))} '
      f'models so far.'
    )
  if fields.get('num_classes'):
    raise ConfigError(
      f'{ckpt} is a classifier (a head of {fields["num_classes"]} classes); export writes '
      f"language models: export its backbone (the run's config.pretrained workdir) instead."
    )
  if fields.get('lora_rank'):
    raise ConfigError(
      f'{ckpt} has LoRA adapters; fold them in first (python -m fm.finetune merge '
      f'{checkpoint_path}) and export the merged checkpoint it writes.'
    )
  out = _target(hf_dir, overwrite, 'HF_DIR', ckpt)
  # Written into the run's workdir by the run (train.record) or import.
  tokenizer_dir = checkpoint.workdir_of(ckpt) / TOKENIZER
  tok = _tokenizer(tokenizer_dir, meta['model']['vocab_size'])
  spm_file = tokenizer_dir / 'tokenizer.model'
  if tok and spm_file.exists():  # A SentencePiece run's: the model is what its checkpoint names.
    tok = tokenizer_lib.SentencePieceTokenizer(spm_file.read_bytes())
  recorded = meta.get('tokenizer') or {}
  if tok and recorded.get('kind') != 'bytes' and recorded and tok.identity != recorded:
    raise ConfigError(
      f'{tokenizer_dir} holds tokenizer {tok.identity}, but {ckpt} was trained with '
      f'{recorded}; move {tokenizer_dir} away and resume the run once to write its own.'
    )
  model, params, _ = checkpoint.restore_local(ckpt)
  fields = dataclasses.asdict(model.model_cfg)  # With the defaults of fields added since.
  family = next((f for f in FAMILIES if f.FAMILY == name and f.exports(fields)), None)
  if family is None:
    raise ConfigError(f'{ckpt}: no HF layout fm writes holds this {name} ({model.model_cfg}).')
  flat = {
    checkpoint.key_name(path): np.asarray(leaf, np.float32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params['params'])[0]
  }
  # HF holds each layer's tensors apart: a scanned model's stacked layers are split.
  fields, flat = family.exported(fields, checkpoint.unstacked(flat))
  partial = out.with_name(f'.{out.name}.{os.getpid()}.partial')
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  try:
    _write_hf(partial, family, fields, flat, shard_mb)
    hf = family.hf_config(fields)
    if tok:
      hf.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
      for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
          shutil.copy(tokenizer_dir / name, partial / name)
    elif meta.get('tokenizer'):  # Said, not refused: the weights are still of use.
      why = (
        tokenizer_lib.no_hf_files(tokenizer_lib.SentencePieceTokenizer(spm_file.read_bytes()))
        if spm_file.exists()
        else 'runs write it as they start: resume the run once to add it'
      )
      print(f'{out}: written without a tokenizer, {tokenizer_dir} has no tokenizer.json ({why}).')
    (partial / 'config.json').write_text(json.dumps(hf, indent=1))
  except BaseException:  # Nothing half-written is left.
    shutil.rmtree(partial, ignore_errors=True)
    raise
  _publish(partial, out)
  return hf


def _write_hf(partial: pathlib.Path, family, fields: dict, flat: dict, shard_mb: int) -> None:
  """The tensors of `family`'s HF layout in safetensors shards of about `shard_mb` (and their
  index when there are several)."""
  import safetensors.numpy

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
  umask = os.umask(0)
  os.umask(umask)
  for shard_name, tensors in zip(names, shards):
    safetensors.numpy.save_file(tensors, str(partial / shard_name), metadata={'format': 'pt'})
    # safetensors creates it readable by its owner alone; as any other file written here.
    os.chmod(partial / shard_name, 0o666 & ~umask)
  if len(shards) > 1:
    index = {
      'metadata': {'total_size': sum(a.nbytes for s in shards for a in s.values())},
      'weight_map': {t: n for n, s in zip(names, shards) for t in s},
    }
    (partial / 'model.safetensors.index.json').write_text(json.dumps(index, indent=1))


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
  read.add_argument(
    '--mesh',
    default='',
    help="the checkpoint's sharding: the trainer's mesh axes over this process's devices, "
    'e.g. fsdp=8 or data=1,fsdp=4,tensor=2 (default: one device)',
  )
  write = commands.add_parser('export', help='an fm checkpoint into an HF directory')
  write.add_argument('checkpoint', help='a workdir (its newest checkpoint) or a checkpoint dir')
  write.add_argument('hf_dir')
  write.add_argument('--overwrite', action='store_true')
  write.add_argument('--shard_mb', type=int, default=2048, help='largest safetensors shard')
  args = parser.parse_args(argv)
  try:
    if args.command == 'import':
      mesh = parse_mesh(args.mesh) if args.mesh else None
      ckpt = import_hf(args.hf_dir, args.workdir, args.overwrite, mesh)
      print(f'imported {args.hf_dir} into {ckpt}')
    else:
      hf = export_hf(args.checkpoint, args.hf_dir, args.overwrite, args.shard_mb)
      print(f'exported {args.checkpoint} as {hf["model_type"]} into {args.hf_dir}')
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0
