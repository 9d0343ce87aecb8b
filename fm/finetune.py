"""Adaptation: a pretrained (or freshly initialised) backbone trained and scored on a task.

fm/runs.py finds or trains the backbone run (`config.pretrained`) and hands it over with the
resolved config; the keys are documented in fm/configs.py (`task`, `task_args`, `finetune`) and
the task's kind (fm/tasks/_<kind>.py), which encodes the examples, puts the head on the backbone
and scores it. Modes (`config.finetune.mode`): `full`; `linear_probe` (the backbone frozen: no
gradients, no optimizer state); `lora` (adapters of `lora_rank` / `lora_alpha` on
`lora_targets`, plus the head); for classification on a decoder also `zero_shot` / `few_shot`
(no training: the label whose word the LM finds most likely after the task's prompt) and
`prompt` (the whole LM fine-tuned on those label-word choices, no new head).

  python -m fm.finetune merge WORKDIR    # folds LoRA adapters into the weights: WORKDIR/merged
"""

import dataclasses
import json
import os
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from fm import ConfigError, checkpoint, optim, registry, sharding, tasks, train
from fm import metrics as metrics_lib
from fm.data import pipeline
from fm.models import layers

INITS = ('pretrained', 'random')


@dataclasses.dataclass(frozen=True)
class Backbone:
  """The pretraining run a fine-tuning run starts from."""

  config: ml_collections.ConfigDict  # Its resolved config: model, objective, data, tokenizer.
  ckpt: pathlib.Path | None  # Its checkpoint; None for finetune.init=random.


# =============================================================================================
# Config
# =============================================================================================
def validate(
  config: ml_collections.ConfigDict,
  mesh_shape: dict[str, int],
  batch_ways: int,
  backbone_config: ml_collections.ConfigDict,
):
  """Checks of a fine-tuning config and its backbone's that need no data or compilation, run
  identically on every host before anything trains. Returns the task."""
  task = registry.get('tasks', config.task)
  kind = tasks.kind_of(task)
  mode, init = config.finetune.mode, config.finetune.init
  if mode not in task.MODES:
    raise ConfigError(
      f'config.finetune.mode={mode!r} is unknown for a {task.KIND} task; choose '
      f'one of: {", ".join(task.MODES)}.'
    )
  if init not in INITS:
    raise ConfigError(
      f'config.finetune.init={init!r} is unknown; choose one of: {", ".join(INITS)}.'
    )
  if mode == 'lora' and config.finetune.lora_rank < 1:
    raise ConfigError(
      f'config.finetune.lora_rank={config.finetune.lora_rank} must be >= 1 for mode lora.'
    )
  fraction = config.task_args.train_fraction
  if not 0 < fraction <= 1:
    raise ConfigError(f'config.task_args.train_fraction={fraction} must lie in (0, 1].')
  kind.validate(task, config)
  family_name = backbone_config.model.name
  kind.check_backbone(task, config, family_name, registry.get('models', family_name))
  max_len = getattr(train.model_config(backbone_config)[1], 'max_len', None)
  if max_len is not None and kind.row_length(config) > max_len:
    raise ConfigError(
      f'config.data: rows of {kind.row_length(config)} tokens exceed the backbone max_len='
      f'{max_len}; shorten them.'
    )
  train.check_run(config)
  train.check_batch(config, mesh_shape, batch_ways)
  return task


