"""The trainer: one function read top to bottom.

Sections: Config, Shard, Step (in `build`), then Mesh, Data, Model, Eval, Loop. The step is pure and jitted once
with explicit shardings; logging and evals live only in the loop.
"""

from collections.abc import Callable
import contextlib
import functools
import importlib.util
import json
import math
import pathlib
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fm import ConfigError, checkpoint, optim, registry, sharding
from fm import metrics as metrics_lib
from fm.data import pipeline, sources

# {'step', 'params', 'opt_state', 'nonfinite' (count of non-finite steps), 'first_nonfinite'
# (the first such step, -1 if none)}.
State = dict[str, Any]


# =============================================================================================
# Config
# =============================================================================================
def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None):
  """The model module and its Config: the named variant, then any `config.model` overrides."""
  module = registry.get('models', config.model.name)
  variant = config.model.get('variant', 'tiny')
  if variant not in module.VARIANTS:
    raise ConfigError(
      f'config.model.variant={variant!r} is unknown for {config.model.name}; '
      f'choose one of: {", ".join(module.VARIANTS)}.'
    )
  fields = dict(module.VARIANTS[variant])
  known = {f for f in module.Config.__dataclass_fields__}
  for key, value in config.model.items():
    if key in ('name', 'variant'):
      continue
    if key not in known:
      raise ConfigError(
        f'config.model.{key} is not a field of {config.model.name}.Config; '
        f'valid keys: {", ".join(sorted(known))}.'
      )
    fields[key] = value
  if vocab_size is not None:
    needed = -(-vocab_size // 128) * 128  # Padded for even sharding.
    if 'vocab_size' not in fields:
      fields['vocab_size'] = needed
    elif fields['vocab_size'] < vocab_size:  # A published shape (or an override) pins it.
      raise ConfigError(
        f'config.model.vocab_size={fields["vocab_size"]} (of variant '
        f'{variant!r} or the config) is smaller than the {vocab_size} ids the '
        f'tokenizer and objective need; raise it or drop the override.'
      )
  return module, module.Config(**fields)


def validate(
  config: ml_collections.ConfigDict,
  mesh_shape: dict[str, int],
  batch_ways: int,
  processes: int | None = None,
):
  """Checks that need no data or compilation, run identically on every host (`processes`:
  how many hosts the batch is read by; default this job's)."""
  objective = registry.get('objectives', config.objective)
  _, model_cfg = model_config(config)
  if config.model.name not in objective.COMPATIBLE_MODELS:
    raise ConfigError(
      f'config.objective={config.objective!r} does not work with '
      f'config.model.name={config.model.name!r}; compatible models: '
      f'{", ".join(objective.COMPATIBLE_MODELS)}.'
    )
  if hasattr(objective, 'validate'):  # The objective's own arguments.
    objective.validate(config.get('objective_args', ml_collections.ConfigDict()))
  for name in getattr(objective, 'FROZEN', ()):
    check_pretrained_spec(
      config.get('objective_args', {}).get(name), f'config.objective_args.{name}'
    )
  if config.data.dataset not in sources.SOURCES and config.data.dataset != 'files':
    sources.load(config.data.dataset)  # Raises, listing the choices.
  policy = config.train.get('nonfinite', 'raise')
  if policy not in NONFINITE_POLICIES:
    raise ConfigError(f'config.train.nonfinite={policy!r} is unknown; choose raise or skip.')
  seq_len = config.data.seq_len
  if seq_len > model_cfg.max_len:
    raise ConfigError(
      f'config.data.seq_len={seq_len} exceeds the model max_len={model_cfg.max_len} '
      f'of variant {config.model.get("variant")!r}; lower seq_len or set '
      f'config.model.max_len.'
    )
  check_batch(config, mesh_shape, batch_ways, processes)
  return objective


def check_batch(
  config, mesh_shape: dict[str, int], batch_ways: int, processes: int | None = None
) -> None:
  """The global batch splits over the batch shards, the processes and the microbatches."""
  batch = config.train.global_batch
  processes = processes or jax.process_count()
  if batch % batch_ways or batch % processes:
    raise ConfigError(
      f'config.train.global_batch={batch} is not divisible by the {batch_ways} '
      f'batch shards of the mesh ({mesh_shape}) and {processes} '
      f'process(es); use a multiple of {math.lcm(batch_ways, processes)}.'
    )
  k = config.train.get('microbatches', 1)
  if k < 1 or batch % (k * batch_ways):
    raise ConfigError(
      f'config.train.microbatches={k} must be >= 1 and split '
      f'config.train.global_batch={batch} into slices that the {batch_ways} batch '
      f'shards divide; use a divisor of {batch // batch_ways}.'
    )


def example_inputs(
  objective, batch_size: int, seq_len: int, objective_args: ml_collections.ConfigDict | None = None
) -> tuple:
  """Zero model inputs for init: the objective's own (an encoder-decoder's differ), else
  (tokens, segment_ids, positions)."""
  if hasattr(objective, 'example_inputs'):
    return objective.example_inputs(
      batch_size, seq_len, objective_args or ml_collections.ConfigDict()
    )
  return tuple(jnp.zeros((batch_size, seq_len), jnp.int32) for _ in range(3))


def state_shardings(
  model: nn.Module, tx: optax.GradientTransformation, sample: dict, mesh: jax.sharding.Mesh, rules
) -> tuple[State, State]:
  """Abstract train state and its shardings, from the params' logical axes (nothing allocated)."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), *sample)
  param_sh = sharding.tree_shardings(boxed, mesh, rules)
  params = sharding.unbox(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Every leaf gets a NamedSharding, scalar counts included, so the step never reshards them.
  opt_sh = _like_params(opt_state, params, param_sh, replicated)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = {
    'step': scalar,
    'params': params,
    'opt_state': opt_state,
    'nonfinite': scalar,
    'first_nonfinite': scalar,
  }
  shardings = {
    'step': replicated,
    'params': param_sh,
    'opt_state': opt_sh,
    'nonfinite': replicated,
    'first_nonfinite': replicated,
  }
  return abstract, shardings


def _like_params(tree, params, param_sh, default):
  """Shardings for an optimizer state: a leaf whose key path ends with a param's path (Adam's
  moments, masked or partitioned states alike) and has its shape is sharded like that param;
  anything else (step counts) gets `default`."""
  keys = lambda path: tuple(
    str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path
  )
  by_path = {
    keys(p): (x.shape, sh)
    for (p, x), sh in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_sh)
    )
  }

  def sharding_of(path, leaf):
    k = keys(path)
    for i in range(len(k)):
      if k[i:] in by_path and by_path[k[i:]][0] == leaf.shape:
        return by_path[k[i:]][1]
    return default

  return jax.tree_util.tree_map_with_path(sharding_of, tree)


NONFINITE_POLICIES = ('raise', 'skip')


def _bind(frozen_apply: dict[str, Callable], frozen_params: dict) -> dict[str, Callable]:
  """Frozen models (a distillation teacher) as functions of their inputs, for the loss."""
  return {k: functools.partial(frozen_apply[k], frozen_params[k]) for k in frozen_apply}


def make_train_step(apply_fn, loss_fn, tx, config, frozen_apply=None, trainable=None):
  """The pure step. A non-finite loss or gradient never reaches the params: under 'skip' that
  update is dropped and counted; under 'raise' the state freezes at the last good step and
  records the bad step, which the loop turns into an error before anything is saved.

  `frozen_apply` names the apply functions of frozen models whose params come in as the
  step's last argument; the loss receives each as a keyword (no gradient flows into them).
  `trainable` (a pytree of bools like the params) freezes the params marked False: their
  gradients are zero (so XLA drops the work that only they need) and they are never updated,
  bit for bit.

  `config.train.microbatches` = k > 1 accumulates gradients over k slices of the batch (row i
  goes to slice i mod k, so every device keeps its share) in a `lax.scan`: activations of one
  slice at a time. Losses and gradients are weighted by each slice's target count, so they equal
  the whole batch's (objectives that draw randomness in the step draw it per slice)."""
  policy = config.get('train', {}).get('nonfinite', 'raise')
  microbatches = config.get('train', {}).get('microbatches', 1)
  frozen_apply = frozen_apply or {}
  grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

  def loss_and_grads(params, batch, step_rng, frozen):
    if microbatches == 1:
      return grad_fn(apply_fn, params, batch, step_rng, config, **frozen)
    split = lambda x: x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(
      0, 1
    )

    def one(carry, inputs):
      i, micro = inputs
      (loss, aux), grads = grad_fn(
        apply_fn, params, micro, jax.random.fold_in(step_rng, i), config, **frozen
      )
      weight = aux['count']
      loss_sum, aux_sum, grad_sum = carry
      return (
        loss_sum + loss * weight,
        jax.tree.map(jnp.add, aux_sum, aux),
        jax.tree.map(lambda g, s: s + g * weight, grads, grad_sum),
      ), None

    first = jax.tree.map(lambda x: x[0], jax.tree.map(split, batch))
    _, aux_shape = jax.eval_shape(
      lambda: loss_fn(apply_fn, params, first, step_rng, config, **frozen)
    )
    zeros = (
      jnp.zeros(()),
      jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape),
      jax.tree.map(jnp.zeros_like, params),
    )
    (loss_sum, aux, grad_sum), _ = jax.lax.scan(
      one, zeros, (jnp.arange(microbatches), jax.tree.map(split, batch))
    )
    total = jnp.maximum(aux['count'], 1.0)
    return (loss_sum / total, aux), jax.tree.map(lambda g: (g / total).astype(g.dtype), grad_sum)

  def train_step(
    state: State, batch: dict, rng: jax.Array, frozen_params: dict | None = None
  ) -> tuple[State, dict]:
    step_rng = jax.random.fold_in(rng, state['step'])
    (loss, aux), grads = loss_and_grads(
      state['params'], batch, step_rng, _bind(frozen_apply, frozen_params or {})
    )
    if trainable is not None:
      grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    if trainable is not None:
      params = jax.tree.map(
        lambda new, old, t: new if t else old, params, state['params'], trainable
      )
    # The update is checked too: a finite gradient times a bad learning rate is still bad.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    ok = finite if policy == 'skip' else finite & (state['first_nonfinite'] < 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = {
      'step': state['step'] + 1,
      'params': keep(params, state['params']),
      'opt_state': keep(opt_state, state['opt_state']),
      'nonfinite': state['nonfinite'] + (~finite).astype(jnp.int32),
      'first_nonfinite': jnp.where(
        ~finite & (state['first_nonfinite'] < 0), state['step'] + 1, state['first_nonfinite']
      ),
    }
    return new_state, {'loss': loss, 'grad_norm': grad_norm, **aux}

  return train_step


