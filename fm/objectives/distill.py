"""Knowledge distillation (Hinton et al. 2015) of a causal LM teacher into a student decoder.

The teacher is any finished fm decoder run with the same tokenizer: `objective_args.teacher` names
its `workdir`, or an `experiment` that trains it there first (default workdir: WORKDIR/teacher).
Its params are restored onto the student's mesh with the same logical rules and enter the jitted
step as an argument; only the student trains. The loss per next-token position is

  (1 - hard_weight) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
      + hard_weight * cross-entropy(student, next token)

(T = `temperature`; the T^2 keeps gradient scales comparable across temperatures). Evaluations
report the objective as `loss`, the student's cross-entropy as `lm_loss` and `bits_per_byte`
(comparable with causal_lm runs), the KL at temperature T, and the teacher's own `teacher_loss`
and `teacher_bits_per_byte`.
"""

import jax
import jax.numpy as jnp
import ml_collections

from fm import ConfigError
from fm.objectives import causal_lm
from fm.objectives._losses import LN2, weighted_cross_entropy
from fm.objectives._losses import summarize as _summarize

COMPATIBLE_MODELS = ('decoder',)
FROZEN = ('teacher',)  # Frozen models, each given by config.objective_args.<name>.
ARGS = dict(
  temperature=2.0,  # Softens both distributions in the KL term.
  hard_weight=0.5,  # Weight of the true next token's cross-entropy; the KL gets the rest.
)
__all__ = ['ARGS', 'COMPATIBLE_MODELS', 'FROZEN', 'loss_fn', 'summarize', 'validate']


def validate(args: ml_collections.ConfigDict) -> None:
  temperature, hard_weight = args.temperature, args.hard_weight
  if temperature <= 0:
    raise ConfigError(f'config.objective_args.temperature={temperature} must be > 0.')
  if not 0 <= hard_weight <= 1:
    raise ConfigError(f'config.objective_args.hard_weight={hard_weight} must lie in [0, 1].')


def loss_fn(apply_fn, params, batch, rng, args, teacher):
  """`teacher(tokens, segment_ids, positions) -> logits`, the frozen teacher bound to its params."""
  del rng
  temperature, hard_weight = float(args.temperature), float(args.hard_weight)
  inputs = (batch['tokens'], batch['segment_ids'], batch['positions'])
  targets_BL, weights_BL = causal_lm.targets_and_weights(batch)
  target_bytes_BL = causal_lm.target_bytes(batch)
  logits_BLV = apply_fn(params, *inputs)
  teacher_BLV = jax.lax.stop_gradient(teacher(*inputs))
  hard, metrics = weighted_cross_entropy(logits_BLV, targets_BL, weights_BL, target_bytes_BL)
  log_p_BLV = jax.nn.log_softmax(teacher_BLV / temperature)
  log_q_BLV = jax.nn.log_softmax(logits_BLV / temperature)
  kl_BL = jnp.sum(jnp.exp(log_p_BLV) * (log_p_BLV - log_q_BLV), axis=-1)
  kl_sum = jnp.sum(kl_BL * weights_BL)
  kl = kl_sum / jnp.maximum(metrics['count'], 1.0)
  _, teacher_metrics = weighted_cross_entropy(teacher_BLV, targets_BL, weights_BL)
  loss = (1.0 - hard_weight) * temperature**2 * kl + hard_weight * hard
  metrics.update(
    kl_sum=kl_sum,
    teacher_loss_sum=teacher_metrics['loss_sum'],
    objective_sum=(1.0 - hard_weight) * temperature**2 * kl_sum + hard_weight * metrics['loss_sum'],
  )
  return loss, metrics


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """`loss`: the distillation objective; `lm_loss`, `perplexity`, `accuracy`, `bits_per_byte`:
  the student as a language model; `kl`; the teacher's `teacher_loss`, `teacher_bits_per_byte`."""
  out = _summarize(sums)
  count = max(sums['count'], 1.0)
  out['lm_loss'], out['loss'] = out['loss'], sums['objective_sum'] / count
  out['kl'] = sums['kl_sum'] / count
  out['teacher_loss'] = sums['teacher_loss_sum'] / count
  if sums.get('bytes'):
    out['teacher_bits_per_byte'] = sums['teacher_loss_sum'] / LN2 / sums['bytes']
  return out
