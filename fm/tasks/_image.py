"""The image-classification kind: rows of images, a classifier head, accuracy / macro-F1.

An image task module provides `load(seed, dataset) -> {'train', 'validation', 'test'}` of
(image uint8 (H, W, C), label index) pairs and `classes(dataset)`, the class names. This module
stacks the examples into rows, augments training rows on the host (a grain transform: a random
crop of the image padded by `task_args.pad` pixels, and a horizontal flip when
`task_args.flip`), puts a classifier head on the backbone's pooled states (the CLS token or
the patches' mean, `finetune.pool`) and scores predictions with the classification kind's
confusion matrix, so accuracy and macro-F1 over batches and devices are exact.

Mode `zero_shot` (a two-tower backbone, fm/models/two_tower.py; nothing trains): each class name,
put into `task_args.prompt`, is embedded by the text tower, and an image takes the class whose
prompt is nearest its embedding. On a captioned dataset the test split is also retrieved both
ways (recall@1, @5 of each image's caption among all test captions and back; chance k / N).
"""

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fm import ConfigError
from fm.data import images
from fm.models import vit
from fm.objectives import contrastive
from fm.tasks import Task, _classification

MODES = ('full', 'linear_probe', 'lora', 'zero_shot')


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
  prompt='{}',  # zero_shot: the text a class name is put into ('a photo of a {}').
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
  if config.task_args.prompt.count('{}') != 1:
    raise ConfigError(
      f'config.task_args.prompt={config.task_args.prompt!r} must hold one {{}} where the class '
      f"name goes, e.g. 'a photo of a {{}}'."
    )


def check_backbone(task, config: ml_collections.ConfigDict, family_name: str, family) -> None:
  if family.MODALITY not in ('image', 'image_text'):
    raise ConfigError(
      f'config.task={task.__name__.split(".")[-1]!r} classifies images, but the backbone is a '
      f'{family_name!r} model, which reads {family.MODALITY}; use a vit or two_tower backbone.'
    )
  if config.finetune.mode == 'zero_shot' and family.MODALITY != 'image_text':
    raise ConfigError(
      f"config.finetune.mode='zero_shot' embeds the class names as text, which a "
      f'{family_name!r} backbone cannot; use a two_tower backbone (experiments/siglip_emoji.py) '
      f'or mode full, linear_probe or lora.'
    )


def trains(config: ml_collections.ConfigDict) -> bool:
  return config.finetune.mode != 'zero_shot'


def model_fields(task, config: ml_collections.ConfigDict, family) -> dict[str, Any]:
  """A classifier on pooled states; a masked autoencoder's decoder is not carried over. Zero-shot
  keeps the two towers as they are."""
  if config.finetune.mode == 'zero_shot':
    return {}
  fields = {
    'num_classes': len(task.classes(config.task_args.dataset)),
    'pool': config.finetune.pool or family.POOL,
  }
  if 'decoder_dim' in family.Config.__dataclass_fields__:
    fields['decoder_dim'] = 0
  return fields


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
  return images.augmentation(config.task_args.pad, config.task_args.flip)


def make_loss(task, config: ml_collections.ConfigDict, family, model_cfg) -> Callable:
  """Cross-entropy of the classifier on the images; a confusion matrix for the metrics."""
  names = task.classes(config.task_args.dataset)
  num_classes = len(names)
  if config.finetune.mode == 'zero_shot':
    prompts = [config.task_args.prompt.format(name) for name in names]
    tokens_CL = jnp.asarray(
      images.caption_tokens(prompts, model_cfg.max_len, 'config.model.max_len')
    )

    def zero_shot(apply_fn, params, batch, rng):
      del rng
      image_BE, text_CE, scale, bias = apply_fn(params, vit.pixels(batch['image']), tokens_CL)
      return _classification._scored(scale * image_BE @ text_CE.T + bias, batch, num_classes)

    return zero_shot

  def loss_fn(apply_fn, params, batch, rng):
    del rng
    return _classification._scored(
      apply_fn(params, *family.inputs(model_cfg, batch['image'])), batch, num_classes
    )

  return loss_fn


summarize = _classification.summarize


def generation(task, config, tokenizer, family, model_cfg, examples, mesh, rules, workdir):
  """Classifiers generate nothing; zero-shot on a captioned dataset: params -> retrieval
  recall@k both ways over the test images and their captions."""
  del task, tokenizer, examples, mesh, rules, workdir  # (The test images are read with captions.)
  dataset = config.task_args.dataset
  if config.finetune.mode != 'zero_shot' or not images.captioned(dataset):
    return None
  key = 'config.task_args.dataset'
  pictures, _, texts = images.load(dataset, config.task_args.split_seed, key, captions=True)['test']
  tokens = images.caption_tokens(texts, model_cfg.max_len, 'config.model.max_len')
  model, batch = family.Model(model_cfg), config.train.global_batch
  embed_images = jax.jit(lambda p, x: model.apply(p, vit.pixels(x), method='encode_image'))
  embed_texts = jax.jit(lambda p, t: model.apply(p, t, method='encode_text'))

  def retrieval(params) -> dict[str, float]:
    embed = lambda fn, rows: np.concatenate(
      [fn(params, rows[i : i + batch]) for i in range(0, len(rows), batch)]
    )
    return contrastive.retrieval(embed(embed_images, pictures), embed(embed_texts, tokens))

  return retrieval
