"""Checkpoints: train state, data-iterator state and metadata, saved asynchronously by orbax.

A checkpoint is `WORKDIR/checkpoints/<step>/` with three items: `state` (params, optimizer
state, step; an orbax PyTree, restorable onto any mesh), `data_state` (the data iterator's
position, the same on every process: fm/data/pipeline.py's elastic iterators, so it restores
onto any number of processes) and `meta` (the resolved config and tokenizer identity as JSON). Orbax writes
to a temporary directory and renames it when complete, so a killed process never leaves a
half checkpoint that looks whole. No pickle anywhere.

  python -m fm.checkpoint inspect PATH   # step, config summary, params, without loading arrays
"""

import json
import os
import pathlib
import shutil
import signal
import sys
from typing import Any

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from fm import ConfigError, models, registry, sharding


def with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def _restore_args(target: Any) -> Any:
  return jax.tree.map(
    lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), target
  )


def _leaves(tree: Any) -> dict[tuple[str, ...], tuple]:
  """`tree`'s leaves by path as names, whatever the node types (a saved named tuple reads back
  as a dict) -> their shapes."""
  name = lambda k: str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(name(k) for k in path): tuple(getattr(v, 'shape', ())) for path, v in leaves}


def _other_state(path: pathlib.Path, target: Any) -> str:
  """'' when the checkpointed state at `path` has `target`'s entries and params (paths and
  shapes), else what differs, read from the checkpoint's own metadata (nothing restored)."""
  if not isinstance(target, dict) or 'params' not in target:
    return ''
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Not orbax's warning that fm writes no step metadata.
  try:
    saved = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  except Exception:  # Unreadable: left to the restore, which moves a broken one aside.
    return ''
  finally:
    logging.set_verbosity(verbosity)
  if not isinstance(saved, dict) or 'params' not in saved:
    return ''
  if set(saved) != set(target):
    return f"holds the state entries {sorted(saved)}, not this run's {sorted(target)}"
  held, wanted = _leaves(saved['params']), _leaves(target['params'])
  missing = sorted(set(wanted) - set(held))
  if missing:
    return f'holds the params of another model ({"/".join(missing[0])} missing)'
  for k in sorted(wanted):
    if held[k] != wanted[k]:
      return (
        f'holds the params of another model ({"/".join(k)} of shape {held[k]}, not {wanted[k]})'
      )
  extra = sorted(set(held) - set(wanted))
  if extra:
    return f'holds the params of another model ({"/".join(extra[0])} besides)'
  return ''


