"""Adaptation: a pretrained (or freshly initialised) backbone trained and scored on a task.

Config keys (see experiments/transfer_sentiment.py):
  task                 a module in fm/tasks/ (`sentiment`, `question_type`); `task_args.train_fraction`
                       keeps that share of the training labels (seeded by `seed`)
  pretrained           the backbone run: `.experiment` trains it into WORKDIR/pretrained unless it is
                       there already; `.workdir` points at a finished run instead
  finetune.init        `pretrained` (warm start) or `random` (same architecture and tokenizer, fresh)
  finetune.mode        `full`, `linear_probe` (backbone frozen: no gradients, no optimizer state)
                       or `lora` (adapters of `lora_rank`/`lora_alpha` on `lora_targets`, plus the head)
  finetune.pool        how the head pools the backbone's states (default: last token for a decoder,
                       mean for an encoder or an encoder-decoder's encoder)
  finetune.head_lr     optional learning rate of the head (default: optim.lr)
  finetune.beams       seq2seq: the beam width of the beam-search scores (greedy is scored too)
  finetune.no_repeat_ngram  seq2seq: n > 0 keeps decoding from repeating an n-gram it generated
  finetune.mode        also `zero_shot` / `few_shot` (decoder backbones, no training): the label whose
                       word the LM finds most likely after the task's prompt, with `finetune.shots`
                       demonstrations drawn from the training split (default 4) for few_shot

  python -m fm.finetune merge WORKDIR    # folds LoRA adapters into the weights: WORKDIR/merged
"""

import json
import pathlib
import sys

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from fm import ConfigError, checkpoint, optim, registry, sharding, train
from fm import metrics as metrics_lib
from fm.data import pipeline
from fm.models import layers
from fm.tasks import _classification

MODES = _classification.MODES  # Every mode; a seq2seq task takes full and lora.
PROMPT_MODES = ('zero_shot', 'few_shot')  # No training: a causal LM scores label words.
INITS = ('pretrained', 'random')


def _ft(config) -> ml_collections.ConfigDict:
  return config.get('finetune', ml_collections.ConfigDict())


def validate(config, mesh_shape: dict[str, int], batch_ways: int):
  """Checks that need no data or compilation, run identically on every host."""
  task = registry.get('tasks', config.task)
  ft = _ft(config)
  mode, init = ft.get('mode', 'full'), ft.get('init', 'pretrained')
  if mode not in task.MODES:
    raise ConfigError(
      f'config.finetune.mode={mode!r} is unknown for a {task.KIND} task; choose '
      f'one of: {", ".join(task.MODES)}.'
    )
  if init not in INITS:
    raise ConfigError(
      f'config.finetune.init={init!r} is unknown; choose one of: {", ".join(INITS)}.'
    )
  spec = train.check_pretrained_spec(config.get('pretrained'), 'config.pretrained')
  if init == 'random' and not spec.get('experiment'):
    raise ConfigError(
      'config.finetune.init=random needs config.pretrained.experiment: its model '
      'and tokenizer define the backbone that starts from scratch.'
    )
  if ft.get('pool') and ft.pool not in layers.POOLS:
    raise ConfigError(
      f'config.finetune.pool={ft.pool!r} is unknown; choose one of: {", ".join(layers.POOLS)}.'
    )
  if mode == 'lora' and ft.get('lora_rank', 8) < 1:
    raise ConfigError(f'config.finetune.lora_rank={ft.lora_rank} must be >= 1 for mode lora.')
  fraction = config.get('task_args', {}).get('train_fraction', 1.0)
  if not 0 < fraction <= 1:
    raise ConfigError(f'config.task_args.train_fraction={fraction} must lie in (0, 1].')
  train.check_batch(config, mesh_shape, batch_ways)
  return task


