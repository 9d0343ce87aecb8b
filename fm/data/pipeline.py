"""grain input pipelines: tokenized documents packed into fixed-length windows.

Each split is tokenized once (cached) into one stream of tokens, every document ending in EOS,
and cut into windows of `seq_len` tokens. A window carries `segment_ids` (documents numbered
from 1 inside the window, 0 for padding) and `positions` (restarting at each document), so
attention never crosses documents. Training windows are shuffled with a seed (a new order each
epoch), sharded by JAX process and batched; the iterator's state is a step count, so a resumed
run sees exactly the batches it would have seen.
"""

from collections.abc import Callable
import dataclasses
import hashlib
import json
import os

import grain
import ml_collections
import numpy as np

from fm.data import sources
from fm.data import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Stream:
  tokens: np.ndarray  # int32 [N]
  doc_ids: np.ndarray  # int32 [N], document number of each token
  token_bytes: np.ndarray  # int32 [V], UTF-8 bytes each token id stands for

  def num_windows(self, seq_len: int) -> int:
    return len(self.tokens) // seq_len

  def window(self, index: int, seq_len: int) -> dict[str, np.ndarray]:
    sl = slice(index * seq_len, (index + 1) * seq_len)
    tokens, docs = self.tokens[sl], self.doc_ids[sl]
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


def tokenize(docs: list[str], tok, cache_key: str) -> tuple[np.ndarray, np.ndarray]:
  """Flat token stream and document ids for `docs`, cached under $FM_DATA_DIR/prepared."""
  path = sources.cache_dir() / 'prepared' / f'{cache_key}.npz'
  if path.exists():
    with np.load(path) as f:
      return f['tokens'], f['doc_ids']
  ids = [tok.encode(d) + [tok.eos_id] for d in docs]
  tokens = np.fromiter((t for doc in ids for t in doc), np.int32)
  doc_ids = np.repeat(np.arange(1, len(ids) + 1, dtype=np.int32), [len(d) for d in ids])
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'{path.stem}.{os.getpid()}.tmp.npz')
  np.savez(tmp, tokens=tokens, doc_ids=doc_ids)
  tmp.replace(path)
  return tokens, doc_ids


@dataclasses.dataclass
class Data:
  tokenizer: object
  train: Stream
  validation: Stream


def _load(data_cfg: ml_collections.ConfigDict):
  """(documents by split, their digests, the tokenizer) of `config.data`."""
  name = data_cfg.dataset
  splits = sources.load(name, **dict(data_cfg.source_kwargs))
  digests = {
    split: hashlib.sha256('\0'.join(docs).encode('utf-8')).hexdigest()
    for split, docs in splits.items()
  }
  tok = tokenizer_lib.build(data_cfg.tokenizer, splits['train'], name, digests['train'])
  return splits, digests, tok


def load_tokenizer(data_cfg: ml_collections.ConfigDict):
  """The tokenizer a run with this `config.data` uses (trained once, then cached)."""
  return _load(data_cfg)[2]


def prepare(data_cfg: ml_collections.ConfigDict) -> Data:
  """Loads the dataset named by `config.data`, its tokenizer, and both tokenized splits."""
  name = data_cfg.dataset
  splits, digests, tok = _load(data_cfg)
  tok_key = hashlib.sha256(json.dumps(tok.identity, sort_keys=True).encode()).hexdigest()[:12]
  token_bytes = tok.token_bytes()
  streams = {}
  for split, docs in splits.items():
    tokens, doc_ids = tokenize(docs, tok, f'{name}-{split}-{digests[split][:12]}-{tok_key}')
    streams[split] = Stream(tokens, doc_ids, token_bytes)
  return Data(tok, streams['train'], streams['validation'])


Transform = Callable[[dict, np.random.Generator], dict]


def train_dataset(
  stream: Stream,
  seq_len: int,
  global_batch: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  transform: Transform | None = None,
) -> grain.MapDataset:
  """Infinite, shuffled (reshuffled every epoch), per-process batches of packed windows.

  Global batch k holds the shuffled windows [k*B, (k+1)*B); process p takes every P-th of them,
  so the global batch is the same set of windows whatever the number of processes. An
  objective's host-side `transform` (masking, corruption) draws from a generator seeded by the
  window's global position, so it too is independent of the number of processes.
  """
  ds = grain.MapDataset.range(stream.num_windows(seq_len)).shuffle(seed=seed).repeat()
  ds = ds.map(lambda i: stream.window(int(i), seq_len))
  if transform is not None:
    ds = ds.random_map(transform, seed=seed)
  return ds[process_index::process_count].batch(global_batch // process_count, drop_remainder=True)


def padding_window(seq_len: int) -> dict[str, np.ndarray]:
  """A window of no document (segment ids 0, so weight 0), shaped like Stream.window's."""
  return {
    k: np.zeros(seq_len, np.int32) for k in ('tokens', 'segment_ids', 'positions', 'token_bytes')
  }


def eval_batches(
  stream: Stream,
  seq_len: int,
  global_batch: int,
  max_batches: int,
  process_index: int = 0,
  process_count: int = 1,
  transform: Transform | None = None,
):
  """The first `max_batches` (all if -1) batches of validation windows, in order, the last one
  padded with zero segment ids (weight 0). Same batches every eval."""
  n = stream.num_windows(seq_len)
  num_batches = -(-n // global_batch)
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  per_process = global_batch // process_count
  pad = padding_window(seq_len)
  ds = grain.MapDataset.range(num_batches * global_batch)
  ds = ds.map(lambda i: stream.window(int(i), seq_len) if i < n else pad)
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
) -> grain.MapDataset:
  """Infinite, shuffled (every epoch anew), per-process batches of rows of `arrays`; the same
  global batches for any number of processes, and resumable like `train_dataset`."""
  n = len(next(iter(arrays.values())))
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
  ds = ds.map(lambda i: {**{k: v[int(i)] for k, v in arrays.items()}, 'weight': np.float32(1)})
  return ds[process_index::process_count].batch(global_batch // process_count, drop_remainder=True)


def example_batches(
  arrays: dict[str, np.ndarray],
  global_batch: int,
  max_batches: int = -1,
  process_index: int = 0,
  process_count: int = 1,
):
  """All rows (or the first `max_batches` batches) in order; the last batch is padded with
  zero rows, which carry `weight` 0."""
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
  return ds[process_index::process_count].batch(global_batch // process_count, drop_remainder=True)