class Checkpointer:
  """Saves every `every_steps` and on demand; restores the latest complete checkpoint."""

  def __init__(self, workdir: pathlib.Path, ckpt_cfg, log=print):
    """`ckpt_cfg`: config.checkpoint (`every_steps`, `keep`)."""
    self.directory = pathlib.Path(workdir).absolute() / 'checkpoints'
    self.every = ckpt_cfg.every_steps
    self.log = log
    options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep,
      enable_async_checkpointing=True,
      create=True,
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def should_save(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def save(self, step: int, state: Any, data_iter, meta: dict) -> None:
    """Starts an asynchronous save; the data iterator's state is captured before returning."""
    if step in self.manager.all_steps():
      return
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data_state=ocp.args.JsonSave(data_iter.get_state()),
        meta=ocp.args.JsonSave(meta),
      ),
    )

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore_latest(self, target: Any, data_iter) -> tuple[Any, int] | None:
    """Restores the newest readable checkpoint onto `target`'s shardings, or returns None.

    A corrupt or truncated checkpoint is moved aside to `checkpoints-corrupt/` (nothing is
    deleted) with a warning naming it, and the one before is tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      path = self.directory / str(step)
      if (path / 'data').is_dir() and not (path / 'data_state').exists():
        raise ConfigError(
          f'{path} keeps the data position per process, as older fm versions did; resume it '
          f'with the version that wrote it, or start this run in a new workdir.'
        )
      # A state of another configuration (another model, or train.select keeping the best
      # params or not) is refused in one sentence rather than taken for a broken checkpoint.
      # The select check reads the run's own meta, so it holds without orbax's metadata too.
      try:
        held = read_meta(path).get('config', {}).get('train', {}).get('select', '')
      except (OSError, ValueError) as e:  # A truncated or damaged meta: the checkpoint is.
        self._move_aside(step, e)
        continue
      if isinstance(target, dict) and bool(held) != ('best_params' in target):
        other = f'was saved with config.train.select={held!r}; resume it with that value'
      else:
        other = _other_state(path / 'state', target)
        other = other and f'{other}; resume it with the config that wrote it'
      if other:
        raise ConfigError(
          f'{path} {other}, or start this run in a new workdir (its config.json is the '
          f'configuration that wrote it).'
        )
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target)),
            data_state=ocp.args.JsonRestore(),
          ),
        )
        data_iter.set_state(restored['data_state'])
        return restored['state'], step
      except Exception as e:  # Any unreadable file.
        self._move_aside(step, e)
    return None

  def _move_aside(self, step: int, error: Exception) -> None:
    """Moves the unreadable checkpoint of `step` to `checkpoints-corrupt/`, saying why."""
    path = self.directory / str(step)
    self.log(
      f'warning: checkpoint {path} is unreadable ({type(error).__name__}: '
      f'{str(error).splitlines()[0][:200] if str(error) else ""}); moving it to '
      f'{self.directory.parent / "checkpoints-corrupt"} and trying the previous one.'
    )
    multihost_utils.sync_global_devices(f'fm-corrupt-{step}')
    if jax.process_index() == 0:
      aside = self.directory.parent / 'checkpoints-corrupt' / str(step)
      aside.parent.mkdir(exist_ok=True)
      shutil.rmtree(aside, ignore_errors=True)
      shutil.move(str(path), str(aside))
    multihost_utils.sync_global_devices(f'fm-corrupt-moved-{step}')
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class Preemption:
  """SIGTERM/SIGINT ask the loop to save at the next step boundary and exit cleanly.

  With several processes every host must stop at the same step (one alone would leave the
  others in the next step's collectives): SIGTERM is left to JAX's preemption notifier, which
  agrees on the step with the other hosts through the coordination service, and a SIGINT is
  passed on to it as a SIGTERM. With one process, a notice that comes in the loop's last step or
  after it (during the final evaluation) is not lost: the run finishes, and the next loop in
  this process (a study's next run) starts with it and stops before training; with several, the
  agreed step is one that every host's next loop reaches together, if it goes that far.
  """

  unanswered: str | None = None  # Such a notice's signal name, for the next loop.

  def __init__(self):
    self.requested = Preemption.unanswered is not None
    self.signal, Preemption.unanswered = Preemption.unanswered or 'preemption notice', None
    self.synced = jax.process_count() > 1 and _preemption_service()
    self.previous = {}
    for sig in (signal.SIGINT,) if self.synced else (signal.SIGTERM, signal.SIGINT):
      self.previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name
    if self.synced:  # To JAX's notifier, which tells every host.
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.requested = True

  def reached(self, step: int) -> bool:
    if self.synced and multihost_utils.reached_preemption_sync_point(step):
      self.requested = True
    return self.requested

  def carried(self) -> bool:
    """Whether a notice came after an earlier loop's last step, on any process: then every
    process stops before training (one alone would leave the others in a collective)."""
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.array(self.requested))
      return bool(np.any(flags))
    return self.requested

  def answered(self) -> None:
    """The loop saved and stopped for the notice."""
    self.requested = False

  def restore_handlers(self) -> None:
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)
    if self.requested:
      Preemption.unanswered = self.signal


def _preemption_service() -> bool:
  """Whether JAX's preemption sync manager runs (jax.distributed.initialize starts it)."""
  from jax._src import distributed

  return getattr(distributed.global_state, 'preemption_sync_manager', None) is not None


# ---------------------------------------------------------------------------------------------
# Warm start: pretrained backbone params into a fresh fine-tuning state.
# ---------------------------------------------------------------------------------------------
def _steps(path: pathlib.Path) -> list[int]:
  root = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  return sorted(int(p.name) for p in root.glob('*') if p.name.isdigit() and (p / 'state').is_dir())


def latest_step(workdir: str | pathlib.Path) -> int:
  """The step of a workdir's newest complete checkpoint, 0 if it has none."""
  return max(_steps(pathlib.Path(workdir).expanduser().absolute()), default=0)


def resolve(path: str | pathlib.Path, key: str = 'config.init.from_checkpoint') -> pathlib.Path:
  """A workdir (its latest checkpoint) or one checkpoint directory -> the checkpoint directory."""
  path = pathlib.Path(path).expanduser().absolute()
  if (path / 'state').is_dir():
    return path
  steps = _steps(path)
  if not steps:
    raise ConfigError(
      f'{key}={str(path)!r} holds no checkpoint; give a workdir of a finished '
      f'run or a checkpoint directory like WORKDIR/checkpoints/N.'
    )
  root = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  return root / str(steps[-1])


def workdir_of(ckpt: pathlib.Path) -> pathlib.Path:
  """The run directory a checkpoint belongs to: WORKDIR of WORKDIR/checkpoints/STEP, else the
  directory holding it (WORKDIR of WORKDIR/merged)."""
  return ckpt.parents[1] if ckpt.parent.name == 'checkpoints' else ckpt.parent


def read_meta(ckpt: pathlib.Path) -> dict[str, Any]:
  """The resolved config, model config and tokenizer identity stored with a checkpoint."""
  meta_file = ckpt / 'meta' / 'metadata'
  return json.loads(meta_file.read_text()) if meta_file.exists() else {}


def family(meta: dict) -> str:
  """The model family (a module of fm/models/) of a checkpoint's run."""
  return meta.get('family') or meta['config']['model']['name']


def restore_model(ckpt: pathlib.Path, mesh, rules) -> tuple[nn.Module, Any, dict]:
  """(model, params, meta) of a checkpoint: its family's model with the stored fields, and the
  params restored straight onto `mesh` with the logical `rules`. Call inside
  `sharding.use(mesh, rules)`."""
  meta = read_meta(ckpt)
  model_family = registry.get('models', family(meta))
  # JSON turned tuples (lora_targets, rope_scaling) into lists.
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta['model'].items()}
  model_cfg = model_family.Config(**fields)
  model = model_family.Model(model_cfg)
  sample = models.sample_inputs(model_family, model_cfg, 1, 16)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *sample)
  target = with_shardings(sharding.unbox(boxed), sharding.tree_shardings(boxed, mesh, rules))
  return model, restore_params(ckpt, target), meta


