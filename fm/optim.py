"""The optimizer from `config.optim`: AdamW, warmup + cosine decay, clipping, decay mask."""

import jax
import ml_collections
import optax

from fm import ConfigError

SCHEDULES = ('cosine', 'constant')


def schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps` (or
  constant after the warmup)."""
  lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
  if optim_cfg.schedule not in SCHEDULES:
    raise ConfigError(
      f'config.optim.schedule={optim_cfg.schedule!r} is unknown; choose one of: '
      f'{", ".join(SCHEDULES)}.'
    )
  if optim_cfg.schedule == 'constant':
    return optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=lr * optim_cfg.min_lr_ratio,
  )


NO_DECAY = ('scale', 'bias')


def decay_mask(params):
  """Weight decay on weights and embeddings; norm scales and biases are left alone.

  Decided by param name, not rank, because scanned layers stack norm scales into matrices.
  """

  def keep(path, _):
    return jax.tree_util.keystr(path[-1:], simple=True) not in NO_DECAY

  return jax.tree_util.tree_map_with_path(keep, params)


def make(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  chain = []
  if optim_cfg.clip_norm:
    chain.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  chain.append(
    optax.adamw(
      schedule(optim_cfg, total_steps),
      b1=optim_cfg.b1,
      b2=optim_cfg.b2,
      eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay,
      mask=decay_mask,
    )
  )
  return optax.chain(*chain)
