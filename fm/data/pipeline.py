"""grain input pipelines over prepared corpora: packed windows, read on demand.

A split of a prepared corpus (fm/data/prepare.py) is its documents in order, each ending in EOS,
cut into windows of `seq_len` tokens. A window carries `segment_ids` (documents numbered from 1
inside the window, 0 for padding) and `positions` (restarting at each document), so attention
never crosses documents. A window reads only the documents it overlaps (ArrayRecord random
access; the cumulative token counts are memory-mapped), so host memory does not grow with the
corpus. Training windows are shuffled with a seed (a new order each epoch), transformed by the
objective (in `data.workers` grain worker processes), then sharded over the processes and batched
by grain's ElasticIterator: its state is the number of windows the whole job has read, so a
checkpoint resumes exactly, on any number of processes.
"""

import collections
from collections.abc import Callable
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import signal
import threading

from absl import flags
import grain
import ml_collections
import numpy as np

from fm import ConfigError, local_directory
from fm.data import prepare as prepare_lib
from fm.data import sources
from fm.data import tokenizer as tokenizer_lib

Transform = Callable[[dict, np.random.Generator], dict]


def chain(*transforms: Transform | None) -> Transform | None:
  """One transform running the given ones in order with the same generator (None: no-ops)."""
  steps = [t for t in transforms if t is not None]
  if len(steps) <= 1:
    return steps[0] if steps else None

  def run(row: dict, rng: np.random.Generator) -> dict:
    for step in steps:
      row = step(row, rng)
    return row

  return run


WINDOW_KEYS = ('tokens', 'segment_ids', 'positions', 'token_bytes')
# How a prepared directory with a missing or damaged file is mended: prepare finds the items
# whose shards are missing or of another size and rewrites them alone.
REPAIR = (
  'run the python -m fm.data.prepare command that made {directory} again (for a named source '
  'or config.data.dataset=files, rerun the run): it rewrites what is missing.'
)


class Split:
  """One split of a prepared corpus: its documents in ArrayRecord shards, read on demand (and
  the few last ones kept, since neighbouring windows share them). Picklable for grain workers:
  each process opens the files itself."""

  CACHED_DOCUMENTS = 8

  def __init__(self, directory: pathlib.Path, split: str, manifest: dict, token_bytes: np.ndarray):
    info = manifest['splits'][split]
    self.paths = [str(directory / shard['file']) for shard in info['shards']]
    self.first = np.cumsum([0] + [shard['documents'] for shard in info['shards']])
    self.offsets_path = directory / f'{split}.offsets.npy'
    self.num_tokens = info['tokens']
    self.token_bytes = token_bytes
    self._open = None

  def __getstate__(self):
    return {**self.__dict__, '_open': None}

  def _files(self):
    if self._open is None:
      directory = self.offsets_path.parent
      try:
        source = grain.sources.ArrayRecordDataSource(self.paths)
      except Exception as e:  # The reader's errors are not public; it names the shard.
        raise ConfigError(
          f'a shard of {directory} cannot be opened ({str(e).splitlines()[0]}); delete that '
          f'shard, then {REPAIR.format(directory=directory)}'
        ) from None
      offsets = np.load(self.offsets_path, mmap_mode='r')  # Checked by open_prepared.
      cache = collections.OrderedDict()
      # Grain's prefetch threads read windows at once: the cache is touched under the lock.
      self._open = (source, offsets, cache, threading.Lock())
    return self._open

  def num_windows(self, seq_len: int) -> int:
    return self.num_tokens // seq_len

  def shuffled(self, seq_len: int, seed: int) -> grain.MapDataset:
    """Its windows, shuffled with `seed`, anew every epoch, without end."""
    ds = grain.MapDataset.range(self.num_windows(seq_len)).shuffle(seed=seed).repeat()
    return ds.map(functools.partial(_window, self, seq_len))

  def document(self, n: int) -> np.ndarray:
    source, _, cache, lock = self._files()
    with lock:
      if n in cache:
        return cache[n]
    try:
      document = np.frombuffer(source[n], np.int32)
    except Exception as e:  # The reader's errors are not public; say which shard.
      path = self.paths[int(np.searchsorted(self.first, n, 'right')) - 1]
      raise ConfigError(
        f'{path}: document {n} cannot be read ({type(e).__name__}); the shard is damaged: '
        f'delete it, then {REPAIR.format(directory=self.offsets_path.parent)}'
      ) from None
    with lock:
      cache[n] = document
      while len(cache) > self.CACHED_DOCUMENTS:
        cache.popitem(last=False)
    return document

  def window(self, index: int, seq_len: int) -> dict[str, np.ndarray]:
    offsets = self._files()[1]
    start, end = index * seq_len, (index + 1) * seq_len
    first = int(np.searchsorted(offsets, start, 'right')) - 1
    last = int(np.searchsorted(offsets, end, 'left'))  # Exclusive.
    tokens = np.concatenate([self.document(n) for n in range(first, last)])
    lengths = np.diff(offsets[first : last + 1])
    docs = np.repeat(np.arange(first, last, dtype=np.int32), lengths)
    cut = slice(start - int(offsets[first]), end - int(offsets[first]))
    tokens, docs = tokens[cut], docs[cut]
    segment_ids = (docs - docs[0] + 1).astype(np.int32)
    starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
    positions = (
      np.arange(seq_len) - starts[np.searchsorted(starts, np.arange(seq_len), 'right') - 1]
    )
    return {
      'tokens': tokens,
      'segment_ids': segment_ids,
      'positions': positions.astype(np.int32),
      'token_bytes': self.token_bytes[tokens],
    }


