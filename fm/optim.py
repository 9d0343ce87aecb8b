"""The optimizer from `config.optim`: AdamW, warmup + cosine decay, clipping, decay mask."""

import jax
import ml_collections
import optax

from fm import ConfigError


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
  warmup = cfg.get('warmup_steps', 0)
  kind = cfg.get('schedule', 'cosine')
  if kind == 'constant':
    return (
      optax.linear_schedule(0.0, cfg.lr, max(warmup, 1))
      if warmup
      else optax.constant_schedule(cfg.lr)
    )
  if kind != 'cosine':
    raise ConfigError(f'config.optim.schedule={kind!r} is unknown; choose cosine or constant.')
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=cfg.lr * cfg.get('min_lr_ratio', 0.1),
  )


NO_DECAY = ('scale', 'bias')


def decay_mask(params):
  """Weight decay on weights and embeddings; norm scales and biases are left alone.

  Decided by param name, not rank, because scanned layers stack norm scales into matrices.
  """

  def keep(path, _):
    return getattr(path[-1], 'key', None) not in NO_DECAY

  return jax.tree_util.tree_map_with_path(keep, params)


def make(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  chain = []
  if cfg.get('clip_norm'):
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(
    optax.adamw(
      schedule(cfg, total_steps),
      b1=cfg.get('b1', 0.9),
      b2=cfg.get('b2', 0.95),
      eps=cfg.get('eps', 1e-8),
      weight_decay=cfg.get('weight_decay', 0.0),
      mask=decay_mask,
    )
  )
  return optax.chain(*chain)
