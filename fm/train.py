"""The pretraining trainer: config checks, the sharded program, and the loop every run shares.

Sections: Config, Shard, Step (in `build`), Pretraining (mesh, data, model: a run read top to
bottom), Loop. The step is pure and jitted once with explicit shardings; logging, evaluations
and checkpoints live only in the loop. Adaptation (fm/finetune.py) builds on this module and
never the reverse; fm/runs.py dispatches a config to one of them.
"""

from collections.abc import Callable, Iterable, Iterator
import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fm import ConfigError, checkpoint, local_directory, models, optim, registry, sharding
from fm import metrics as metrics_lib
from fm.data import images, pipeline
from fm.data import prepare as prepare_lib
from fm.data import tokenizer as tokenizer_lib
from fm.models import layers

# {'step', 'params', 'opt_state', 'nonfinite' (count of non-finite steps), 'first_nonfinite'
# (the first such step, -1 if none)}.
State = dict[str, Any]
# (apply_fn, params, batch, rng, **frozen) -> (mean loss, summable metrics): an objective's
# loss_fn with its args bound, or a task's.
LossFn = Callable[..., tuple[jax.Array, dict]]
NONFINITE_POLICIES = ('raise', 'skip')


# =============================================================================================
# Config
# =============================================================================================
def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None):
  """(the model family's module, its Config): the named variant, then any other `config.model`
  keys as field overrides; `vocab_size` (ids the tokenizer and objective need) sets the
  vocabulary, padded to a multiple of 128 for even sharding, unless a variant pins it."""
  family = registry.get('models', config.model.name)
  variant = config.model.variant
  if variant not in family.VARIANTS:
    raise ConfigError(
      f'config.model.variant={variant!r} is unknown for {config.model.name}; '
      f'choose one of: {", ".join(family.VARIANTS)}.'
    )
  fields = {**family.VARIANTS[variant]}
  fields.update({k: v for k, v in config.model.items() if k not in ('name', 'variant')})
  if vocab_size is not None:
    needed = -(-vocab_size // 128) * 128
    if 'vocab_size' not in fields:
      fields['vocab_size'] = needed
    elif fields['vocab_size'] < vocab_size:  # A published shape (or an override) pins it.
      raise ConfigError(
        f'config.model.vocab_size={fields["vocab_size"]} (of variant {variant!r} or the config) '
        f'is smaller than the {vocab_size} ids the tokenizer and objective need; raise it or '
        f'drop the override.'
      )
  model_cfg = family.Config(**fields)
  layers.check_choices(model_cfg, layers.COMMON_CHOICES)
  return family, model_cfg


def check_run(config: ml_collections.ConfigDict) -> None:
  """Checks of `config.train` and `config.optim` shared by every run."""
  if config.train.steps < 0:
    raise ConfigError(f'config.train.steps={config.train.steps} must be >= 0 (0 only evaluates).')
  if config.optim.lr < 0:
    raise ConfigError(
      f'config.optim.lr={config.optim.lr} must be >= 0: a negative rate climbs the loss.'
    )
  for key in ('global_batch', 'log_every', 'eval_every'):
    if config.train[key] < 1:
      raise ConfigError(f'config.train.{key}={config.train[key]} must be >= 1.')
  if config.init.from_checkpoint:  # It exists (its params are matched at the start).
    checkpoint.resolve(config.init.from_checkpoint)
  if config.checkpoint.keep < 1 or config.checkpoint.every_steps < 0:
    raise ConfigError(
      f'config.checkpoint.keep={config.checkpoint.keep} must be >= 1 (the newest checkpoints '
      f'kept: a rerun resumes from the newest) and config.checkpoint.every_steps='
      f'{config.checkpoint.every_steps} >= 0 (0: save at the end and on preemption).'
    )
  if config.train.nonfinite not in NONFINITE_POLICIES:
    raise ConfigError(
      f'config.train.nonfinite={config.train.nonfinite!r} is unknown; choose raise or skip.'
    )
  selection(config)


def selection(config: ml_collections.ConfigDict) -> tuple[str, float] | None:
  """config.train.select as (validation metric, +1 if higher is better else -1); None: off."""
  select = config.train.get('select', '')
  if not select:
    return None
  direction, _, name = select.rpartition(':')
  if direction not in ('', 'max', 'min') or not name:
    raise ConfigError(
      f'config.train.select={select!r} is not a validation metric; write its name to keep the '
      f'params where it is highest (accuracy) or min:NAME where it is lowest (min:loss).'
    )
  return name, -1.0 if direction == 'min' else 1.0


def validate(
  config: ml_collections.ConfigDict,
  mesh_shape: dict[str, int],
  batch_ways: int,
  processes: int | None = None,
  corpus: bool = True,
):
  """Checks of a pretraining config that need no data or compilation, run identically on every
  host (`processes`: how many hosts read the batch; default this job's; `corpus`: whether the
  run reads `config.data`'s corpus, which fm.plan's imported backbones do not). Returns the
  objective."""
  objective = registry.get('objectives', config.objective)
  _, model_cfg = model_config(config)
  if config.model.name not in objective.COMPATIBLE_MODELS:
    raise ConfigError(
      f'config.objective={config.objective!r} does not work with '
      f'config.model.name={config.model.name!r}; compatible models: '
      f'{", ".join(objective.COMPATIBLE_MODELS)}.'
    )
  objective.validate(config.objective_args)
  text = objective.MODALITY == 'text'  # Else images (and captions) of a named image dataset.
  if corpus and text:
    check_data(config.data)
  elif corpus:
    paired = objective.MODALITY == 'image_text'
    images.check(config.data.dataset, 'config.data.dataset', captions=paired)
  if not text and config.data.pad < 0:
    raise ConfigError(f'config.data.pad={config.data.pad} must be >= 0.')
  check_run(config)
  if objective.WHOLE_BATCH and config.train.microbatches != 1:
    raise ConfigError(
      f'config.train.microbatches={config.train.microbatches}: the {config.objective} loss '
      f'couples every row of the batch with every other, so it cannot be split into '
      f'microbatches; set it to 1 (and lower config.train.global_batch if memory is short).'
    )
  if text and config.data.seq_len < 2:
    raise ConfigError(
      f'config.data.seq_len={config.data.seq_len} must be >= 2 (tokens per window).'
    )
  if text and config.data.seq_len > model_cfg.max_len:
    raise ConfigError(
      f'config.data.seq_len={config.data.seq_len} exceeds the max_len={model_cfg.max_len} of '
      f'{config.model.name} variant {config.model.variant!r}; '
      + (
        f'raise it with --config.model.max_len={config.data.seq_len}'
        if 'max_len' in config.model
        else f'lower it with --config.data.seq_len={model_cfg.max_len}, or add '
        f'max_len={config.data.seq_len} to config.model in the experiment file'
      )
      + '.'
    )
  check_batch(config, mesh_shape, batch_ways, processes)
  return objective


def check_data(data_cfg: ml_collections.ConfigDict) -> None:
  """The corpus exists: the named source is known, `files` globs match, a `prepared` directory
  has a manifest (nothing is read or prepared yet)."""
  if data_cfg.workers < 0:
    raise ConfigError(f'config.data.workers={data_cfg.workers} must be >= 0.')
  if data_cfg.dataset == 'prepared':
    if not data_cfg.path and not data_cfg.mixture:
      raise ConfigError(
        'config.data.dataset=prepared needs config.data.path, a directory written by '
        'python -m fm.data.prepare (--config.data.path=DIR), or config.data.mixture.'
      )
    key = 'config.data.mixture' if data_cfg.mixture else 'config.data.path'
    for path, weight in data_cfg.mixture or ((data_cfg.path, 1.0),):
      prepare_lib.read_manifest(local_directory(path, key, pipeline.PREPARED_EXAMPLE))
      if not weight > 0:
        raise ConfigError(f'config.data.mixture: the weight of {path} is {weight}; give it > 0.')
    return
  spec = pipeline.spec_of(data_cfg)
  spec.check()
  prepare_lib.expand(spec.train, 'config.data.train')
  prepare_lib.expand(spec.validation, 'config.data.validation')


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
  k = config.train.microbatches
  if k < 1 or batch % (k * batch_ways):
    raise ConfigError(
      f'config.train.microbatches={k} must be >= 1 and split '
      f'config.train.global_batch={batch} into slices that the {batch_ways} batch '
      f'shards divide; use a divisor of {batch // batch_ways}.'
    )


def step_flops(family, model_cfg, objective, args, seq_len: int, batch: int) -> float:
  """Model FLOPs of one training step of `batch` rows made of `seq_len`-token windows: the
  rows' own shapes when the objective states them and the family counts them (an
  encoder-decoder under span corruption or UL2), else `flops_per_token` per window token."""
  if objective.row_lengths is not None and family.flops_per_row is not None:
    return family.flops_per_row(model_cfg, *objective.row_lengths(seq_len, args)) * batch
  return family.flops_per_token(model_cfg, seq_len) * batch * seq_len


def sample_inputs(family, model_cfg, batch_size: int, seq_len: int) -> tuple:
  """Zero model inputs for an init (param shapes do not depend on their lengths)."""
  return models.sample_inputs(family, model_cfg, batch_size, seq_len)


# =============================================================================================
# Shard
# =============================================================================================
def state_shardings(
  model: nn.Module,
  tx: optax.GradientTransformation,
  sample: dict,
  mesh: jax.sharding.Mesh,
  rules,
  select: bool = False,
) -> tuple[State, State]:
  """Abstract train state and its shardings, from the params' logical axes (nothing allocated);
  with `select` also the best params so far, their score and step (config.train.select)."""
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
  if select:
    abstract.update(best_params=params, best_score=jax.ShapeDtypeStruct((), jnp.float32))
    abstract['best_step'] = scalar
    shardings.update(best_params=param_sh, best_score=replicated, best_step=replicated)
  return abstract, shardings


def _like_params(tree, params, param_sh, default):
  """Shardings for an optimizer state: a leaf whose key path ends with a param's path (Adam's
  moments, masked or partitioned states alike) and has its shape is sharded like that param;
  anything else (step counts) gets `default`."""
  keys = lambda path: tuple(jax.tree_util.keystr((k,), simple=True) for k in path)
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


# =============================================================================================
# Step
# =============================================================================================
def _bind(frozen_apply: dict[str, Callable], frozen_params: dict) -> dict[str, Callable]:
  """Frozen models (a distillation teacher) as functions of their inputs, for the loss."""
  return {k: functools.partial(frozen_apply[k], frozen_params[k]) for k in frozen_apply}


def make_train_step(
  apply_fn, loss_fn: LossFn, tx, config, frozen_apply=None, trainable=None
) -> Callable:
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
  policy, microbatches = config.train.nonfinite, config.train.microbatches
  frozen_apply = frozen_apply or {}
  grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

  def loss_and_grads(params, batch, step_rng, frozen):
    if microbatches == 1:
      return grad_fn(apply_fn, params, batch, step_rng, **frozen)
    split = lambda x: x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(
      0, 1
    )

    def one(carry, inputs):
      i, micro = inputs
      (loss, aux), grads = grad_fn(
        apply_fn, params, micro, jax.random.fold_in(step_rng, i), **frozen
      )
      weight = aux['count']
      loss_sum, aux_sum, grad_sum = carry
      return (
        loss_sum + loss * weight,
        jax.tree.map(jnp.add, aux_sum, aux),
        jax.tree.map(lambda g, s: s + g * weight, grads, grad_sum),
      ), None

    first = jax.tree.map(lambda x: x[0], jax.tree.map(split, batch))
    _, aux_shape = jax.eval_shape(lambda: loss_fn(apply_fn, params, first, step_rng, **frozen))
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
      **state,  # The best params so far (config.train.select) pass through.
      'step': state['step'] + 1,
      'params': keep(params, state['params']),
      'opt_state': keep(opt_state, state['opt_state']),
      'nonfinite': state['nonfinite'] + (~finite).astype(jnp.int32),
      'first_nonfinite': jnp.where(
        ~finite & (state['first_nonfinite'] < 0), state['step'] + 1, state['first_nonfinite']
      ),
    }
    # The non-finite counts ride along, so the loop reads them with the step's metrics (a step
    # late) instead of waiting on the state.
    counts = {k: new_state[k] for k in ('nonfinite', 'first_nonfinite')}
    return new_state, {'loss': loss, 'grad_norm': grad_norm, **counts, **aux}

  return train_step


