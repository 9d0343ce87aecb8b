"""Model families: one module per family, chosen by `config.model.name`.

This file is the contract of a model module, checked when `fm.registry.get('models', name)`
looks one up: a module missing a required name is refused in one sentence, and the optional
names it leaves out take the values in `DEFAULTS`. What differs between families (the inputs a
model takes, how a classifier pools, how it writes a target) is answered by the family's module
through these names, so no other file compares model names.
"""

from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax


class ModelFamily(Protocol):
  """What a model module provides (a module satisfies it structurally)."""

  # A frozen dataclass of the model's fields (shapes, dtypes, options): `model_cfg` elsewhere.
  Config: type
  # `Model(model_cfg)`: the linen module; `.apply(params, *inputs)` -> logits.
  Model: Callable[..., nn.Module]
  # Named sizes, `config.model.variant` -> Config fields.
  VARIANTS: dict[str, dict[str, Any]]
  # How a classification head pools the final states when `config.finetune.pool` is empty
  # (one of layers.POOLS).
  POOL: str
  # How the model maps a source to a target, for seq2seq fine-tuning and generation: a layout
  # of fm/tasks/_seq2seq.py and a family of fm/decoding.py, 'prefix_lm' (a causal LM reading the
  # source bidirectionally as a prefix) or 'encdec' (an encoder reads it); '' if it cannot.
  SEQ2SEQ: str

  def param_count(self, model_cfg: Any) -> dict[str, int]:
    """{'total', 'non_embedding', 'embedding'} parameter counts, from the shapes alone."""

  def flops_per_token(self, model_cfg: Any, seq_len: int) -> float:
    """Training FLOPs (forward and backward) per token of a `seq_len`-token row."""

  def inputs(
    self,
    model_cfg: Any,
    tokens_BL: jax.Array,
    segment_ids_BL: jax.Array | None = None,
    positions_BL: jax.Array | None = None,
  ) -> tuple:
    """The positional arguments of `Model(model_cfg).apply(params, ...)` that read `tokens_BL`
    as one text: the sample of an initialisation, and what a classifier reads."""


DEFAULTS: dict[str, Any] = {
  # What the model reads: 'text' (token ids), 'image' (pixels) or 'image_text' (both: two towers).
  'MODALITY': 'text',
  # Tokens a row of the model holds when its input fixes them (an image's patches):
  # `sequence_length(model_cfg) -> int`; None: a run's rows set it.
  'sequence_length': None,
  'POOL': 'mean',  # Every position has seen the whole text (a bidirectional encoder).
  'SEQ2SEQ': '',  # It cannot write a target.
  # `sample_inputs(model_cfg, batch_size, length) -> tuple`: zero inputs of an initialisation;
  # None: `inputs` of zero tokens (a family whose inputs are not tokens, images, defines it).
  'sample_inputs': None,
  # `flops_per_row(model_cfg, input_len, target_len) -> float`: training FLOPs of one row of a
  # family that reads an input and writes a target of their own lengths (an encoder-decoder),
  # counted when the objective states those lengths (its `row_lengths`); None: rows are
  # counted with `flops_per_token`.
  'flops_per_row': None,
}


def sample_inputs(family, model_cfg, batch_size: int, length: int) -> tuple:
  """Zero model inputs for an init (param shapes do not depend on their lengths)."""
  import jax.numpy as jnp

  sample = getattr(family, 'sample_inputs', None)  # (A module not looked up by the registry.)
  if sample is not None:
    return sample(model_cfg, batch_size, length)
  return family.inputs(model_cfg, jnp.zeros((batch_size, length), jnp.int32))


# Modules of this package that are shared building blocks, not families.
PRIVATE = ('layers',)


def contract(module) -> tuple[type, dict[str, Any]]:
  """(the Protocol, the defaults of its optional names) that a model module must satisfy."""
  del module  # The same for every family.
  return ModelFamily, DEFAULTS
