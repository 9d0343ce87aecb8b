"""The classification kind: encoding, the head, the loss, accuracy / macro-F1, prompt scoring.

A classification task module provides `LABELS` and `load(seed) -> {'train', 'validation',
'test'}` of (text, label index) pairs, and for zero-/few-shot prompting a `PROMPT` and one
`LABEL_WORDS` entry per label. This module turns the examples into fixed-length rows, puts a
classifier head on the backbone's pooled states and scores the predictions. Metrics are summed as
a confusion matrix, so accuracy and macro-F1 over many batches and devices are exact.
"""

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fm import ConfigError
from fm.models import layers
from fm.tasks import Task

MODES = ('full', 'linear_probe', 'lora', 'prompt', 'zero_shot', 'few_shot')
PROMPT_MODES = ('zero_shot', 'few_shot')  # No training: a causal LM scores the label words.
# The modes that classify by the LM's label-word scores after the prompt: those two, and
# `prompt`, which fine-tunes the whole LM on those scores (prompt-based fine-tuning, Schick and
# Schütze 2021, Gao et al. 2021: the LM head is the classifier, nothing new is initialised).
SCORED_MODES = (*PROMPT_MODES, 'prompt')


class TaskContract(Task, Protocol):
  """What a classification task module provides, besides `Task`'s names."""

  # The class names; examples carry an index into them.
  LABELS: tuple[str, ...]
  # Zero- and few-shot and prompt: the prompt around an example's text ('...{text}...') and the
  # word the LM should continue it with, per label (' good', ' bad'). Optional: None turns those
  # modes off.
  PROMPT: str | None
  LABEL_WORDS: tuple[str, ...] | None


TASK_DEFAULTS: dict[str, Any] = {'MODES': MODES, 'PROMPT': None, 'LABEL_WORDS': None}
DATA_KEYS = ('seq_len',)  # Required config.data keys: tokens per row.
ARGS: dict[str, Any] = {}  # config.task_args of this kind, besides the shared ones.
FINETUNE = dict(  # config.finetune keys of this kind.
  pool='',  # How the head pools the final states (layers.POOLS; '': the backbone's POOL).
  shots=4,  # Demonstrations from the training split, for mode few_shot.
)


# =============================================================================================
# The kind's interface (fm/finetune.py)
# =============================================================================================
def row_length(config: ml_collections.ConfigDict) -> int:
  """Tokens per row: the model's input length."""
  return config.data.seq_len


def validate(task, config: ml_collections.ConfigDict) -> None:
  """Checks of the config that need neither data nor the backbone."""
  pool, mode = config.finetune.pool, config.finetune.mode
  if pool and pool not in layers.POOLS:
    raise ConfigError(
      f'config.finetune.pool={pool!r} is unknown; choose one of: {", ".join(layers.POOLS)}.'
    )
  if mode in SCORED_MODES and (task.PROMPT is None or task.LABEL_WORDS is None):
    raise ConfigError(
      f'config.finetune.mode={mode!r} needs the task to define PROMPT and LABEL_WORDS, which '
      f'{task.__name__} does not; add them (see fm/tasks/sentiment.py) or use one of: '
      f'{", ".join(m for m in task.MODES if m not in SCORED_MODES)}.'
    )


def load(task, config: ml_collections.ConfigDict) -> dict[str, list]:
  return task.load(seed=config.task_args.split_seed)


def transform(task, config: ml_collections.ConfigDict) -> None:
  """Text rows are used as encoded."""
  del task, config


def check_backbone(task, config: ml_collections.ConfigDict, family_name: str, family) -> None:
  """Any text backbone reads text for a classifier; prompt scoring needs a causal LM."""
  if family.MODALITY != 'text':
    raise ConfigError(
      f'config.task={task.__name__.split(".")[-1]!r} classifies text, but the backbone is an '
      f'{family_name!r} model, which reads {family.MODALITY}s; use a text backbone.'
    )
  mode = config.finetune.mode
  if mode in SCORED_MODES and family.SEQ2SEQ != 'prefix_lm':  # A decoder-only causal LM.
    raise ConfigError(
      f'config.finetune.mode={mode!r} scores label words with a causal LM, but the backbone is '
      f'an {family_name!r} model; use a decoder backbone or one of: full, linear_probe, lora.'
    )