class Mixture:
  """Several corpora's splits as one: training windows drawn by weight (deterministically, in
  proportion: grain's MapDataset.mix), held-out windows one corpus after the other."""

  def __init__(self, splits: list[Split], weights: list[float]):
    self.splits, self.weights = splits, weights

  def shuffled(self, seq_len: int, seed: int) -> grain.MapDataset:
    parts = [split.shuffled(seq_len, seed + i) for i, split in enumerate(self.splits)]
    return grain.MapDataset.mix(parts, self.weights)

  def num_windows(self, seq_len: int) -> int:
    return sum(split.num_windows(seq_len) for split in self.splits)

  @property
  def num_tokens(self) -> int:
    return sum(split.num_tokens for split in self.splits)

  def window(self, index: int, seq_len: int) -> dict[str, np.ndarray]:
    for split in self.splits:
      if index < split.num_windows(seq_len):
        return split.window(index, seq_len)
      index -= split.num_windows(seq_len)
    raise IndexError(index)


@dataclasses.dataclass
class Data:
  tokenizer: object
  train: Split | Mixture
  validation: Split | Mixture
  corpus: str = ''  # The tokenized corpus's digest (its shards'; a mixture's and its weights).


def corpus_digest(manifest: dict) -> str:
  """A prepared corpus's identity: the digest of its shards' digests, split by split (the same
  text and tokenizer give the same shards, however often it is prepared)."""
  shards = {
    name: [s['sha256'] for s in split['shards']] for name, split in manifest['splits'].items()
  }
  return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()


PREPARED_EXAMPLE = '/mnt/bucket/prepared'  # Where a prepared corpus is mounted, in messages.


def prepared_directory(data_cfg: ml_collections.ConfigDict) -> pathlib.Path:
  """The prepared corpus of `config.data`: a named source or `files`, prepared once into
  $FM_DATA_DIR/prepared (a file's size or time changing prepares it anew), or `prepared`'s
  own `data.path`."""
  if data_cfg.dataset == 'prepared':
    return local_directory(data_cfg.path, 'config.data.path', PREPARED_EXAMPLE)
  spec = spec_of(data_cfg)
  key = spec.key()
  if data_cfg.dataset == 'files':  # Its files' sizes and times, without reading them.
    paths = prepare_lib.expand(spec.train, 'config.data.train')
    paths += prepare_lib.expand(spec.validation, 'config.data.validation')
    key = hashlib.sha256((key + json.dumps([_stat(p) for p in paths])).encode()).hexdigest()
  directory = sources.cache_dir() / 'prepared' / f'{data_cfg.dataset}-{key[:16]}'
  say = lambda line: print(f'preparing {directory}: {line}', flush=True)  # Once per corpus.
  prepare_lib.prepare(spec, directory, say=say, overwrite=True)  # fm's own cache.
  return directory