def restore_local(ckpt: pathlib.Path) -> tuple[nn.Module, Any, dict]:
  """`restore_model` onto one device (sharding.local_mesh) with the default rules."""
  mesh = sharding.local_mesh()
  with sharding.use(mesh, sharding.DEFAULT_RULES):
    return restore_model(ckpt, mesh, sharding.DEFAULT_RULES)


def restore_params(ckpt: pathlib.Path, target: Any) -> Any:
  """The checkpoint's params named in `target` (the rest of the state is not read), each
  restored onto its sharding in `target`."""
  # The item's own handler: a Checkpointer would look for step metadata in the item directory
  # and warn that it is missing.
  return ocp.PyTreeCheckpointHandler().restore(
    ckpt / 'state',
    args=ocp.args.PyTreeRestore(
      item={'params': target}, restore_args={'params': _restore_args(target)}, partial_restore=True
    ),
  )['params']


def key_name(path) -> str:
  """A param's name from its key path: 'params/layer_0/attn/query'."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _flat(tree: Any) -> dict[str, Any]:
  return {key_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def param_metadata(ckpt: pathlib.Path) -> dict[str, Any]:
  """Shapes and dtypes of the checkpoint's params, read from metadata only."""
  return _flat(ocp.PyTreeCheckpointHandler().metadata(ckpt / 'state').tree['params'])


def load_backbone(path: str, params: Any, log=print) -> Any:
  """Returns `params` with every entry that the checkpoint also has replaced by its value.

  Entries only in `params` (new heads, adapters) keep their fresh init; entries only in the
  checkpoint (say an LM head) are ignored. Layers match across the two layouts (a scanned
  model's stacked `layers/...`, an unscanned one's `layer_0/...`, `layer_1/...`: an imported
  model into `model.scan_layers=true` and back). A shape mismatch is a ConfigError naming the
  param and both shapes. Arrays are restored straight onto `params`' shardings.
  """
  ckpt = resolve(path)
  saved = param_metadata(ckpt)
  ours = _flat(params)
  shared = [k for k in ours if k in saved]
  # Ours in the other layer layout: the saved params that make each, stacked or sliced.
  relaid = {k: _other_layout(k, saved) for k in ours if k not in saved}
  relaid = {k: v for k, v in relaid.items() if v}
  if not shared and not relaid:
    raise ConfigError(
      f'config.init.from_checkpoint={path!r}: no param names in common with this '
      f'model (checkpoint has e.g. {next(iter(saved), None)!r}, model has '
      f'{next(iter(ours), None)!r}); point it at a run of the same model family.'
    )
  held = {k: tuple(saved[k].shape) for k in shared}
  for k, (names, index) in relaid.items():
    one = tuple(saved[names[0]].shape)
    held[k] = one[1:] if index is not None else (len(names), *one)
  for k, shape in held.items():
    if shape != tuple(ours[k].shape):
      raise ConfigError(
        f'config.init.from_checkpoint={path!r}: param {k} has shape {shape} in the checkpoint '
        f'but {tuple(ours[k].shape)} in this model; use the same model variant and vocabulary.'
      )
  # Partial restore of just the shared params, each onto the sharding of its new home.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = [key_name(p) for p, _ in leaves]
  target = jax.tree_util.tree_unflatten(
    treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for _, x in leaves]
  )
  got = _flat(restore_params(ckpt, _prune(target, set(shared)))) if shared else {}
  if relaid:
    host = _restore_on_host(ckpt, {n for names, _ in relaid.values() for n in names})
    for k, (names, index) in relaid.items():
      value = host[names[0]][index] if index is not None else np.stack([host[n] for n in names])
      value = value.astype(ours[k].dtype)
      got[k] = jax.make_array_from_callback(value.shape, ours[k].sharding, lambda i, v=value: v[i])
  out = [got.get(k, x) for k, (_, x) in zip(keys, leaves)]
  fresh = [k for k in keys if k not in got]
  log(
    f'warm start: {len(got)} params from {ckpt}'
    + (f' ({len(relaid)} of them from its layers in the other layout)' if relaid else '')
    + (f'; freshly initialised: {", ".join(fresh)}' if fresh else '')
  )
  return jax.tree_util.tree_unflatten(treedef, out)