# =============================================================================================
# Fine-tuning
# =============================================================================================
def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, backbone: Backbone
) -> dict[str, float]:
  """Fine-tunes per `config`, resolved and checked by fm.runs.run, from `backbone`; returns the
  final validation metrics and the test metrics (as test/*)."""
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  task = registry.get('tasks', config.task)
  kind = tasks.kind_of(task)
  family_name = backbone.config.model.name
  family = registry.get('models', family_name)
  mode, global_batch = config.finetune.mode, config.train.global_batch
  steps = config.train.steps if kind.trains(config) else 0
  row_len = kind.row_length(config)

  # Data: the task's splits, encoded with the backbone's tokenizer (images need none).
  tokenizer = pipeline.load_tokenizer(backbone.config.data) if family.MODALITY == 'text' else None
  splits = kind.load(task, config)
  named = {
    'train': subset(splits['train'], config.task_args.train_fraction, config.seed),
    'validation': splits['validation'],
    'test': splits['test'],
  }
  if len(named['train']) < global_batch:
    raise ConfigError(
      f'config.task_args.train_fraction={config.task_args.train_fraction} leaves '
      f'{len(named["train"])} training examples, fewer than '
      f'config.train.global_batch={global_batch}.'
    )
  rows = kind.encode_splits(task, named, tokenizer, config, family)
  pidx, pcount = jax.process_index(), jax.process_count()
  batches = pipeline.example_dataset(
    rows['train'], global_batch, config.data.seed, pidx, pcount, kind.transform(task, config)
  )
  in_order = lambda split, limit: pipeline.example_batches(
    rows[split], global_batch, limit, pidx, pcount
  )

  # Model: the backbone's fields with the task's head (and adapters).
  model_cfg = family.Config(
    **{
      **backbone_fields(backbone, tokenizer),
      **kind.model_fields(task, config, family),
      'lora_rank': config.finetune.lora_rank if mode == 'lora' else 0,
      'lora_alpha': config.finetune.lora_alpha,
      'lora_targets': tuple(config.finetune.lora_targets),
    }
  )
  model = family.Model(model_cfg)
  row_len = row_len or family.sequence_length(model_cfg)  # Fixed by the model (patches).
  sample = train.sample_inputs(family, model_cfg, global_batch, row_len)
  abstract = sharding.unbox(jax.eval_shape(model.init, jax.random.key(0), *sample))
  mask = trainable_mask(abstract, mode if kind.trains(config) else 'none')
  counts = param_counts(abstract, mask)
  tx = make_tx(config, mask, steps) if kind.trains(config) else optax.set_to_zero()
  # Frozen parts skip their weight gradients (a linear probe skips the backbone's backward).
  if family.flops_per_row is None:
    flops_per_row = family.flops_per_token(model_cfg, row_len) * row_len
  elif model_cfg.num_classes:  # A classifier reads its input alone (an encoder-decoder's encoder).
    flops_per_row = family.flops_per_row(model_cfg, row_len, 0)
  else:  # A seq2seq row: its source and target.
    flops_per_row = family.flops_per_row(model_cfg, config.data.source_len, config.data.target_len)
  # Rows per example: one, or one per label when the LM scores each label's word (prompting).
  per_example = int(np.prod(rows['train'].get('tokens', np.zeros((1, 1))).shape[1:-1]))
  flops_per_step = flops_per_row * global_batch * per_example
  flops_per_step *= {'full': 1.0, 'prompt': 1.0, 'lora': 2 / 3}.get(mode, 1 / 3)
  meta = train.record(
    workdir,
    config,
    family_name,
    model_cfg,
    tokenizer,
    counts,
    mesh,
    pretrained=str(backbone.ckpt) if backbone.ckpt else None,
    backbone_config=backbone.config.to_dict(),
  )
  metrics_lib.log(
    f'task {config.task} ({task.KIND}; {len(named["train"])} train / '
    f'{len(named["validation"])} validation / {len(named["test"])} test) on '
    f'{family_name} backbone ({"from " + str(backbone.ckpt) if backbone.ckpt else "random init"}), '
    f'mode {mode}: {counts["trainable"]:,} of {counts["total"]:,} params train '
    f'({100 * counts["trainable"] / max(counts["backbone"], 1):.2f}% of the backbone)'
  )

  with sharding.use(mesh, rules):
    loss_fn = kind.make_loss(task, config, family, model_cfg)
    program = train.build(model, tx, loss_fn, config, mesh, rules, sample, trainable=mask)
    evals = train.Evals(
      kind.summarize,
      in_order('validation', config.train.eval_batches),
      in_order('validation', -1),
      in_order('test', -1),
      kind.generation(
        task, config, tokenizer, family, model_cfg, named['test'], mesh, rules, workdir
      ),
    )
    tokens = global_batch * row_len * per_example
    job = train.Job(config, workdir, mesh, rules, meta, steps, tokens, flops_per_step)
    return train.loop(job, program, iter(batches), evals, backbone.ckpt)


def backbone_fields(backbone: Backbone, tokenizer) -> dict:
  """The backbone's model fields: as stored with its checkpoint, or (random init) as its
  experiment builds them for its tokenizer."""
  if backbone.ckpt is not None:
    return dict(checkpoint.read_meta(backbone.ckpt)['model'])
  run = backbone.config
  if tokenizer is None:  # Images.
    return dict(train.model_config(run)[1].__dict__)
  objective = registry.get('objectives', run.objective)
  return dict(train.model_config(run, tokenizer.vocab_size + objective.EXTRA_TOKENS)[1].__dict__)