def make_eval_step(apply_fn, loss_fn: LossFn, frozen_apply=None) -> Callable:
  def eval_step(params, batch: dict, frozen_params: dict | None = None) -> dict:
    frozen = _bind(frozen_apply or {}, frozen_params or {})
    return loss_fn(apply_fn, params, batch, jax.random.key(0), **frozen)[1]

  return eval_step


def evaluate(eval_step, params, batches, *, mesh, rules, summarize) -> dict[str, float]:
  """The summarised metrics of `eval_step` over every batch."""
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
  keep_best: Callable | None = None  # (state, score) -> state holding its params as the best
  # (config.train.select; None when off).


def build(
  model: nn.Module,
  tx,
  loss_fn: LossFn,
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
  make_train_step. Call inside `sharding.use(mesh, rules)`.
  """
  select = selection(config) is not None
  abstract, state_sh = state_shardings(model, tx, sample, mesh, rules, select)

  def init(rng):
    params = nn.unbox(model.init(rng, *sample))
    zero = jnp.zeros((), jnp.int32)
    state = {
      'step': zero,
      'params': params,
      'opt_state': tx.init(params),
      'nonfinite': zero,
      'first_nonfinite': zero - 1,
    }
    if select:  # Nothing scored yet: any score beats -inf.
      state.update(best_params=params, best_score=jnp.float32(-jnp.inf), best_step=zero - 1)
    return state

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
    make_eval_step(model.apply, loss_fn, frozen_apply),
    in_shardings=(state_sh['params'], batch_sh, frozen_sh),
    out_shardings=replicated,
  )
  # The params as the best so far (a copy: the next step donates the params' buffers).
  keep_best = jax.jit(
    lambda state, score: {
      **state,
      'best_params': jax.tree.map(jnp.copy, state['params']),
      'best_score': score.astype(jnp.float32),
      'best_step': state['step'],
    },
    in_shardings=(state_sh, replicated),
    out_shardings=state_sh,
    donate_argnums=(0,),
  )
  return Program(
    abstract,
    state_sh,
    jax.jit(init, out_shardings=state_sh),
    lambda state, batch, rng: train_step(state, batch, rng, frozen_params),
    lambda params, batch: eval_step(params, batch, frozen_params),
    train_step,
    keep_best if select else None,
  )


# =============================================================================================
# Pretraining
# =============================================================================================
def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, frozen: dict[str, pathlib.Path]
) -> dict[str, float]:
  """Pretrains per `config`, resolved and checked by fm.runs.run, which also trains or finds the
  checkpoints of the objective's `frozen` models (name -> checkpoint); returns the final
  held-out metrics."""
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  objective = registry.get('objectives', config.objective)

  pidx, pcount = jax.process_index(), jax.process_count()
  global_batch = config.train.global_batch
  if objective.MODALITY != 'text':
    family, model_cfg, tokenizer, train_ds, held_out = _image_data(config, objective, pidx, pcount)
    seq_len = family.sequence_length(model_cfg)  # Tokens an image (and its caption) make.
    corpus = None  # A named image dataset: its version is fm's.
  else:
    family, model_cfg, tokenizer, train_ds, held_out, corpus = _text_data(
      config, objective, pidx, pcount
    )
    seq_len = config.data.seq_len
  _check_same_data(workdir, tokenizer, corpus)
  evals = Evals(
    objective.summarize,
    held_out(config.train.eval_batches),
    held_out(config.train.final_eval_batches),
  )

  model = family.Model(model_cfg)
  counts = family.param_count(model_cfg)
  args = config.objective_args
  flops_per_step = step_flops(family, model_cfg, objective, args, seq_len, global_batch)
  text_model = objective.MODALITY == 'text'
  for name, path in frozen.items():  # Before anything is written to the workdir.
    _check_frozen(name, path, checkpoint.read_meta(path), objective, model_cfg, tokenizer.identity)
  meta = record(
    workdir,
    config,
    config.model.name,
    model_cfg,
    tokenizer,
    counts,
    mesh,
    frozen={k: str(v) for k, v in frozen.items()},
    corpus=corpus,
  )
  metrics_lib.log(
    f'model {config.model.name}/{config.model.variant}: '
    f'{counts["total"]:,} params ({counts["non_embedding"]:,} non-embedding), '
    + (f'vocab {model_cfg.vocab_size}; ' if text_model else f'{seq_len} tokens per image; ')
    + f'mesh {dict(mesh.shape)} on '
    f'{jax.device_count()} {jax.devices()[0].platform} devices'
  )

  with sharding.use(mesh, rules):
    frozen_models = {}
    for name, path in frozen.items():
      frozen_model, params, frozen_meta = checkpoint.restore_model(path, mesh, rules)
      frozen_models[name] = (frozen_model.apply, params)
      # Its forward pass (a third of a training step's FLOPs) counts towards MFU.
      frozen_family = registry.get('models', checkpoint.family(frozen_meta))
      flops_per_step += (
        frozen_family.flops_per_token(frozen_model.model_cfg, seq_len) * global_batch * seq_len / 3
      )
      metrics_lib.log(f'{name}: {frozen_meta["config"]["model"]} from {path}')
    program = build(
      model,
      optim.make(config.optim, config.train.steps),
      functools.partial(objective.loss_fn, args=config.objective_args),
      config,
      mesh,
      rules,
      sample_inputs(family, model_cfg, global_batch, seq_len),
      frozen_models,
    )
    steps, tokens = config.train.steps, global_batch * seq_len
    job = Job(config, workdir, mesh, rules, meta, steps, tokens, flops_per_step)
    return loop(job, program, iter(train_ds), evals)


def _text_data(config, objective, pidx: int, pcount: int):
  """(family, model_cfg, tokenizer, training batches, held_out(limit) -> batches) of a text
  objective: packed windows, the objective's host-side corruption run in the pipeline;
  objectives may add ids after the tokenizer's (a mask token, sentinels)."""
  data = pipeline.prepare(config.data)
  seq_len, global_batch = config.data.seq_len, config.train.global_batch
  windows = data.train.num_windows(seq_len)
  if windows < global_batch:
    raise ConfigError(
      f'config.data.dataset={config.data.dataset!r} has only {windows} training windows of '
      f'config.data.seq_len={seq_len}, fewer than config.train.global_batch={global_batch}; '
      + (f'lower global_batch to at most {windows}, ' if windows else '')
      + 'lower seq_len, or add text.'
    )
  if not data.validation.num_windows(seq_len):
    more = {
      'files': 'raise config.data.validation_fraction, give config.data.validation files, or ',
      'prepared': 'prepare the corpus with more held out (--validation_fraction or '
      '--validation), or ',
    }.get(config.data.dataset, '')
    raise ConfigError(
      f'the held-out split of config.data.dataset={config.data.dataset!r} has '
      f'{data.validation.num_tokens} tokens, less than one window of config.data.seq_len='
      f'{seq_len}; {more}lower seq_len.'
    )
  transform = objective.host_transform and objective.host_transform(
    data.tokenizer.vocab_size, config.objective_args
  )
  train_ds = pipeline.train_dataset(
    data.train,
    seq_len,
    global_batch,
    config.data.seed,
    pidx,
    pcount,
    transform,
    config.data.workers,
  )
  held_out = lambda limit: pipeline.eval_batches(
    data.validation, seq_len, global_batch, limit, pidx, pcount, transform
  )
  family, model_cfg = model_config(config, data.tokenizer.vocab_size + objective.EXTRA_TOKENS)
  return family, model_cfg, data.tokenizer, train_ds, held_out, data.corpus


def _check_same_data(workdir: pathlib.Path, tokenizer, corpus: str | None) -> None:
  """Refuses to resume a workdir whose newest checkpoint was trained with another tokenizer or
  on another tokenized corpus than config.data gives now (the same config, its files changed
  since): its params and data position would be carried onto other token ids and windows."""
  step = checkpoint.latest_step(workdir)
  if not step:
    return
  try:
    held = checkpoint.read_meta(workdir / 'checkpoints' / str(step))
  except (OSError, ValueError):  # Damaged: restoring moves it aside and takes the one before.
    return
  identity = as_json(tokenizer.identity) if tokenizer else None
  other = ''
  if 'tokenizer' in held and held['tokenizer'] != identity:
    name = lambda t: t and t.get('sha256', t['kind'])  # Its file's digest, or its kind.
    other = f'tokenizer {name(held["tokenizer"])}, config.data now gives {name(identity)}'
  elif held.get('corpus') and corpus and held['corpus'] != corpus:
    other = f'tokenized corpus {held["corpus"][:12]}, config.data now gives {corpus[:12]}'
  if other:
    raise ConfigError(
      f'{workdir} holds checkpoints up to step {step} trained with {other} (its files, or '
      f'their tokenizer, changed since); restore the data it was trained on to resume it, or '
      f'give another --workdir to start anew.'
    )


def image_model_config(config, objective):
  """(family, model_cfg, tokenizer) of an image objective's run: an image-text objective's
  text tower reads captions as UTF-8 bytes (images.CAPTION_TOKENIZER); images need none."""
  tokenizer = images.CAPTION_TOKENIZER if objective.MODALITY == 'image_text' else None
  family, model_cfg = model_config(config, tokenizer and tokenizer.vocab_size)
  return family, model_cfg, tokenizer


def image_rows(model_cfg, images_NHWC: np.ndarray, captions: list[str] | None = None) -> dict:
  """The rows an image objective reads: the images, and each caption's bytes (`tokens`)."""
  rows = {'image': images_NHWC}
  if captions is not None:
    rows['tokens'] = images.caption_tokens(captions, model_cfg.max_len, 'config.model.max_len')
  return rows


def _image_data(config, objective, pidx: int, pcount: int):
  """`_text_data` of an image objective: rows of a named image dataset (its training split;
  the validation split held out; an image-text objective's with their captions), the
  objective's host-side transform (masking) seeded per row, after `config.data.pad` / `flip`
  augment a training row."""
  family, model_cfg, tokenizer = image_model_config(config, objective)
  splits = images.load(config.data.dataset, captions=tokenizer is not None)
  image_shape = splits['train'][0].shape[1:]
  if image_shape != (model_cfg.image_size, model_cfg.image_size, model_cfg.channels):
    raise ConfigError(
      f'config.data.dataset={config.data.dataset!r} has images of shape {image_shape}, but '
      f'config.model makes them (image_size={model_cfg.image_size}, image_size, '
      f'channels={model_cfg.channels}); set config.model.image_size and channels to the data.'
    )
  transform = objective.host_transform and objective.host_transform(
    model_cfg.num_patches, config.objective_args
  )
  rows = lambda split: image_rows(model_cfg, *splits[split][::2])  # Images, captions if any.
  global_batch = config.train.global_batch
  train_ds = pipeline.example_dataset(
    rows('train'),
    global_batch,
    config.data.seed,
    pidx,
    pcount,
    pipeline.chain(images.augmentation(config.data.pad, config.data.flip), transform),
    config.data.workers,
  )
  held_out = lambda limit: pipeline.example_batches(
    rows('validation'), global_batch, limit, pidx, pcount, transform
  )
  return family, model_cfg, tokenizer, train_ds, held_out


def record(
  workdir: pathlib.Path, config, family_name: str, model_cfg, tokenizer, counts: dict, mesh, **extra
) -> dict:
  """The resolved config (also stored in every checkpoint; JSON, no pickle), written to
  WORKDIR/config.json by process 0, with the tokenizer's files in WORKDIR/tokenizer."""
  resolved = as_json(
    {
      'config': config.to_dict(),
      'family': family_name,
      'model': model_cfg.__dict__,
      'tokenizer': tokenizer.identity if tokenizer else None,
      'params': counts,
      'mesh': dict(mesh.shape),
      'devices': jax.device_count(),
      'device_kind': jax.devices()[0].device_kind,
      **extra,
    }
  )
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(json.dumps(resolved, indent=2))
    if tokenizer is not None:  # What fm.convert export ships beside the weights.
      tokenizer_lib.save(tokenizer, workdir / 'tokenizer')
  return resolved


def as_json(tree: Any) -> Any:
  """`tree` as it reads back from JSON (tuples as lists, other objects as strings)."""
  return json.loads(json.dumps(tree, default=str))


def _check_frozen(name, path, meta, objective, model_cfg, tokenizer_identity) -> None:
  """A frozen model must be of a compatible family and share the tokenizer and vocabulary."""
  key = f'config.objective_args.{name}'
  family = checkpoint.family(meta)
  if family not in objective.COMPATIBLE_MODELS:
    raise ConfigError(
      f'{key}: {path} holds a {family!r} model; {objective.__name__} needs '
      f'one of: {", ".join(objective.COMPATIBLE_MODELS)}.'
    )
  if meta['tokenizer'] != tokenizer_identity or meta['model']['vocab_size'] != model_cfg.vocab_size:
    raise ConfigError(
      f'{key}: {path} was trained with tokenizer {meta["tokenizer"]} (vocab '
      f'{meta["model"]["vocab_size"]}), this run uses {tokenizer_identity} (vocab '
      f'{model_cfg.vocab_size}); set config.data to the same dataset and tokenizer.'
    )


# =============================================================================================
# Loop
# =============================================================================================
@dataclasses.dataclass(frozen=True)
class Job:
  """What a run's loop needs to know besides its program and data."""

  config: ml_collections.ConfigDict  # The resolved config.
  workdir: pathlib.Path
  mesh: jax.sharding.Mesh
  rules: Any
  meta: dict  # The resolved record saved with every checkpoint (`record`).
  steps: int  # Optimizer steps to reach (0: only evaluate).
  tokens_per_step: int  # For throughput: tokens in a global batch.
  flops_per_step: float  # For MFU: model FLOPs of one step.


@dataclasses.dataclass(frozen=True)
class Evals:
  """What the loop evaluates: `periodic` batches every config.train.eval_every steps, `final`
  ones after the last step, then `test` ones once (as test/*, with `extra(params)`'s metrics,
  e.g. of generated text); `summarize` turns summed metric parts into metrics."""

  summarize: Callable[[dict], dict[str, float]]
  periodic: Iterable[dict]
  final: Iterable[dict]
  test: Iterable[dict] | None = None
  extra: Callable[[Any], dict[str, float]] | None = None


class DevicePrefetch:
  """The data iterator with the next batch drawn and put on the devices ahead: `fill()` after
  dispatching a step makes the host's data work and the transfer overlap that step. Its state
  is that of the batches handed out, not of one held back, so a checkpoint resumes on exactly
  the next batch."""

  def __init__(self, batches, put: Callable[[dict], dict]):
    self.batches, self.put = batches, put
    self.ahead = None  # (state before it was drawn, the batch on the devices)

  def fill(self) -> None:
    if self.ahead is None:
      state = self.batches.get_state()
      self.ahead = (state, self.put(next(self.batches)))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    self.fill()
    _, batch = self.ahead
    self.ahead = None
    return batch

  def get_state(self):
    return self.ahead[0] if self.ahead is not None else self.batches.get_state()

  def set_state(self, state) -> None:
    self.ahead = None
    self.batches.set_state(state)


def _check_finite(config, state) -> int:
  """Raises under the 'raise' policy if a step was non-finite; returns the count of such steps.
  `state` may be the train state or a step's fetched metrics (both carry the counts)."""
  first, count = (int(x) for x in jax.device_get((state['first_nonfinite'], state['nonfinite'])))
  if first >= 0 and config.train.nonfinite == 'raise':
    raise FloatingPointError(
      f'non-finite loss or gradients at step {first}; the state was kept from step {first - 1} '
      f'and nothing after it is saved. Lower config.optim.lr, check the data, or set '
      f'config.train.nonfinite=skip to skip such updates.'
    )
  return count


def loop(
  job: Job,
  program: Program,
  batches: Iterator[dict],
  evals: Evals,
  warm_start: str | pathlib.Path | None = None,
) -> dict[str, float]:
  """Trains to `job.steps`, evaluating and saving on the way; returns the final metrics (and
  the test ones), or {} when preempted (SIGTERM/SIGINT: saved, to be resumed). Resumes from
  the newest checkpoint in the workdir, state and data iterator alike; a fresh run takes the
  params that `warm_start` (default: config.init.from_checkpoint) shares with the model. Call
  inside `sharding.use(mesh, rules)`."""
  try:
    return _loop(job, program, batches, evals, warm_start)
  finally:  # Stops grain's worker processes, freeing their shared memory, before the exit.
    close = getattr(batches, 'close', None)
    if close:
      close()


def _loop(job, program, batches, evals, warm_start) -> dict[str, float]:
  config, steps = job.config, job.steps
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  ckpt = checkpoint.Checkpointer(job.workdir, config.checkpoint, log=metrics_lib.log)
  preemption = checkpoint.Preemption()
  writer = metrics_lib.Writer(job.workdir)
  run_eval = functools.partial(
    evaluate, program.eval_step, mesh=job.mesh, rules=job.rules, summarize=evals.summarize
  )

  select = selection(config)

  def score(metrics: dict) -> float:
    """config.train.select's metric, signed so that higher is better."""
    name, sign = select
    if name not in metrics:
      raise ConfigError(
        f"config.train.select={config.train.select!r}: this run's validation metrics are "
        f'{", ".join(sorted(metrics))}; select one of them.'
      )
    return sign * float(metrics[name])

  def final_eval(state, step: int) -> tuple[dict[str, float], State]:
    """The final evaluation, then the test split once (of the selected params, if any); returns
    the metrics and the state (holding the final params as the best, if they are)."""
    metrics = run_eval(state['params'], evals.final)
    writer.write(step, {f'eval/{k}': v for k, v in metrics.items()})
    metrics_lib.log(f'final eval @ {step}: ' + _fmt(metrics))
    params = state['params']
    if select:
      # Saved with the state, so that a longer rerun weighs it too; `consider` donates the
      # state's buffers, so the params are read again.
      state = consider(state, metrics)
      params, selected = state['params'], int(jax.device_get(state['best_step']))
      if selected < 0:  # Nothing scored better than -inf (NaN scores): the final params.
        selected = step
      if selected != step:  # An earlier evaluation scored better: its params go on.
        params = state['best_params']
        metrics = run_eval(params, evals.final)
        metrics_lib.log(f'selected the params of step {selected}: ' + _fmt(metrics))
      metrics['selected_step'] = selected
      writer.write(step, {'eval/selected_step': selected})
    if evals.test is not None:
      test = run_eval(params, evals.test)
      test.update(evals.extra(params) if evals.extra else {})
      test = {f'test/{k}': v for k, v in test.items()}
      writer.write(step, test)
      metrics_lib.log(f'test @ {step}: ' + _fmt({k[5:]: v for k, v in test.items()}))
      metrics.update(test)
    return metrics, state

  def consider(state, metrics: dict) -> State:
    """The state, its params kept as the best if they score better than the best so far."""
    value = score(metrics)
    if value > float(jax.device_get(state['best_score'])):
      return program.keep_best(state, jnp.float32(value))
    return state

  try:
    if preemption.carried():  # A notice that came in or after an earlier run's last step.
      metrics_lib.log(
        f'preempted ({preemption.signal}) before training; rerun the same command to resume.'
      )
      preemption.answered()
      return {}
    state, step = _start(
      program, ckpt, batches, init_rng, warm_start or config.init.from_checkpoint
    )
    progress = metrics_lib.Progress(
      steps, job.tokens_per_step, job.flops_per_step, metrics_lib.peak_flops()
    )
    lr_schedule = optim.schedule(config.optim, steps)  # For logging; the step has its own.
    lr_schedule(0)  # Its small jits compile here, not in the first timed window.
    eval_metrics, start = {}, step
    # A log step's metrics stay on the device until the next step is dispatched, so the host
    # never waits for the step it just queued: (step, metrics) or None.
    pending = None

    def log_pending():
      nonlocal pending
      if pending is None:
        return
      (logged, step_metrics), pending = pending, None
      fetched = jax.device_get(step_metrics)  # Waits for that step only.
      scalars = {
        'train/loss': fetched['loss'],
        'train/grad_norm': fetched['grad_norm'],
        'train/lr': lr_schedule(logged - 1),
        'train/nonfinite_skipped': _check_finite(config, fetched),
        **progress.report(logged),
      }
      writer.write(logged, scalars)
      metrics_lib.log(metrics_lib.progress_line(logged, steps, scalars))

    batches = DevicePrefetch(batches, lambda b: sharding.put_batch(b, job.mesh, job.rules))
    while step < steps:
      state, step_metrics = program.train_step(state, next(batches), train_rng)
      step += 1
      if step < steps:
        batches.fill()  # The next batch, while this step runs.
      log_pending()  # The previous log step's, now that this step is queued behind it.
      if step == start + 1:  # Leave compilation out of throughput: time from its step's end.
        jax.block_until_ready(step_metrics)
        progress.reset(step)
      if step % config.train.log_every == 0 or step == steps:
        pending = (step, step_metrics)
      preempted = preemption.reached(step)
      if (
        step == steps or step % config.train.eval_every == 0 or ckpt.should_save(step) or preempted
      ):
        log_pending()  # Before anything that waits for this step anyway.
      if step == steps:
        eval_metrics, state = final_eval(state, step)
        progress.reset(step)
      elif step % config.train.eval_every == 0:
        # Selection scores the whole split, as the final evaluation does.
        eval_metrics = run_eval(state['params'], evals.final if select else evals.periodic)
        writer.write(step, {f'eval/{k}': v for k, v in eval_metrics.items()})
        metrics_lib.log(f'eval @ {step}: ' + _fmt(eval_metrics))
        if select:
          state = consider(state, eval_metrics)
        progress.reset(step)  # Leave evals out of throughput.
      if ckpt.should_save(step) or step == steps or preempted:
        _check_finite(config, state)  # Never save a state that a non-finite step touched.
        started = time.perf_counter()
        ckpt.save(step, state, batches, job.meta)
        writer.write(step, {'checkpoint/blocking_sec': time.perf_counter() - started})
      if preempted:
        ckpt.wait()
        if step < steps:  # Unfinished: callers (study scripts) stop and rerun later.
          preemption.answered()
          eval_metrics = {}
          metrics_lib.log(
            f'preempted ({preemption.signal}) at step {step}: checkpoint saved to '
            f'{ckpt.directory / str(step)}; rerun the same command to resume.'
          )
        # Else finished: the notice goes on to the next loop in this process (its caller's next
        # run), which stops before training.
        break
    if start == steps:
      metrics_lib.log(
        'no training steps: evaluating.'
        if not steps
        else f'nothing to train: the checkpoint is already at the final step {steps} (raise '
        f'config.train.steps to train further); evaluating it.'
      )
      eval_metrics, state = final_eval(state, step)
    return eval_metrics
  finally:
    preemption.restore_handlers()
    ckpt.close()
    writer.close()


def _start(program: Program, ckpt, batches, init_rng, warm_start) -> tuple[State, int]:
  """(state, step) to train from: the newest checkpoint's (the data iterator restored with it),
  or a fresh state whose params `warm_start` (a checkpoint, if any) shares are loaded."""
  target = checkpoint.with_shardings(program.abstract, program.shardings)
  restored = ckpt.restore_latest(target, batches)
  if restored:
    state, step = restored
    metrics_lib.log(f'resumed from {ckpt.directory / str(step)} at step {step}')
    return state, step
  state = program.init(init_rng)
  if warm_start:
    state['params'] = checkpoint.load_backbone(warm_start, state['params'], log=metrics_lib.log)
  return state, 0


def _fmt(metrics: dict[str, float]) -> str:
  return ', '.join(f'{k} {v:.4f}' for k, v in metrics.items())
