"""Pretraining objectives: one module per objective, chosen by `config.objective`.

This file is the contract of an objective module, checked when
`fm.registry.get('objectives', name)` looks one up: a module missing a required name is refused
in one sentence, and the optional names it leaves out take the values in `DEFAULTS`.
"""

from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

# A host-side transform: (window, numpy Generator seeded per window) -> example.
Transform = Callable[[dict, np.random.Generator], dict]


class Objective(Protocol):
  """What an objective module provides (a module satisfies it structurally)."""

  # What it trains on: 'text' (packed token windows of a prepared corpus), 'image' (a named
  # image dataset of fm/data/images.py, one image per row) or 'image_text' (a captioned one:
  # an image and its caption per row). Optional.
  MODALITY: str

  # Model families (modules of fm/models/) the objective trains; checked before compiling.
  COMPATIBLE_MODELS: tuple[str, ...]
  # Every key of `config.objective_args` the objective reads, with its default (nested dicts
  # allowed); a key it does not list is refused with the closest one. Optional.
  ARGS: dict[str, Any]
  # Ids the objective appends after the tokenizer's (a mask token, sentinels), so they never
  # collide with text. Optional.
  EXTRA_TOKENS: int
  # Frozen models the loss reads (a distillation teacher). Each name is a pretrained-run spec at
  # `config.objective_args.<name>` (a finished run's `workdir`, or an `experiment` trained first),
  # restored onto the run's mesh and passed to `loss_fn` as a keyword: inputs -> logits. Optional.
  FROZEN: tuple[str, ...]
  # Whether the loss couples the rows of a batch (a contrastive loss): no microbatches.
  # Optional.
  WHOLE_BATCH: bool
  # (tokenizer vocab size, or patches per image for an image objective, args) -> Transform run
  # in the grain pipeline (masking, span corruption), seeded per window: deterministic,
  # resumable, the same for any number of processes. None: batches reach the loss as packed
  # windows. Optional.
  host_transform: Callable[[int, ml_collections.ConfigDict], Transform] | None

  def loss_fn(
    self, apply_fn: Callable, params: Any, batch: dict, rng: jax.Array, args: Any, **frozen
  ) -> tuple[jax.Array, dict]:
    """(mean loss, summable metric parts: sums and counts) of one batch; pure, it runs inside
    the jitted step. `args` is config.objective_args with ARGS filled in."""

  def summarize(self, sums: dict) -> dict[str, float]:
    """Metric parts summed over batches and devices -> the named metrics (`loss` first)."""

  def validate(self, args: ml_collections.ConfigDict) -> None:
    """Checks of `config.objective_args`, run before anything loads or compiles; raises a
    ConfigError naming the key. Optional."""


def _no_checks(args: ml_collections.ConfigDict) -> None:
  del args


DEFAULTS: dict[str, Any] = {
  'MODALITY': 'text',
  'ARGS': {},
  'EXTRA_TOKENS': 0,
  'FROZEN': (),
  'WHOLE_BATCH': False,
  'host_transform': None,
  'validate': _no_checks,
  # `row_lengths(seq_len, args) -> (input_len, target_len)`: the fixed shapes of the rows the
  # objective makes of a `seq_len`-token window for an encoder-decoder, so FLOPs count what the
  # model computes (train.step_flops); None: the window itself.
  'row_lengths': None,
}
PRIVATE = ()


def contract(module) -> tuple[type, dict[str, Any]]:
  """(the Protocol, the defaults of its optional names) that an objective module must satisfy."""
  del module  # The same for every objective.
  return Objective, DEFAULTS