def _stat(path: str) -> tuple:
  """A file's (path, size, modification time), local or on a filesystem etils.epath opens."""
  if '://' in path:
    from etils import epath

    found = epath.Path(path).stat()
    return path, found.length, found.mtime
  found = os.stat(path)
  return path, found.st_size, found.st_mtime_ns


DATASETS = (*sources.SOURCES, 'files', 'prepared')


def spec_of(data_cfg: ml_collections.ConfigDict) -> prepare_lib.Spec:
  """What `prepare` makes of a named source (its own splits) or of `files` under `config.data`."""
  tok_cfg = data_cfg.tokenizer
  tokenizer = dict(
    tokenizer=tok_cfg.kind,
    vocab_size=0 if tok_cfg.model else tok_cfg.vocab_size,
    tokenizer_model=tok_cfg.model,
  )
  if data_cfg.dataset in sources.SOURCES:
    return prepare_lib.Spec(source=data_cfg.dataset, **tokenizer)
  if data_cfg.dataset != 'files':
    raise ConfigError(
      f'config.data.dataset={data_cfg.dataset!r} is unknown; choose one of: {", ".join(DATASETS)}.'
    )
  if not data_cfg.train:
    raise ConfigError(
      'config.data.dataset=files needs config.data.train, a glob of .txt, .jsonl, .jsonl.gz or '
      '.parquet files (--config.data.train=GLOB).'
    )
  return prepare_lib.Spec(
    train=(data_cfg.train,),
    validation=(data_cfg.validation,) if data_cfg.validation else (),
    validation_fraction=data_cfg.validation_fraction,
    text_field=data_cfg.text_field,
    encoding_errors=data_cfg.encoding_errors,
    **tokenizer,
  )


def open_prepared(directory: pathlib.Path, data_cfg: ml_collections.ConfigDict | None = None):
  """(manifest, tokenizer) of a prepared directory whose files are whole (`prepare.damage`:
  the first thing missing or damaged is an error naming it and the fix); with `data_cfg`, a
  tokenizer other than `config.data.tokenizer` is an error naming both."""
  manifest = prepare_lib.read_manifest(directory)
  identity = manifest['tokenizer']
  if data_cfg is not None and data_cfg.dataset == 'prepared':
    wanted = data_cfg.tokenizer
    given = wanted.model and tokenizer_lib.given(wanted.kind, wanted.model).identity
    if identity['kind'] != wanted.kind or (
      identity != given
      if given
      else wanted.kind == 'sentencepiece' and identity['vocab_size'] != wanted.vocab_size
    ):
      named = (
        f'config.data.mixture: {directory}'
        if data_cfg.mixture
        else (f'config.data.path={str(directory)!r}')
      )
      # The corpus's own tokenizer: its kind, and its size or its file.
      own = {'kind': identity['kind']}
      if identity['kind'] == 'sentencepiece':
        own.update(vocab_size=identity['vocab_size'], model='')
      elif identity['kind'] in tokenizer_lib.FILES:
        own['model'] = str(directory / tokenizer_lib.FILES[identity['kind']])
      fix = ' '.join(
        f'--config.data.tokenizer.{k}={v}' for k, v in own.items() if wanted.get(k) != v
      )
      raise ConfigError(
        f'{named} was prepared with tokenizer {identity}, the run asks for '
        f'config.data.tokenizer={wanted.to_dict()}; set config.data.tokenizer to match ({fix}) '
        f'or prepare the corpus again with that tokenizer.'
      )
  found = prepare_lib.damage(directory, manifest, counts=False)
  if found:
    path, problem, _ = found[0]
    raise ConfigError(f'{path} is {problem}; {REPAIR.format(directory=directory)}')
  proto = b''
  if identity['kind'] in tokenizer_lib.FILES:
    proto = (directory / tokenizer_lib.FILES[identity['kind']]).read_bytes()
  return manifest, tokenizer_lib.from_identity(identity, proto)