def trains(config: ml_collections.ConfigDict) -> bool:
  """Whether the mode trains at all."""
  return config.finetune.mode not in PROMPT_MODES


def model_fields(task, config: ml_collections.ConfigDict, family) -> dict[str, Any]:
  """The head on top of the backbone: a classifier on pooled states (none when prompting: the
  LM's own head scores the label words)."""
  return {
    'num_classes': 0 if config.finetune.mode in SCORED_MODES else len(task.LABELS),
    'pool': config.finetune.pool or family.POOL,
  }


def encode_splits(
  task, named: dict[str, list], tokenizer, config: ml_collections.ConfigDict, family
) -> dict[str, dict[str, np.ndarray]]:
  """Rows of every split; for prompting, one row per label of each example (the training
  split's only with mode prompt: zero- and few-shot never read it)."""
  del family  # Every family reads the same rows.
  seq_len = config.data.seq_len
  if config.finetune.mode not in SCORED_MODES:
    return {k: encode(v, tokenizer, seq_len) for k, v in named.items()}
  if config.finetune.mode == 'prompt':
    return {k: encode_prompts(v, [], task, tokenizer, seq_len) for k, v in named.items()}
  shots = config.finetune.shots if config.finetune.mode == 'few_shot' else 0
  order = np.random.default_rng(config.seed).permutation(len(named['train']))
  demos = [named['train'][i] for i in order[:shots]]
  rows = {
    k: encode_prompts(named[k], demos, task, tokenizer, seq_len) for k in ('validation', 'test')
  }
  return {**rows, 'train': rows['validation']}


def make_loss(task, config: ml_collections.ConfigDict, family, model_cfg) -> Callable:
  """The loss of a batch of rows: the classifier's cross-entropy, or the label words' scores."""
  if config.finetune.mode in SCORED_MODES:
    return make_scoring_fn(len(task.LABELS))
  return make_loss_fn(len(task.LABELS), lambda *text: family.inputs(model_cfg, *text))


def generation(task, config, tokenizer, family, model_cfg, examples, mesh, rules, workdir) -> None:
  """Classifiers generate nothing: no metrics of generated text."""
  del task, config, tokenizer, family, model_cfg, examples, mesh, rules, workdir


# =============================================================================================
# Rows, loss and metrics
# =============================================================================================
def encode(examples: list[tuple[str, int]], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """Rows of BOS + text (cut to fit) + EOS, left-aligned, zero-padded (segment id 0)."""
  n = len(examples)
  tokens = np.zeros((n, seq_len), np.int32)
  segment_ids = np.zeros((n, seq_len), np.int32)
  for i, (text, _) in enumerate(examples):
    ids = [tokenizer.bos_id] + tokenizer.encode(text)[: seq_len - 2] + [tokenizer.eos_id]
    tokens[i, : len(ids)], segment_ids[i, : len(ids)] = ids, 1
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
  labels = np.array([label for _, label in examples], np.int32)
  return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions, 'label': labels}


def make_loss_fn(num_classes: int, inputs: Callable[..., tuple]) -> Callable:
  """`inputs(tokens, segment_ids, positions)`: the model's arguments that read a row's text
  (the family's `inputs`)."""

  def loss_fn(apply_fn, params, batch, rng):
    """Mean cross-entropy over real rows (weight 1); a confusion matrix for the metrics."""
    del rng
    text = inputs(batch['tokens'], batch['segment_ids'], batch['positions'])
    return _scored(apply_fn(params, *text), batch, num_classes)

  return loss_fn


