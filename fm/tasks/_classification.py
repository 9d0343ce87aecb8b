"""What every classification task shares: encoding, the loss, and accuracy / macro-F1.

A task module provides `LABELS` and `load(seed) -> {'train', 'validation', 'test'}` of
(text, label index) pairs; this module turns them into fixed-length rows and scores them.
Metrics are summed as a confusion matrix, so accuracy and macro-F1 over many batches and
devices are exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

KIND = 'classification'
MODES = ('full', 'linear_probe', 'lora', 'zero_shot', 'few_shot')
COMPATIBLE_MODELS = ('decoder', 'encoder', 'encdec')
DEFAULT_POOL = {'decoder': 'last', 'encoder': 'mean', 'encdec': 'mean'}


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


def class_logits(apply_fn, params, batch, model_name: str):
  if model_name == 'encdec':  # Classifies from the encoder alone.
    return apply_fn(params, batch['tokens'], None, batch['segment_ids'])
  return apply_fn(params, batch['tokens'], batch['segment_ids'], batch['positions'])


def make_loss_fn(num_classes: int, model_name: str):
  def loss_fn(apply_fn, params, batch, rng, cfg):
    """Mean cross-entropy over real rows (weight 1); a confusion matrix for the metrics."""
    del rng, cfg
    logits_BC = class_logits(apply_fn, params, batch, model_name)
    return _scored(logits_BC, batch, num_classes)

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


# ---------------------------------------------------------------------------------------------
# Zero- and few-shot: no training; a causal LM picks the label word it finds most likely.
# ---------------------------------------------------------------------------------------------
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


def make_scoring_fn(num_classes: int):
  def loss_fn(apply_fn, params, batch, rng, cfg):
    """Log-likelihood of each label word after the prompt; the most likely is the prediction.
    The 'loss' is the cross-entropy of the true label under the normalised word likelihoods."""
    del rng, cfg
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
