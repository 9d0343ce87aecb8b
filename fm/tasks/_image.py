"""The image-classification kind: rows of images, a classifier head, accuracy / macro-F1.

An image task module provides `load(seed, dataset) -> {'train', 'validation', 'test'}` of
(image uint8 (H, W, C), label index) pairs and `classes(dataset)`, the class names. This module
stacks the examples into rows, augments training rows on the host (a grain transform: a random
crop of the image padded by `task_args.pad` pixels, and a horizontal flip when
`task_args.flip`), puts a classifier head on the backbone's pooled states (the CLS token or
the patches' mean, `finetune.pool`) and scores predictions with the classification kind's
confusion matrix, so accuracy and macro-F1 over batches and devices are exact.
"""

from collections.abc import Callable
from typing import Any, Protocol

import ml_collections
import numpy as np

from fm import ConfigError
from fm.tasks import Task, _classification

MODES = ('full', 'linear_probe', 'lora')


class TaskContract(Task, Protocol):
  """What an image task module provides, besides `Task`'s names."""

  def classes(self, dataset: str) -> tuple[str, ...]:
    """The class names of `dataset`; labels index them."""


TASK_DEFAULTS: dict[str, Any] = {'MODES': MODES}
DATA_KEYS = ()  # The rows are the images: no lengths to set.
ARGS = dict(
  dataset='fashion_mnist',  # A named image dataset of fm/data/images.py.
  pad=2,  # Training augmentation: pixels of zero padding before a random crop (0: none).
  flip=True,  # Training augmentation: a random horizontal flip.
)
FINETUNE = dict(pool='')  # How the head pools: 'first' (CLS token) or 'mean'; '': the model's.


def row_length(config: ml_collections.ConfigDict) -> int:
  """The model fixes it (its patches)."""
  del config
  return 0


def load(task, config: ml_collections.ConfigDict) -> dict[str, list]:
  return task.load(config.task_args.split_seed, config.task_args.dataset)


def validate(task, config: ml_collections.ConfigDict) -> None:
  del task
  if config.finetune.pool not in ('', 'first', 'mean'):
    raise ConfigError(
      f'config.finetune.pool={config.finetune.pool!r} is unknown for images; choose first '
      f'(the CLS token) or mean.'
    )
  if config.task_args.pad < 0:
    raise ConfigError(f'config.task_args.pad={config.task_args.pad} must be >= 0.')


def check_backbone(task, config: ml_collections.ConfigDict, family_name: str, family) -> None:
  del config
  if family.MODALITY != 'image':
    raise ConfigError(
      f'config.task={task.__name__.split(".")[-1]!r} classifies images, but the backbone is a '
      f'{family_name!r} model, which reads {family.MODALITY}; use a vit backbone.'
    )


def trains(config: ml_collections.ConfigDict) -> bool:
  del config
  return True


def model_fields(task, config: ml_collections.ConfigDict, family) -> dict[str, Any]:
  """A classifier on pooled states; a masked autoencoder's decoder is not carried over."""
  return {
    'num_classes': len(task.classes(config.task_args.dataset)),
    'pool': config.finetune.pool or family.POOL,
    'decoder_dim': 0,
  }


def encode_splits(task, named: dict[str, list], tokenizer, config, family) -> dict:
  del task, tokenizer, config, family
  return {
    split: {
      'image': np.stack([image for image, _ in examples]),
      'label': np.array([label for _, label in examples], np.int32),
    }
    for split, examples in named.items()
  }


def transform(task, config: ml_collections.ConfigDict):
  """Training rows: a random crop of the zero-padded image, a random horizontal flip."""
  del task
  pad, flip = config.task_args.pad, config.task_args.flip
  if not pad and not flip:
    return None

  def augment(row: dict, rng: np.random.Generator) -> dict:
    image = row['image']
    if pad:
      H, W = image.shape[:2]
      padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
      y, x = rng.integers(0, 2 * pad + 1, 2)
      image = padded[y : y + H, x : x + W]
    if flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return {**row, 'image': np.ascontiguousarray(image)}

  return augment


def make_loss(task, config: ml_collections.ConfigDict, family, model_cfg) -> Callable:
  """Cross-entropy of the classifier on the images; a confusion matrix for the metrics."""
  num_classes = len(task.classes(config.task_args.dataset))

  def loss_fn(apply_fn, params, batch, rng):
    del rng
    return _classification._scored(
      apply_fn(params, *family.inputs(model_cfg, batch['image'])), batch, num_classes
    )

  return loss_fn


summarize = _classification.summarize


def generation(task, config, tokenizer, family, model_cfg, examples, mesh, rules, workdir) -> None:
  """Classifiers generate nothing."""
  del task, config, tokenizer, family, model_cfg, examples, mesh, rules, workdir