def load_tokenizer(data_cfg: ml_collections.ConfigDict):
  """The tokenizer a run with this `config.data` uses: the given one (`tokenizer.model`), else
  its corpus's (prepared first if need be)."""
  if data_cfg.tokenizer.model:
    return tokenizer_lib.given(data_cfg.tokenizer.kind, data_cfg.tokenizer.model)
  return open_prepared(prepared_directory(data_cfg), data_cfg)[1]


def prepare(data_cfg: ml_collections.ConfigDict) -> Data:
  """The tokenizer and both splits of `config.data`'s prepared corpus, or of the mixture of
  prepared corpora `data.mixture` names (which must share one tokenizer)."""
  if data_cfg.dataset == 'prepared' and data_cfg.mixture:
    return _mixture(data_cfg)
  directory = prepared_directory(data_cfg)
  manifest, tok = open_prepared(directory, data_cfg)
  token_bytes = tok.token_bytes()
  return Data(
    tok,
    Split(directory, 'train', manifest, token_bytes),
    Split(directory, 'validation', manifest, token_bytes),
    corpus_digest(manifest),
  )


def _mixture(data_cfg: ml_collections.ConfigDict) -> Data:
  directories = [
    local_directory(path, 'config.data.mixture', PREPARED_EXAMPLE) for path, _ in data_cfg.mixture
  ]
  opened = [open_prepared(d, data_cfg) for d in directories]
  tok = opened[0][1]
  for directory, (_, other) in zip(directories, opened):
    if other.identity != tok.identity:
      raise ConfigError(
        f'config.data.mixture: {directory} was prepared with tokenizer {other.identity}, '
        f'{directories[0]} with {tok.identity}; prepare them with one tokenizer '
        f'(python -m fm.data.prepare --tokenizer_model {directories[0] / "tokenizer.model"}).'
      )
  token_bytes = tok.token_bytes()
  weights = [float(weight) for _, weight in data_cfg.mixture]
  split = lambda name: [Split(d, name, m, token_bytes) for d, (m, _) in zip(directories, opened)]
  parts = [[corpus_digest(m), w] for (m, _), w in zip(opened, weights)]
  corpus = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
  return Data(tok, Mixture(split('train'), weights), Mixture(split('validation'), weights), corpus)


def elastic(
  ds: grain.MapDataset, global_batch: int, process_index: int, process_count: int, workers: int = 0
) -> grain.IterDataset:
  """Batches of `ds` for this process: global batch k is elements [k*B, (k+1)*B), of which
  process p takes every P-th. The iterator's state is the global position, the same on every
  process, so it restores onto any number of them; `workers` > 0 runs the dataset's
  transformations in that many processes."""
  if workers and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # Grain's workers read its absl flags: their defaults here.
  return (_Elastic if workers else grain.experimental.ElasticIterator)(
    ds,
    global_batch,
    grain.sharding.ShardOptions(process_index, process_count),
    multiprocessing_options=grain.MultiprocessingOptions(num_workers=workers) if workers else None,
  )


class _Elastic(grain.experimental.ElasticIterator):
  """grain's ElasticIterator whose worker processes leave Ctrl-C to the run: the terminal
  sends SIGINT to every process of the job, and the run saves and stops on it
  (checkpoint.Preemption) while the workers, stopped by the run, would each print a
  KeyboardInterrupt traceback. A process starts with SIGINT ignored when its parent ignores it
  as it starts, so SIGINT is ignored here while a call may start workers (the first one, and
  the first after a restore), then handled as before; one that comes meanwhile is lost."""

  def __iter__(self):
    return _QuietWorkers(super().__iter__())


class _QuietWorkers:
  def __init__(self, it):
    self.it, self.starting = it, True

  def __iter__(self):
    return self

  def __next__(self):
    if not self.starting or threading.current_thread() is not threading.main_thread():
      return next(self.it)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
      return next(self.it)
    finally:
      signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
      self.starting = False

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state) -> None:
    self.it.set_state(state)
    self.starting = True

  def close(self) -> None:
    self.it.close()