def make_eval_step(apply_fn, loss_fn, config, frozen_apply=None):
  def eval_step(params, batch: dict, frozen_params: dict | None = None) -> dict:
    _, aux = loss_fn(
      apply_fn,
      params,
      batch,
      jax.random.key(0),
      config,
      **_bind(frozen_apply or {}, frozen_params or {}),
    )
    return aux

  return eval_step


def evaluate(eval_step, params, batches, *, mesh, rules, summarize) -> dict[str, float]:
  sums = None
  for batch in batches:
    out = eval_step(params, sharding.put_batch(batch, mesh, rules))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  # Scalars as floats; array metrics (a confusion matrix) stay arrays.
  return summarize(jax.tree.map(lambda x: float(x) if x.ndim == 0 else x, jax.device_get(sums)))


class Program(NamedTuple):
  abstract: State  # Shapes and dtypes of the train state.
  shardings: State  # NamedSharding of every leaf.
  init: Callable  # rng -> sharded fresh state.
  train_step: Callable  # (state, batch, rng) -> (state, metrics), jitted and donating.
  eval_step: Callable  # (params, batch) -> summable metrics, jitted.
  jitted_step: Any  # The jitted train step with the frozen params as its last argument,
  # for ahead-of-time lowering (fm.plan).


def build(
  model: nn.Module,
  tx,
  loss_fn,
  config,
  mesh,
  rules,
  sample,
  frozen: dict[str, tuple[Callable, Any]] | None = None,
  trainable=None,
) -> Program:
  """The sharded train state's init and the jitted train and eval steps.

  Params are born sharded (`eval_shape` -> shardings from the logical rules -> jitted init with
  out_shardings), so no device ever holds more than its shard. `frozen` maps a name to
  (apply_fn, sharded params) of a model that the loss reads but never trains (a teacher); its
  params enter the jitted steps as arguments with their own shardings. `trainable`: see
  make_train_step. Call inside
  `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`.
  """
  # ===========================================================================================
  # Shard
  # ===========================================================================================
  abstract, state_sh = state_shardings(model, tx, sample, mesh, rules)

  def init(rng):
    params = nn.unbox(model.init(rng, *sample))
    zero = jnp.zeros((), jnp.int32)
    return {
      'step': zero,
      'params': params,
      'opt_state': tx.init(params),
      'nonfinite': zero,
      'first_nonfinite': zero - 1,
    }

  # ===========================================================================================
  # Step
  # ===========================================================================================
  batch_sh = sharding.batch_sharding(mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  frozen = frozen or {}
  frozen_apply = {k: apply for k, (apply, _) in frozen.items()}
  frozen_params = {k: params for k, (_, params) in frozen.items()}
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen_params)
  train_step = jax.jit(
    make_train_step(model.apply, loss_fn, tx, config, frozen_apply, trainable),
    in_shardings=(state_sh, batch_sh, replicated, frozen_sh),
    out_shardings=(state_sh, replicated),
    donate_argnums=(0,),
  )
  eval_step = jax.jit(
    make_eval_step(model.apply, loss_fn, config, frozen_apply),
    in_shardings=(state_sh['params'], batch_sh, frozen_sh),
    out_shardings=replicated,
  )
  return Program(
    abstract,
    state_sh,
    jax.jit(init, out_shardings=state_sh),
    lambda state, batch, rng: train_step(state, batch, rng, frozen_params),
    lambda params, batch: eval_step(params, batch, frozen_params),
    train_step,
  )