def subset(examples: list, fraction: float, seed: int) -> list:
  """A seeded share of the training examples (all of them at fraction 1), in their order."""
  if fraction >= 1:
    return list(examples)
  keep = np.random.default_rng(seed).permutation(len(examples))
  return [examples[i] for i in np.sort(keep[: max(1, round(fraction * len(keep)))])]


def trainable_mask(params, mode: str):
  """True for the params a mode trains: all (full, prompt), the head (linear_probe), head and
  adapters (lora), none ('none': a mode that does not train)."""

  def trains(path, _):
    name = checkpoint.key_name(path)
    return mode != 'none' and (
      mode in ('full', 'prompt')
      or 'head' in name.split('/')
      or (mode == 'lora' and name.endswith(layers.LORA_SUFFIXES))
    )

  return jax.tree_util.tree_map_with_path(trains, params)


def param_counts(abstract, mask) -> dict[str, int]:
  """Parameters in all, trainable, and of the backbone (everything but head and adapters)."""
  sizes = [
    (int(np.prod(x.shape)), t, b)
    for x, t, b in zip(
      jax.tree.leaves(abstract),
      jax.tree.leaves(mask),
      jax.tree.leaves(trainable_mask(abstract, 'lora')),
    )
  ]
  return {
    'total': sum(n for n, _, _ in sizes),
    'trainable': sum(n for n, t, _ in sizes if t),
    'backbone': sum(n for n, _, b in sizes if not b),
  }


def make_tx(config, mask, total_steps: int) -> optax.GradientTransformation:
  """AdamW on the params `mask` marks trainable (a head at `finetune.head_lr` when that is set);
  frozen params get a zero update and no optimizer state."""
  head_lr = config.finetune.head_lr

  def label(path, trains):
    if not trains:
      return 'frozen'
    return 'head' if head_lr and 'head' in checkpoint.key_name(path).split('/') else 'train'

  labels = jax.tree_util.tree_map_with_path(label, mask)
  transforms = {'train': optim.make(config.optim, total_steps), 'frozen': optax.set_to_zero()}
  if head_lr:
    transforms['head'] = optim.make(
      ml_collections.ConfigDict({**config.optim.to_dict(), 'lr': head_lr}), total_steps
    )
  return optax.multi_transform(transforms, labels)


# =============================================================================================
# Merging LoRA adapters
# =============================================================================================
def merge(path: str) -> tuple[pathlib.Path, float]:
  """Writes WORKDIR/merged (params with adapters folded in, lora_rank 0, same layout as a
  checkpoint) and returns it with the largest |merged - unmerged| logit on random inputs."""
  ckpt = checkpoint.resolve(path, 'WORKDIR')
  meta = checkpoint.read_meta(ckpt)
  if not meta['model'].get('lora_rank'):
    raise ConfigError(f'{ckpt} has no LoRA adapters (model.lora_rank is 0); nothing to merge.')
  out = checkpoint.workdir_of(ckpt) / 'merged'
  if out.exists():
    raise ConfigError(f'{out} exists already; move it away to merge again.')
  family = registry.get('models', checkpoint.family(meta))
  model, params, _ = checkpoint.restore_local(ckpt)
  with sharding.use(sharding.local_mesh(), sharding.DEFAULT_RULES):
    model_cfg = model.model_cfg
    merged = layers.merge_lora(params, model_cfg.lora, stacked=model_cfg.scan_layers)
    merged_cfg = dataclasses.replace(model_cfg, lora_rank=0)
    tokens = jax.random.randint(jax.random.key(0), (4, 32), 4, model_cfg.vocab_size)
    before = model.apply(params, *family.inputs(model_cfg, tokens))
    after = family.Model(merged_cfg).apply(merged, *family.inputs(merged_cfg, tokens))
    diff = float(jnp.max(jnp.abs(before - after)))
  # Written next to `out` and renamed when whole: an interrupted merge leaves no `merged`.
  partial = out.with_name(f'.{out.name}.{os.getpid()}')
  ocp.PyTreeCheckpointer().save(partial / 'state', {'params': merged})
  (partial / 'meta').mkdir()
  (partial / 'meta' / 'metadata').write_text(
    json.dumps({**meta, 'model': merged_cfg.__dict__}, default=str)
  )
  try:
    partial.rename(out)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
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
