"""Weighted token cross-entropy and its summary, shared by the objectives."""

import math

import jax.numpy as jnp
import optax

LN2 = math.log(2.0)


def weighted_cross_entropy(logits_BLV, targets_BL, weights_BL, target_bytes_BL=None):
  """Mean cross-entropy over weighted targets, plus summable metric parts.

  Metrics are sums and counts so that averages over many batches and devices are exact;
  `target_bytes_BL` (UTF-8 bytes each target stands for) adds what bits per byte needs.
  """
  token_loss_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
  count = jnp.sum(weights_BL)
  loss_sum = jnp.sum(token_loss_BL * weights_BL)
  correct = jnp.sum((jnp.argmax(logits_BLV, -1) == targets_BL) * weights_BL)
  metrics = {'loss_sum': loss_sum, 'correct_sum': correct, 'count': count}
  if target_bytes_BL is not None:
    metrics['bytes'] = jnp.sum(target_bytes_BL * weights_BL)
  return loss_sum / jnp.maximum(count, 1.0), metrics


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Accumulated sums -> loss, perplexity, accuracy and (with bytes) bits per byte."""
  count = max(sums['count'], 1.0)
  loss = sums['loss_sum'] / count
  out = {
    'loss': loss,
    'perplexity': math.exp(min(loss, 50.0)),
    'accuracy': sums['correct_sum'] / count,
  }
  if sums.get('bytes'):
    out['bits_per_byte'] = sums['loss_sum'] / LN2 / sums['bytes']
  return out