def _scored(scores_BC, batch, num_classes: int):
  """Mean cross-entropy of the labels under `scores_BC` over real rows (weight 1), with the
  summable loss, count and confusion matrix (rows: true labels, columns: predictions)."""
  weight_B = batch.get('weight', jnp.ones(scores_BC.shape[0], jnp.float32))
  loss_B = optax.softmax_cross_entropy_with_integer_labels(scores_BC, batch['label'])
  confusion_CC = (
    jnp.zeros((num_classes, num_classes), jnp.float32)
    .at[batch['label'], jnp.argmax(scores_BC, -1)]
    .add(weight_B)
  )
  metrics = {
    'loss_sum': jnp.sum(loss_B * weight_B),
    'count': jnp.sum(weight_B),
    'confusion': confusion_CC,
  }
  return metrics['loss_sum'] / jnp.maximum(metrics['count'], 1.0), metrics


def scores(confusion: np.ndarray) -> dict[str, float]:
  """Accuracy and macro-F1 (the unweighted mean of per-class F1) of a confusion matrix whose
  rows are true labels and columns predictions."""
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  precision = tp / np.maximum(confusion.sum(0), 1e-12)
  recall = tp / np.maximum(confusion.sum(1), 1e-12)
  f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
  return {'accuracy': float(tp.sum() / max(confusion.sum(), 1.0)), 'macro_f1': float(f1.mean())}


def summarize(sums: dict) -> dict[str, float]:
  count = max(float(sums['count']), 1.0)
  return {'loss': float(sums['loss_sum']) / count, **scores(sums['confusion'])}


# =============================================================================================
# Prompting: a causal LM picks the label word it finds most likely (zero- and few-shot: no
# training; prompt: trained on the cross-entropy of those choices).
# =============================================================================================
def encode_prompts(examples, shots, task, tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """Rows (N, C, L): for each example and each label c, BOS + the `shots` demonstrations (prompt,
  label word) + the example's prompt + label word c. The context is cut from the left to fit;
  `target_weights` mark the label word's tokens, the only ones scored."""
  demo = ''.join(
    task.PROMPT.format(text=t) + task.LABEL_WORDS[label] + '\n\n' for t, label in shots
  )
  words = [tokenizer.encode(w) for w in task.LABEL_WORDS]
  n, c = len(examples), len(words)
  tokens = np.zeros((n, c, seq_len), np.int32)
  weights = np.zeros((n, c, seq_len), np.float32)
  for i, (text, _) in enumerate(examples):
    context = tokenizer.encode(demo + task.PROMPT.format(text=text))
    for j, word in enumerate(words):
      room = seq_len - 1 - len(word)
      ids = [tokenizer.bos_id] + context[max(0, len(context) - room) :] + word
      tokens[i, j, : len(ids)] = ids
      weights[i, j, len(ids) - len(word) : len(ids)] = 1.0
  segment_ids = (tokens > 0).astype(np.int32)
  segment_ids[:, :, 0] = 1
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy()
  return {
    'tokens': tokens,
    'segment_ids': segment_ids,
    'positions': positions,
    'target_weights': weights,
    'label': np.array([label for _, label in examples], np.int32),
  }


def make_scoring_fn(num_classes: int) -> Callable:
  def loss_fn(apply_fn, params, batch, rng):
    """Log-likelihood of each label word after the prompt; the most likely is the prediction.
    The 'loss' is the cross-entropy of the true label under the normalised word likelihoods."""
    del rng
    B, C, L = batch['tokens'].shape
    flat = lambda x: x.reshape(B * C, L)
    logits_RLV = apply_fn(
      params, flat(batch['tokens']), flat(batch['segment_ids']), flat(batch['positions'])
    )
    log_p_RL = jnp.take_along_axis(
      jax.nn.log_softmax(logits_RLV[:, :-1]), flat(batch['tokens'])[:, 1:, None], axis=-1
    )[..., 0]
    scores_BC = jnp.sum(log_p_RL * flat(batch['target_weights'])[:, 1:], axis=-1).reshape(B, C)
    return _scored(scores_BC, batch, num_classes)

  return loss_fn