# =============================================================================================
# Pretrained models: trained first when missing, then restored onto this mesh
# =============================================================================================
REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(spec: str, key: str) -> ml_collections.ConfigDict:
  """'experiments/x.py[:variant]' (relative to the working directory or the repository) ->
  that file's get_config(variant), as `--config` would load it."""
  path, _, arg = spec.partition(':')
  candidates = [pathlib.Path(path).expanduser(), REPO / path]
  found = next((p for p in candidates if p.is_file()), None)
  if found is None:
    raise ConfigError(
      f'{key}={spec!r}: no such experiment file; give a path like '
      f'experiments/lm_shakespeare.py (optionally with :smoke).'
    )
  module_spec = importlib.util.spec_from_file_location(found.stem, found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


def check_pretrained_spec(spec, key: str) -> ml_collections.ConfigDict:
  """A pretrained-run spec at config `key`: a `workdir` holding the run, an `experiment` that
  trains it (or both); checked before anything runs."""
  if not spec or not (spec.get('workdir') or spec.get('experiment')):
    raise ConfigError(
      f'{key} needs a workdir of a finished run (.workdir=PATH) or an experiment '
      f'that trains one (.experiment=experiments/lm_shakespeare.py).'
    )
  if spec.get('experiment'):
    load_config(spec.experiment, f'{key}.experiment')
  else:
    checkpoint.resolve(spec.workdir, f'{key}.workdir')
  return spec


def _as_json(tree: Any) -> Any:
  """`tree` as it reads back from config.json (tuples as lists, other objects as strings)."""
  return json.loads(json.dumps(tree, default=str))


def _check_same_run(workdir: pathlib.Path, run_config, experiment: str, key: str) -> None:
  """Refuses a workdir that holds another run than `experiment` would train (a fine-tuning run,
  another model or dataset), so its checkpoints are never taken for broken ones."""
  path = workdir / 'config.json'
  if not path.exists():
    return
  held = json.loads(path.read_text()).get('config', {})
  wanted = _as_json(run_config.to_dict())
  differing = [
    k
    for k in ('task', 'objective', 'model', 'data')
    if k in held or k in wanted
    if held.get(k) != wanted.get(k)
  ]
  if differing:
    raise ConfigError(
      f'{key}.workdir {workdir} holds another run than {experiment} trains '
      f'(its config differs in {", ".join(differing)}); point {key}.workdir at '
      f"that experiment's own workdir or at an empty directory."
    )


def pretrained(spec, key: str, default_workdir: pathlib.Path) -> pathlib.Path | None:
  """The checkpoint of the run given by the spec at config `key` (see check_pretrained_spec).

  Its workdir defaults to `default_workdir`. With an `experiment`, a run that has not reached
  that experiment's final step is trained (or resumed) first, so a second command reuses it.
  Returns None when that training was preempted (rerunning the command resumes it).
  """
  check_pretrained_spec(spec, key)
  workdir = pathlib.Path(spec.get('workdir') or default_workdir)
  if spec.get('experiment'):
    run_config = load_config(spec.experiment, f'{key}.experiment')
    _check_same_run(workdir, run_config, spec.experiment, key)
    if checkpoint.latest_step(workdir) < run_config.train.steps:
      metrics_lib.log(f'{key}: training {spec.experiment} in {workdir} first')
      train_and_evaluate(run_config, workdir)
      if checkpoint.latest_step(workdir) < run_config.train.steps:
        return None
  return checkpoint.resolve(workdir, f'{key}.workdir')


def family(meta: dict) -> str:
  """The model family (a module in fm/models/) of a checkpoint's run."""
  return meta.get('family') or meta['config']['model']['name']


def restore_model(ckpt: pathlib.Path, mesh, rules, sample=None) -> tuple[nn.Module, Any, dict]:
  """(model, params, meta) of a checkpoint, its params restored straight onto `mesh` with the
  logical `rules`; `sample`: model inputs for shape inference (default: the run objective's).
  Call inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`."""
  meta = checkpoint.read_meta(ckpt)
  run = ml_collections.ConfigDict(meta['config'])
  module = registry.get('models', family(meta))
  fields = dict(meta['model'])
  if 'lora_targets' in fields:  # JSON turned the tuple into a list.
    fields['lora_targets'] = tuple(fields['lora_targets'])
  model = module.Model(module.Config(**fields))
  if sample is None:
    sample = example_inputs(
      registry.get('objectives', run.objective), 1, 16, run.get('objective_args')
    )
  boxed = jax.eval_shape(model.init, jax.random.key(0), *sample)
  target = checkpoint.with_shardings(
    sharding.unbox(boxed), sharding.tree_shardings(boxed, mesh, rules)
  )
  return model, checkpoint.restore_params(ckpt, target), meta


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains per `config`, writing metrics and the resolved config into `workdir`.

  Returns the final held-out metrics. A config with a `task` is a fine-tuning run (fm.finetune).
  """
  if config.get('task'):
    from fm import finetune  # It builds on this module.

    return finetune.train_and_evaluate(config, workdir)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # ===========================================================================================
  # Mesh
  # ===========================================================================================
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  objective = validate(config, dict(mesh.shape), sharding.batch_divisor(mesh, rules))
  # Frozen models the objective reads (a teacher), trained first if missing and asked for.
  frozen_ckpts = {}
  for name in getattr(objective, 'FROZEN', ()):
    frozen_ckpts[name] = pretrained(
      config.objective_args.get(name), f'config.objective_args.{name}', workdir / name
    )
    if frozen_ckpts[name] is None:
      metrics_lib.log(f'stopped while training {name}; rerun the same command to resume.')
      return {}

  # ===========================================================================================
  # Data
  # ===========================================================================================
  data = pipeline.prepare(config.data)
  seq_len, global_batch = config.data.seq_len, config.train.global_batch
  if data.train.num_windows(seq_len) < global_batch:
    raise ConfigError(
      f'config.data.dataset={config.data.dataset!r} has only '
      f'{data.train.num_windows(seq_len)} training windows of seq_len={seq_len}; '
      f'lower config.train.global_batch below that.'
    )
  pidx, pcount = jax.process_index(), jax.process_count()
  transform = None  # The objective's host-side corruption (masking, spans), if it has one.
  if hasattr(objective, 'host_transform'):
    transform = objective.host_transform(
      data.tokenizer.vocab_size, config.get('objective_args', ml_collections.ConfigDict())
    )
  train_ds = pipeline.train_dataset(
    data.train, seq_len, global_batch, config.data.get('seed', 0), pidx, pcount, transform
  )
  # Periodic evals read the first `eval_batches` validation batches; the final one reads
  # `final_eval_batches` (default: the whole held-out split).
  eval_sets = {
    name: pipeline.eval_batches(
      data.validation, seq_len, global_batch, config.train.get(key, -1), pidx, pcount, transform
    )
    for name, key in (('periodic', 'eval_batches'), ('final', 'final_eval_batches'))
  }

  # ===========================================================================================
  # Model
  # ===========================================================================================
  # Objectives may add ids after the tokenizer's (a mask token, sentinels): they never collide
  # with text ids.
  model_module, model_cfg = model_config(
    config, data.tokenizer.vocab_size + getattr(objective, 'EXTRA_TOKENS', 0)
  )
  model = model_module.Model(model_cfg)
  total_steps = config.train.steps
  tx = optim.make(config.optim, total_steps)
  sample = example_inputs(objective, global_batch, seq_len, config.get('objective_args'))
  counts = model_module.param_count(model_cfg)
  flops_per_step = model_module.flops_per_token(model_cfg, seq_len) * global_batch * seq_len

  resolved = record(
    workdir,
    config,
    config.model.name,
    model_cfg,
    data.tokenizer,
    counts,
    mesh,
    frozen={k: str(v) for k, v in frozen_ckpts.items()},
  )
  metrics_lib.log(
    f'model {config.model.name}/{config.model.get("variant")}: '
    f'{counts["total"]:,} params ({counts["non_embedding"]:,} non-embedding), '
    f'vocab {model_cfg.vocab_size}; mesh {dict(mesh.shape)} on '
    f'{jax.device_count()} {jax.devices()[0].platform} devices'
  )

  # ===========================================================================================
  # Shard, Step (in `build`), Checkpoint and Loop (in `loop`)
  # ===========================================================================================
  with session(workdir, config, mesh, rules) as (ckpt, preemption):
    frozen = {}
    for name, path in frozen_ckpts.items():
      frozen_model, params, meta = restore_model(path, mesh, rules)
      _check_frozen(name, path, meta, objective, model_cfg, data.tokenizer.identity)
      frozen[name] = (frozen_model.apply, params)
      # Its forward pass (a third of a training step's FLOPs) counts towards MFU.
      flops_per_step += (
        registry.get('models', family(meta)).flops_per_token(frozen_model.cfg, seq_len)
        * global_batch
        * seq_len
        / 3
      )
      metrics_lib.log(f'{name}: {meta["config"]["model"]} from {path}')
    return loop(
      config,
      workdir,
      objective,
      ckpt,
      preemption,
      resolved,
      mesh,
      rules,
      build(model, tx, objective.loss_fn, config, mesh, rules, sample, frozen),
      iter(train_ds),
      eval_sets,
      flops_per_step,
    )


def record(
  workdir: pathlib.Path, config, family_name: str, model_cfg, tokenizer, counts: dict, mesh, **extra
) -> dict:
  """The resolved config (also stored in every checkpoint; JSON, no pickle), written to
  WORKDIR/config.json by process 0."""
  resolved = _as_json(
    {
      'config': config.to_dict(),
      'family': family_name,
      'model': model_cfg.__dict__,
      'tokenizer': tokenizer.identity,
      'params': counts,
      'mesh': dict(mesh.shape),
      'devices': jax.device_count(),
      'device_kind': jax.devices()[0].device_kind,
      **extra,
    }
  )
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(json.dumps(resolved, indent=2))
  return resolved


@contextlib.contextmanager
def session(workdir: pathlib.Path, config, mesh, rules):
  """(checkpointer, preemption handler) for a run, inside the mesh and the logical rules;
  signal handlers are restored and pending saves finished on the way out."""
  ckpt = checkpoint.Checkpointer(workdir, config.get('checkpoint', {}), log=metrics_lib.log)
  preemption = checkpoint.Preemption()
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      yield ckpt, preemption
  finally:
    preemption.restore_handlers()
    ckpt.close()


def _check_frozen(name, path, meta, objective, model_cfg, tokenizer_identity) -> None:
  """A frozen model must be of a compatible family and share the tokenizer and vocabulary."""
  key = f'config.objective_args.{name}'
  if family(meta) not in objective.COMPATIBLE_MODELS:
    raise ConfigError(
      f'{key}: {path} holds a {family(meta)!r} model; {objective.__name__} needs '
      f'one of: {", ".join(objective.COMPATIBLE_MODELS)}.'
    )
  if meta['tokenizer'] != tokenizer_identity or meta['model']['vocab_size'] != model_cfg.vocab_size:
    raise ConfigError(
      f'{key}: {path} was trained with tokenizer {meta["tokenizer"]} (vocab '
      f'{meta["model"]["vocab_size"]}), this run uses {tokenizer_identity} (vocab '
      f'{model_cfg.vocab_size}); set config.data to the same dataset and tokenizer.'
    )


def _check_finite(config, state) -> int:
  """Raises under the 'raise' policy if a step was non-finite; returns the count of such steps."""
  first, count = (int(x) for x in jax.device_get((state['first_nonfinite'], state['nonfinite'])))
  if first >= 0 and config.train.get('nonfinite', 'raise') == 'raise':
    raise FloatingPointError(
      f'non-finite loss or gradients at step {first}; the state was kept from step {first - 1} '
      f'and nothing after it is saved. Lower config.optim.lr, check the data, or set '
      f'config.train.nonfinite=skip to skip such updates.'
    )
  return count


def loop(
  config,
  workdir,
  objective,
  ckpt,
  preemption,
  meta,
  mesh,
  rules,
  program,
  data_iter,
  eval_sets,
  flops_per_step,
  warm_start=None,
  test_extra=None,
) -> dict[str, float]:
  """Trains to config.train.steps. `eval_sets` has 'periodic' and 'final' batches, and
  optionally 'test' (scored once at the end, as test/*, with `test_extra(params)`'s metrics,
  e.g. of generated text). `warm_start`: a checkpoint whose matching params initialise a fresh
  run (default: config.init.from_checkpoint)."""
  total_steps = config.train.steps
  # Tokens per row: a window, or a seq2seq task's source and target.
  seq_len = config.data.get('seq_len') or config.data.source_len + config.data.target_len
  init_rng, train_rng = jax.random.split(jax.random.key(config.get('seed', 0)))
  run_eval = functools.partial(
    evaluate, program.eval_step, mesh=mesh, rules=rules, summarize=objective.summarize
  )

  # ===========================================================================================
  # Checkpoint: resume (state and data iterator) or start fresh, optionally warm.
  # ===========================================================================================
  target = checkpoint.with_shardings(program.abstract, program.shardings)
  restored = ckpt.restore_latest(target, data_iter)
  if restored:
    state, step = restored
    metrics_lib.log(f'resumed from {ckpt.directory / str(step)} at step {step}')
  else:
    state, step = program.init(init_rng), 0
    warm_start = warm_start or config.get('init', {}).get('from_checkpoint')
    if warm_start:
      state['params'] = checkpoint.load_backbone(warm_start, state['params'], log=metrics_lib.log)

  # ===========================================================================================
  # Loop
  # ===========================================================================================
  writer = metrics_lib.Writer(workdir)
  progress = metrics_lib.Progress(
    total_steps, config.train.global_batch * seq_len, flops_per_step, metrics_lib.peak_flops()
  )
  log_every, eval_every = config.train.get('log_every', 50), config.train.get('eval_every', 500)
  lr_schedule = optim.schedule(config.optim, total_steps)  # For logging; the step has its own.
  eval_metrics = {}
  start = step
  progress.reset(step)
  while step < total_steps:
    batch = sharding.put_batch(next(data_iter), mesh, rules)
    state, step_metrics = program.train_step(state, batch, train_rng)
    step += 1
    if step == start + 1:
      progress.reset(step)  # Leave compilation out of throughput.
    if step % log_every == 0 or step == total_steps:
      fetched = jax.device_get(step_metrics)
      skipped = _check_finite(config, state)
      scalars = {
        'train/loss': fetched['loss'],
        'train/grad_norm': fetched['grad_norm'],
        'train/lr': lr_schedule(step - 1),
        'train/nonfinite_skipped': skipped,
        **progress.report(step),
      }
      writer.write(step, scalars)
      metrics_lib.log(metrics_lib.progress_line(step, total_steps, scalars))
    if step % eval_every == 0 or step == total_steps:
      final = step == total_steps
      eval_metrics = run_eval(state['params'], eval_sets['final' if final else 'periodic'])
      writer.write(step, {f'eval/{k}': v for k, v in eval_metrics.items()})
      metrics_lib.log(
        f'{"final eval" if final else "eval"} @ {step}: '
        + ', '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items())
      )
      if final and 'test' in eval_sets:
        eval_metrics.update(_test(run_eval, state, eval_sets['test'], writer, step, test_extra))
      progress.reset(step)  # Leave evals out of throughput.
    preempted = preemption.reached(step)
    if ckpt.should_save(step) or step == total_steps or preempted:
      _check_finite(config, state)  # Never save a state that a non-finite step touched.
      started = time.perf_counter()
      ckpt.save(step, state, data_iter, meta)
      writer.write(step, {'checkpoint/blocking_sec': time.perf_counter() - started})
    if preempted:
      ckpt.wait()
      metrics_lib.log(
        f'preempted ({preemption.signal}) at step {step}: checkpoint saved to '
        f'{ckpt.directory / str(step)}; rerun the same command to resume.'
      )
      break
  if start == total_steps:
    metrics_lib.log(
      'no training steps: evaluating.'
      if not total_steps
      else f'nothing to train: the checkpoint is already at the final step '
      f'{total_steps} (raise config.train.steps to train further); evaluating it.'
    )
    eval_metrics = run_eval(state['params'], eval_sets['final'])
    metrics_lib.log(
      f'final eval @ {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items())
    )
    if 'test' in eval_sets:
      eval_metrics.update(_test(run_eval, state, eval_sets['test'], writer, step, test_extra))
  writer.close()
  return eval_metrics


def _test(run_eval, state, batches, writer, step, extra=None) -> dict[str, float]:
  metrics = run_eval(state['params'], batches)
  if extra is not None:
    metrics.update(extra(state['params']))
  metrics = {f'test/{k}': v for k, v in metrics.items()}
  writer.write(step, metrics)
  metrics_lib.log(f'test @ {step}: ' + ', '.join(f'{k[5:]} {v:.4f}' for k, v in metrics.items()))
  return metrics