def backbone(config, workdir: pathlib.Path):
  """(the backbone run's config, its model fields, its checkpoint or None for random init).

  Returns None when training the backbone was interrupted (rerunning resumes it)."""
  spec = config.pretrained
  if _ft(config).get('init', 'pretrained') == 'random':
    run = train.load_config(spec.experiment, 'config.pretrained.experiment')
    objective = registry.get('objectives', run.objective)
    vocab = pipeline.load_tokenizer(run.data).vocab_size + getattr(objective, 'EXTRA_TOKENS', 0)
    return run, dict(train.model_config(run, vocab)[1].__dict__), None
  ckpt = train.pretrained(spec, 'config.pretrained', workdir / 'pretrained')
  if ckpt is None:
    return None
  meta = checkpoint.read_meta(ckpt)
  return ml_collections.ConfigDict(meta['config']), dict(meta['model']), ckpt


def subset(examples: list, fraction: float, seed: int) -> list:
  """A seeded share of the training examples (all of them at fraction 1), in their order."""
  if fraction >= 1:
    return list(examples)
  keep = np.random.default_rng(seed).permutation(len(examples))
  return [examples[i] for i in np.sort(keep[: max(1, round(fraction * len(keep)))])]


def trainable_mask(params, mode: str):
  """True for the params a mode trains: all (full), the head (linear_probe), head and adapters
  (lora)."""

  def trains(path, _):
    keys = [str(getattr(k, 'key', k)) for k in path]
    return (
      mode == 'full'
      or 'head' in keys
      or (mode == 'lora' and keys[-1].endswith(layers.LORA_SUFFIXES))
    )

  return jax.tree_util.tree_map_with_path(trains, params)


def make_tx(config, mask, total_steps: int) -> optax.GradientTransformation:
  """AdamW on the params `mask` marks trainable (the head optionally at its own rate); frozen
  params get a zero update and no optimizer state."""
  head_lr = _ft(config).get('head_lr')

  def label(path, trains):
    if not trains:
      return 'frozen'
    keys = [str(getattr(k, 'key', k)) for k in path]
    return 'head' if head_lr and 'head' in keys else 'train'

  labels = jax.tree_util.tree_map_with_path(label, mask)
  transforms = {'train': optim.make(config.optim, total_steps), 'frozen': optax.set_to_zero()}
  if head_lr:
    transforms['head'] = optim.make(
      ml_collections.ConfigDict({**config.optim.to_dict(), 'lr': head_lr}), total_steps
    )
  return optax.multi_transform(transforms, labels)


def example_inputs(model_name: str, batch_size: int, seq_len: int) -> tuple:
  z = jnp.zeros((batch_size, seq_len), jnp.int32)
  return (z, None, z) if model_name == 'encdec' else (z, z, z)


def _lengths(config, task) -> tuple[int, int]:
  """(model input length for init and FLOPs, source length or 0) of a task's rows."""
  if task.KIND == 'seq2seq':
    return config.data.source_len + config.data.target_len, config.data.source_len
  return config.data.seq_len, 0


def _classification_data(config, task, mode, tokenizer, named):
  """Arrays per split and the loss of a classification task (or its prompt scoring)."""
  ft, seq_len = _ft(config), config.data.seq_len
  if mode in PROMPT_MODES:
    shots = ft.get('shots', 4) if mode == 'few_shot' else 0
    train_examples = named['train']
    order = np.random.default_rng(config.get('seed', 0)).permutation(len(train_examples))
    demos = [train_examples[i] for i in order[:shots]]
    arrays = {
      k: _classification.encode_prompts(named[k], demos, task, tokenizer, seq_len)
      for k in ('validation', 'test')
    }
    arrays['train'] = arrays['validation']  # Never read: nothing trains.
    return arrays, _classification.make_scoring_fn(len(task.LABELS))
  arrays = {k: task.encode(v, tokenizer, seq_len) for k, v in named.items()}
  return arrays, None