LAYERS = 'layers'  # nn.scan's params: every layer's stacked on a leading axis.


def _other_layout(name: str, saved: dict) -> tuple[list[str], int | None] | None:
  """The saved params that make our param `name` in the other layer layout: (their names,
  None) stacked in order when ours is scanned; ([the stack's name], i) its i-th layer when ours
  is not; None when the checkpoint has neither."""
  if LAYERS in name.split('/'):
    names = []
    while _in_layer(name, len(names)) in saved:
      names.append(_in_layer(name, len(names)))
    return (names, None) if names else None
  parts = name.split('/')
  for at, part in enumerate(parts):
    if part.startswith('layer_') and part[6:].isdigit():
      stack = '/'.join([*parts[:at], LAYERS, *parts[at + 1 :]])
      return ([stack], int(part[6:])) if stack in saved else None
  return None


def _in_layer(name: str, i: int) -> str:
  """A scanned model's param name (`.../layers/...`) as layer `i` of an unscanned one names it."""
  parts = name.split('/')
  at = parts.index(LAYERS)
  return '/'.join([*parts[:at], f'layer_{i}', *parts[at + 1 :]])


def unstacked(flat: dict[str, Any]) -> dict[str, Any]:
  """Flat params of a scanned model (`.../layers/...`, the layers on axis 0) named as the
  unscanned model names them (`.../layer_0/...`, `.../layer_1/...`)."""
  out = {}
  for name, value in flat.items():
    if LAYERS in name.split('/'):
      out.update({_in_layer(name, i): value[i] for i in range(value.shape[0])})
    else:
      out[name] = value
  return out


def _restore_on_host(ckpt: pathlib.Path, names: set[str]) -> dict[str, np.ndarray]:
  """The checkpoint's params of these flat names, as numpy arrays."""
  handler = ocp.PyTreeCheckpointHandler()
  tree = _prune(handler.metadata(ckpt / 'state').tree['params'], names)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = handler.restore(
    ckpt / 'state',
    args=ocp.args.PyTreeRestore(
      item={'params': tree}, restore_args={'params': restore_args}, partial_restore=True
    ),
  )['params']
  return _flat(restored)


def _prune(tree: Any, keep: set[str], prefix: str = '') -> Any:
  """The nested dict `tree` restricted to the flat keys in `keep`."""
  out = {}
  for k, v in tree.items():
    key = f'{prefix}/{k}' if prefix else str(k)
    if isinstance(v, dict):
      sub = _prune(v, keep, key)
      if sub:
        out[k] = sub
    elif key in keep:
      out[k] = v
  return out


# ---------------------------------------------------------------------------------------------
# Inspection.
# ---------------------------------------------------------------------------------------------
def inspect(path: str) -> str:
  ckpt = resolve(path)
  meta = read_meta(ckpt)
  params = param_metadata(ckpt)
  total = sum(int(np.prod(v.shape)) for v in params.values())
  run = meta.get('config', {})
  # An imported checkpoint (fm/convert) has the family, the model's fields and the source.
  model = run.get('model') or {'name': meta.get('family'), **meta.get('model', {})}
  lines = [
    f'checkpoint {ckpt}',
    f'step {ckpt.name}',
    *([f'imported from {meta["source"]["hf"]}'] if meta.get('source') else []),
    f'model {model}',
    f'objective {run.get("objective")}',
    f'data {run.get("data", {}).get("dataset")}  tokenizer {meta.get("tokenizer")}',
    f'params {total:,} in {len(params)} arrays',
  ]
  width = max(map(len, params), default=0)
  lines += [f'  {k:<{width}}  {str(tuple(v.shape)):<20} {v.dtype}' for k, v in params.items()]
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  logging.set_verbosity(logging.ERROR)
  usage = 'usage: python -m fm.checkpoint inspect PATH (a workdir or a checkpoint directory)'
  if argv[1:] in (['-h'], ['--help']):
    print(usage)
    return 0
  if len(argv) != 3 or argv[1] != 'inspect':
    print(usage, file=sys.stderr)
    return 2
  try:
    print(inspect(argv[2]))
  except ConfigError as e:
    print(f'error: {str(e).replace("config.init.from_checkpoint", "PATH")}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
