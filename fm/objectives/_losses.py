"""Weighted token cross-entropy and its summary, shared by the objectives."""

import math

import jax
import jax.numpy as jnp
import optax

from fm import sharding

LN2 = math.log(2.0)


def weighted_cross_entropy(logits_BLV, targets_BL, weights_BL, target_bytes_BL=None):
  """Mean cross-entropy over weighted targets, plus summable metric parts.

  Metrics are sums and counts so that averages over many batches and devices are exact;
  `target_bytes_BL` (UTF-8 bytes each target stands for) adds what bits per byte needs.
  """
  token_loss_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
  count = jnp.sum(weights_BL)
  loss_sum = jnp.sum(token_loss_BL * weights_BL)
  correct = jnp.sum((first_argmax(logits_BLV) == targets_BL) * weights_BL)
  metrics = {'loss_sum': loss_sum, 'correct_sum': correct, 'count': count}
  if target_bytes_BL is not None:
    metrics['bytes'] = jnp.sum(target_bytes_BL * weights_BL)
  return loss_sum / jnp.maximum(count, 1.0), metrics


def first_argmax(x: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first maximum wins), through blocks: the first block
  holding the maximum, then the first maximum inside it. XLA:CPU's arg max reduction is slow
  (147 ms for 2,048 x 32,768 float32 logits, 16x a max); blocks of about the square root of the
  axis take 1/8 of that. NaNs aside (a max may skip them), the same indices, ties included.
  Where the mesh splits the vocabulary, picking the block would gather it: the plain arg max."""
  V = x.shape[-1]
  d = next(d for d in range(math.isqrt(V), 0, -1) if V % d == 0)  # Block length.
  if d == 1 or sharding.split('act_vocab'):
    return jnp.argmax(x, -1)
  blocks = x.reshape(*x.shape[:-1], V // d, d)
  block = jnp.argmax(jnp.max(blocks, -1), -1)
  inside = jnp.take_along_axis(blocks, block[..., None, None], -2)[..., 0, :]
  return block * d + jnp.argmax(inside, -1)


def chunked_cross_entropy(
  x_BLD, w_VD, scale, targets_BL, weights_BL, target_bytes_BL=None, chunk: int = 8192
):
  """weighted_cross_entropy of the logits x_BLD @ w_VD.T * scale, computed `chunk` vocabulary
  entries at a time (an online log-sum-exp, and the running arg max for accuracy), so that at
  most batch x length x chunk float32 logits exist at once, in the forward and (each chunk's
  logits recomputed) the backward pass. The same loss and metrics, to float rounding."""
  B, L, D = x_BLD.shape
  V = w_VD.shape[0]
  n = -(-V // chunk)
  w_NCD = jnp.pad(w_VD, ((0, n * chunk - V), (0, 0))).reshape(n, chunk, D)
  x_TD, targets_T = x_BLD.reshape(B * L, D), targets_BL.reshape(B * L)

  @jax.checkpoint
  def one(carry, inputs):
    top, total, target, best, best_id = carry
    i, w_CD = inputs
    ids_C = i * chunk + jnp.arange(chunk)
    logits_TC = jnp.einsum('TD,CD->TC', x_TD, w_CD).astype(jnp.float32) * scale
    logits_TC = jnp.where(ids_C[None] < V, logits_TC, -jnp.inf)  # Padding past the vocabulary.
    chunk_top = jnp.max(logits_TC, -1)
    new_top = jnp.maximum(top, chunk_top)
    total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits_TC - new_top[:, None]), -1)
    target = target + jnp.sum(jnp.where(ids_C[None] == targets_T[:, None], logits_TC, 0.0), -1)
    better = chunk_top > best  # Strictly: the first maximum wins, as jnp.argmax's does.
    best_id = jnp.where(better, i * chunk + first_argmax(logits_TC), best_id)
    return (new_top, total, target, jnp.maximum(best, chunk_top), best_id), None

  start = jnp.full((B * L,), -jnp.inf, jnp.float32)
  zeros = jnp.zeros((B * L,), jnp.float32)
  carry = (start, zeros, zeros, start, jnp.zeros((B * L,), jnp.int32))
  (top, total, target, _, best_id), _ = jax.lax.scan(one, carry, (jnp.arange(n), w_NCD))
  token_loss_BL = (top + jnp.log(total) - target).reshape(B, L)
  count = jnp.sum(weights_BL)
  loss_sum = jnp.sum(token_loss_BL * weights_BL)
  correct = jnp.sum((best_id.reshape(B, L) == targets_BL) * weights_BL)
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