def _generation_eval(config, task, family, model_cfg, tokenizer, pairs, mesh, rules, workdir):
  """params -> generation metrics (greedy_* and beam_*) on `pairs`, decoded with the KV cache
  on the training mesh; the first predictions are written to WORKDIR/samples.txt."""
  from fm import decoding

  ft, model_name = _ft(config), 'encdec' if family == 'encdec' else 'decoder'
  tokens, seg = task.prompts(pairs, tokenizer, model_name, config.data.source_len)
  batch, max_new, beams = config.train.global_batch, config.data.target_len, ft.get('beams', 4)
  ngram = ft.get('no_repeat_ngram', 0)
  pidx, pcount = jax.process_index(), jax.process_count()
  references = [t for _, t in pairs]

  def decode_all(params, fn):
    out = []
    for i in range(0, len(pairs), batch):
      rows = {'tokens': tokens[i : i + batch], 'segment_ids': seg[i : i + batch]}
      real = len(rows['tokens'])
      rows = {
        k: np.concatenate([v, np.zeros((batch - real, v.shape[1]), v.dtype)])[
          pidx * batch // pcount : (pidx + 1) * batch // pcount
        ]
        for k, v in rows.items()
      }
      rows = sharding.put_batch(rows, mesh, rules)
      generated = multihost_utils.process_allgather(
        fn(params, rows['tokens'], rows['segment_ids']), tiled=True
      )
      out += [task.target_text(tokenizer, row) for row in np.asarray(generated)[:real]]
    return out

  def run(params):
    limit = tokenizer.vocab_size  # Never padding ids of the vocabulary or sentinels.
    greedy = lambda p, t, s: decoding.greedy(family, model_cfg, p, t, s, max_new, limit, ngram)
    beam = lambda p, t, s: decoding.beam_search(
      family,
      model_cfg,
      p,
      t,
      s,
      max_new,
      beams,
      tokenizer.eos_id,
      vocab_limit=limit,
      no_repeat_ngram=ngram,
    )
    metrics, samples = {}, {}
    for name, fn in (('greedy', greedy), (f'beam{beams}', beam)):
      samples[name] = decode_all(params, fn)
      scores = task.generation_metrics(samples[name], references)
      metrics.update({f'{name}_{k}': v for k, v in scores.items()})
    if pidx == 0:
      lines = []
      for i in range(min(20, len(pairs))):
        lines += (
          [f'source:    {pairs[i][0][:300]}', f'reference: {references[i]}']
          + [f'{name + ":":<10} {samples[name][i]}' for name in samples]
          + ['']
        )
      (workdir / 'samples.txt').write_text('\n'.join(lines))
    return metrics

  return run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Fine-tunes per `config` (training the backbone first if asked); returns the final
  validation metrics and the test metrics (as test/*)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  task = validate(config, dict(mesh.shape), sharding.batch_divisor(mesh, rules))
  found = backbone(config, workdir)
  if found is None:
    metrics_lib.log('stopped while training the backbone; rerun the same command to resume.')
    return {}
  run, fields, ckpt = found
  ft = _ft(config)
  mode, model_name = ft.get('mode', 'full'), run.model.name
  if model_name not in task.COMPATIBLE_MODELS:
    raise ConfigError(
      f'config.task={config.task!r} ({task.KIND}) cannot use a {model_name!r} '
      f'backbone; compatible: {", ".join(task.COMPATIBLE_MODELS)}.'
    )
  if mode in PROMPT_MODES and model_name != 'decoder':
    raise ConfigError(
      f'config.finetune.mode={mode!r} scores label words with a causal LM, but the '
      f'backbone is an {model_name!r} model; use a decoder backbone or one of: '
      f'full, linear_probe, lora.'
    )
  if mode in PROMPT_MODES:  # Nothing trains.
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.steps = 0
  global_batch, steps = config.train.global_batch, config.train.steps
  seq_len, source_len = _lengths(config, task)
  if seq_len > fields['max_len']:
    raise ConfigError(
      f'config.data: rows of {seq_len} tokens exceed the backbone max_len='
      f'{fields["max_len"]}; shorten them.'
    )

  # Data: the task's splits, encoded with the backbone's tokenizer.
  tokenizer = pipeline.load_tokenizer(run.data)
  splits = task.load(seed=config.get('task_args', {}).get('split_seed', 0))
  fraction = config.get('task_args', {}).get('train_fraction', 1.0)
  named = {
    'train': subset(splits['train'], fraction, config.get('seed', 0)),
    'validation': splits['validation'],
    'test': splits['test'],
  }
  if len(named['train']) < global_batch:
    raise ConfigError(
      f'config.task_args.train_fraction={fraction} leaves {len(named["train"])} '
      f'training examples, fewer than config.train.global_batch={global_batch}.'
    )
  if task.KIND == 'seq2seq':
    arrays = {
      k: task.encode(v, tokenizer, model_name, source_len, config.data.target_len)
      for k, v in named.items()
    }
    loss_fn = task.make_loss_fn(model_name)
    fields.update(lora_rank=ft.get('lora_rank', 8) if mode == 'lora' else 0)
  else:
    arrays, loss_fn = _classification_data(config, task, mode, tokenizer, named)
    loss_fn = loss_fn or task.make_loss_fn(len(task.LABELS), model_name)
    fields.update(
      num_classes=0 if mode in PROMPT_MODES else len(task.LABELS),
      pool=ft.get('pool') or task.DEFAULT_POOL[model_name],
      lora_rank=ft.get('lora_rank', 8) if mode == 'lora' else 0,
    )
  fields.update(
    lora_alpha=ft.get('lora_alpha', 16.0),
    lora_targets=tuple(ft.get('lora_targets', layers.LoRA.targets)),
  )
  pidx, pcount = jax.process_index(), jax.process_count()
  train_ds = pipeline.example_dataset(
    arrays['train'], global_batch, config.data.get('seed', 0), pidx, pcount
  )
  eval_sets = {
    'periodic': pipeline.example_batches(
      arrays['validation'], global_batch, config.train.get('eval_batches', -1), pidx, pcount
    ),
    'final': pipeline.example_batches(arrays['validation'], global_batch, -1, pidx, pcount),
    'test': pipeline.example_batches(arrays['test'], global_batch, -1, pidx, pcount),
  }

  # Model: the backbone's fields with a classification head or the LM head (and adapters).
  module = registry.get('models', model_name)
  model_cfg = module.Config(**fields)
  model = module.Model(model_cfg)
  sample = example_inputs(model_name, global_batch, seq_len)
  if task.KIND == 'seq2seq' and model_name == 'encdec':
    sample = tuple(
      jnp.zeros((global_batch, n), jnp.int32)
      for n in (source_len, config.data.target_len, source_len, config.data.target_len)
    )
  abstract = sharding.unbox(jax.eval_shape(model.init, jax.random.key(0), *sample))
  mask = trainable_mask(abstract, mode)
  sizes = [
    (int(np.prod(x.shape)), t, b)
    for x, t, b in zip(
      jax.tree.leaves(abstract),
      jax.tree.leaves(mask),
      jax.tree.leaves(trainable_mask(abstract, 'lora')),
    )
  ]
  counts = {
    'total': sum(n for n, _, _ in sizes),
    'trainable': sum(n for n, t, _ in sizes if t),
    'backbone': sum(n for n, _, b in sizes if not b),
  }
  tx = optax.set_to_zero() if mode in PROMPT_MODES else make_tx(config, mask, steps)
  # Frozen parts skip their weight gradients (a linear probe skips the backbone's backward).
  flops_per_step = (
    module.flops_per_token(model_cfg, seq_len)
    * global_batch
    * seq_len
    * ({'full': 1.0, 'lora': 2 / 3}.get(mode, 1 / 3))
  )

  resolved = train.record(
    workdir,
    config,
    model_name,
    model_cfg,
    tokenizer,
    counts,
    mesh,
    pretrained=str(ckpt) if ckpt else None,
    backbone_config=run.to_dict(),
  )
  what = f'{len(task.LABELS)} classes' if task.KIND == 'classification' else task.KIND
  metrics_lib.log(
    f'task {config.task} ({what}; {len(named["train"])} train / '
    f'{len(named["validation"])} validation / {len(named["test"])} test) on '
    f'{model_name} backbone ({"from " + str(ckpt) if ckpt else "random init"}), '
    f'mode {mode}: {counts["trainable"]:,} of {counts["total"]:,} params train '
    f'({100 * counts["trainable"] / max(counts["backbone"], 1):.2f}% of the '
    f'backbone)'
  )

  with train.session(workdir, config, mesh, rules) as (ckpt_manager, preemption):
    generation = None
    if task.KIND == 'seq2seq':
      examples = named['test'][: config.get('task_args', {}).get('eval_examples', 200)]
      family = 'encdec' if model_name == 'encdec' else 'prefix_lm'
      generation = _generation_eval(
        config, task, family, model_cfg, tokenizer, examples, mesh, rules, workdir
      )
    program = train.build(model, tx, loss_fn, config, mesh, rules, sample, trainable=mask)
    return train.loop(
      config,
      workdir,
      task,
      ckpt_manager,
      preemption,
      resolved,
      mesh,
      rules,
      program,
      iter(train_ds),
      eval_sets,
      flops_per_step,
      warm_start=ckpt,
      test_extra=generation,
    )


# ---------------------------------------------------------------------------------------------
# Merging LoRA adapters.
# ---------------------------------------------------------------------------------------------
def merge(path: str) -> tuple[pathlib.Path, float]:
  """Writes WORKDIR/merged (params with adapters folded in, lora_rank 0, same layout as a
  checkpoint) and returns it with the largest |merged - unmerged| logit on random inputs."""
  ckpt = checkpoint.resolve(path, 'WORKDIR')
  meta = checkpoint.read_meta(ckpt)
  fields = meta['model']
  if not fields.get('lora_rank'):
    raise ConfigError(f'{ckpt} has no LoRA adapters (model.lora_rank is 0); nothing to merge.')
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1]
  )
  rules = sharding.DEFAULT_RULES
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    model, params, _ = train.restore_model(
      ckpt, mesh, rules, example_inputs(train.family(meta), 1, 16)
    )
    cfg = model.cfg
    merged = layers.merge_lora(params, cfg.lora, stacked=cfg.scan_layers)
    merged_cfg = type(cfg)(**{**cfg.__dict__, 'lora_rank': 0})
    tokens = jax.random.randint(jax.random.key(0), (4, 32), 4, cfg.vocab_size)
    seg = jnp.ones_like(tokens)
    inputs = (
      (tokens, None, seg)
      if train.family(meta) == 'encdec'
      else (tokens, seg, jnp.broadcast_to(jnp.arange(32), tokens.shape))
    )
    before = model.apply(params, *inputs)
    after = type(model)(merged_cfg).apply(merged, *inputs)
    diff = float(jnp.max(jnp.abs(before - after)))
  out = ckpt.parents[1] / 'merged' if ckpt.parent.name == 'checkpoints' else ckpt.parent / 'merged'
  if out.exists():
    raise ConfigError(f'{out} exists already; move it away to merge again.')
  ocp.PyTreeCheckpointer().save(out / 'state', {'params': merged})
  (out / 'meta').mkdir()
  (out / 'meta' / 'metadata').write_text(
    json.dumps({**meta, 'model': merged_cfg.__dict__}, default=str)
  )
  return out, diff


def main(argv: list[str]) -> int:
  if len(argv) != 3 or argv[1] != 'merge':
    print('usage: python -m fm.finetune merge WORKDIR (a LoRA fine-tuning run)', file=sys.stderr)
    return 2
  try:
    out, diff = merge(argv[2])
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'merged adapters into {out}; max |logit difference| on random inputs: {diff:.3g}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