def train_dataset(
  split: Split | Mixture,
  seq_len: int,
  global_batch: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  transform: Transform | None = None,
  workers: int = 0,
) -> grain.IterDataset:
  """Infinite, shuffled (reshuffled every epoch), per-process batches of packed windows.

  Global batch k holds the shuffled windows [k*B, (k+1)*B); process p takes every P-th of them,
  so the global batch is the same set of windows whatever the number of processes. An
  objective's host-side `transform` (masking, corruption) draws from a generator seeded by the
  window's global position, so it too is independent of the number of processes.
  """
  ds = split.shuffled(seq_len, seed)
  if transform is not None:
    ds = ds.random_map(transform, seed=seed)
  return elastic(ds, global_batch, process_index, process_count, workers)


def _window(split: Split, seq_len: int, index) -> dict[str, np.ndarray]:
  return split.window(int(index), seq_len)


def padding_window(seq_len: int) -> dict[str, np.ndarray]:
  """A window of no document (segment ids 0, so weight 0), shaped like Split.window's."""
  return {k: np.zeros(seq_len, np.int32) for k in WINDOW_KEYS}


def eval_batches(
  split: Split | Mixture,
  seq_len: int,
  global_batch: int,
  max_batches: int,
  process_index: int = 0,
  process_count: int = 1,
  transform: Transform | None = None,
):
  """The first `max_batches` (all if -1) batches of validation windows, in order, the last one
  padded with zero segment ids (weight 0). Same batches every eval."""
  n = split.num_windows(seq_len)
  num_batches = -(-n // global_batch)
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  per_process = global_batch // process_count
  pad = padding_window(seq_len)
  ds = grain.MapDataset.range(num_batches * global_batch)
  ds = ds.map(lambda i: split.window(int(i), seq_len) if i < n else pad)
  if transform is not None:
    ds = ds.random_map(transform, seed=0)  # The same corruption at every eval.
  return ds[process_index::process_count].batch(per_process, drop_remainder=True)


# ---------------------------------------------------------------------------------------------
# Fixed-size examples (downstream tasks): one row per example instead of packed windows.
# ---------------------------------------------------------------------------------------------
def example_dataset(
  arrays: dict[str, np.ndarray],
  global_batch: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  transform: Transform | None = None,
  workers: int = 0,
) -> grain.IterDataset:
  """Infinite, shuffled (every epoch anew), per-process batches of rows of `arrays`; the same
  global batches for any number of processes, and resumable like `train_dataset`. A
  `transform` (augmentation, an objective's masking) draws from a generator seeded by the
  row's position in the stream (new draws every epoch), in `workers` processes if > 0."""
  n = len(next(iter(arrays.values())))
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
  ds = ds.map(lambda i: {**{k: v[int(i)] for k, v in arrays.items()}, 'weight': np.float32(1)})
  if transform is not None:
    ds = ds.random_map(transform, seed=seed)
  return elastic(ds, global_batch, process_index, process_count, workers)


def example_batches(
  arrays: dict[str, np.ndarray],
  global_batch: int,
  max_batches: int = -1,
  process_index: int = 0,
  process_count: int = 1,
  transform: Transform | None = None,
):
  """All rows (or the first `max_batches` batches) in order; the last batch is padded with
  zero rows, which carry `weight` 0. A `transform` draws the same at every evaluation."""
  n = len(next(iter(arrays.values())))
  num_batches = -(-n // global_batch)
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  pad = {k: np.zeros_like(v[0]) for k, v in arrays.items()}
  ds = grain.MapDataset.range(num_batches * global_batch)
  ds = ds.map(
    lambda i: (
      {**{k: v[int(i)] for k, v in arrays.items()}, 'weight': np.float32(1)}
      if i < n
      else {**pad, 'weight': np.float32(0)}
    )
  )
  if transform is not None:
    ds = ds.random_map(transform, seed=0)
  return ds[process_index::process_count].batch(global_batch // process_count, drop_remainder=True)
