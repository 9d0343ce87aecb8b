"""Data at scale: prepare time and memory, training memory and pipeline speed against corpus size.

  python experiments/data_bench.py --workdir /tmp/data_bench
  python experiments/data_bench.py --workdir /tmp/data_bench_smoke --smoke

Corpora of 1x, 4x, 16x and 64x the Shakespeare plays (one .jsonl file per copy, each play a
document marked with its copy number; 64x is about 0.5 GB of text). Per size it measures:
  - `python -m fm.data.prepare` with 1 and 2 DirectRunner workers: wall time and the peak memory
    of the whole process tree (sampled resident set sizes, summed over the driver and workers);
    once training the tokenizer on the driver (a fixed cost, 8-19 s on 2 cores, that workers do not
    share) and once given it (--tokenizer_model, as corpora to be mixed are prepared). Each of
    the four is run REPEATS times from scratch, in interleaved rounds (so a slow spell of the
    machine falls on all of them alike); the table gives the median, the JSON every run;
  - the default experiment (experiments/lm_shakespeare.py) training 20 steps on the prepared
    corpus (--config.data.dataset=prepared): the training process's peak resident set;
  - the input pipeline alone, with BERT masking as its host-side transform: windows per second,
    against the windows per second the training step consumes.
Writes data_bench.md and data_bench.json to the workdir and prints the table; finished
measurements are kept, so rerunning continues.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIZES = (1, 4, 16, 64)
REPEATS = 3  # Runs of each prepare measurement; the median is reported.


def write_corpus(directory: pathlib.Path, copies: int) -> str:
  """`copies` .jsonl files of the Shakespeare training plays, each document marked with its
  copy (so copies differ and split by hash independently)."""
  from fm.data import sources

  directory.mkdir(parents=True, exist_ok=True)
  plays = sources.shakespeare()['train']
  for copy in range(copies):
    path = directory / f'copy-{copy:03d}.jsonl'
    if not path.exists():
      partial = path.with_suffix('.partial')
      with open(partial, 'w') as f:
        for play in plays:
          f.write(json.dumps({'text': f'{play}\n(copy {copy})'}) + '\n')
      partial.replace(path)
  return str(directory / '*.jsonl')


def tree_rss(pid: int) -> int:
  """Resident bytes of a process and all its descendants."""
  children = {}
  for entry in pathlib.Path('/proc').iterdir():
    if entry.name.isdigit():
      try:
        fields = (entry / 'stat').read_text().rsplit(')', 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
      except OSError:
        continue
  total, todo = 0, [pid]
  while todo:
    p = todo.pop()
    try:
      for line in pathlib.Path(f'/proc/{p}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
          total += int(line.split()[1]) * 1024
    except OSError:
      pass
    todo += children.get(p, [])
  return total


def measure(command: list[str], **kwargs) -> dict:
  """Wall seconds and peak summed resident set of a command's process tree."""
  started = time.perf_counter()
  proc = subprocess.Popen(
    command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
  )
  peak = 0
  while proc.poll() is None:
    peak = max(peak, tree_rss(proc.pid))
    time.sleep(0.1)
  out = proc.stdout.read()
  if proc.returncode:
    raise RuntimeError(f'{" ".join(command)} failed:\n{out[-3000:]}')
  return {'seconds': time.perf_counter() - started, 'peak_rss': peak, 'output': out}


def pipeline_speed(directory: pathlib.Path, seq_len: int, batch: int, batches: int) -> float:
  """Windows per second of the training pipeline alone, with BERT masking on the host."""
  import ml_collections

  from fm.data import pipeline
  from fm.objectives import masked_lm

  manifest, tok = pipeline.open_prepared(directory)
  split = pipeline.Split(directory, 'train', manifest, tok.token_bytes())
  corrupt = masked_lm.host_transform(tok.vocab_size, ml_collections.ConfigDict(masked_lm.ARGS))
  it = iter(pipeline.train_dataset(split, seq_len, batch, 0, transform=corrupt))
  next(it)
  started = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - started)


def run(workdir: pathlib.Path, sizes, steps: int, repeats: int) -> dict:
  import shutil
  import statistics

  from fm import metrics as metrics_lib  # Reads the training runs' metrics.jsonl.

  results_path = workdir / 'data_bench.json'
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  for size in sizes:
    row = results.setdefault(str(size), {})
    corpus = write_corpus(workdir / f'corpus-{size}', size)
    row['text_bytes'] = sum(p.stat().st_size for p in (workdir / f'corpus-{size}').glob('*.jsonl'))
    for _ in range(repeats):  # Rounds: each measurement once per round.
      for tokenizer, workers in (('trained', 1), ('trained', 2), ('given', 1), ('given', 2)):
        key = f'prepare_{workers}' if tokenizer == 'trained' else f'given_{workers}'
        suffix = '' if tokenizer == 'trained' else '-given'
        output = workdir / f'prepared-{size}-w{workers}{suffix}'
        done = row.setdefault(key, {})
        runs = done.setdefault('runs', [])  # (A workdir of single measurements: run anew.)
        if len(runs) >= repeats:
          continue
        shutil.rmtree(output, ignore_errors=True)  # From scratch (a prepared output is reused).
        command = [sys.executable, '-m', 'fm.data.prepare', '--train', corpus]
        command += ['--output', str(output), '--workers', str(workers)]
        if tokenizer == 'given':
          command += ['--tokenizer_model', str(workdir / f'prepared-{size}-w1' / 'tokenizer.model')]
        result = measure(command)
        measured = {'seconds': result['seconds'], 'peak_rss': result['peak_rss']}
        trained = re.search(r'\[ *([0-9.]+) s\] the tokenizer trained', result['output'])
        if trained:
          measured['tokenizer_trained_at'] = float(trained.group(1))
        runs.append(measured)
        done['seconds'] = statistics.median(r['seconds'] for r in runs)
        done['peak_rss'] = max(r['peak_rss'] for r in runs)
        if trained:
          done['tokenizer_trained_at'] = statistics.median(r['tokenizer_trained_at'] for r in runs)
        _save(results_path, results)
    if 'train' not in row:
      train_dir = workdir / f'train-{size}'
      result = measure(
        [
          sys.executable,
          '-m',
          'fm.main',
          '--config',
          'experiments/lm_shakespeare.py',
          '--workdir',
          str(train_dir),
          '--config.data.dataset=prepared',
          f'--config.data.path={workdir / f"prepared-{size}-w1"}',
          f'--config.train.steps={steps}',
          '--config.train.log_every=5',
          '--config.train.eval_every=1000',
          '--config.train.final_eval_batches=2',
          '--config.checkpoint.every_steps=0',
        ]
      )
      speeds = [v for _, v in metrics_lib.series(train_dir, 'steps_per_sec')]
      row['train'] = {
        'peak_rss': result['peak_rss'],
        'steps_per_sec': speeds[-1],
        'windows_per_sec': speeds[-1] * 16,
      }
      _save(results_path, results)
    if 'pipeline_windows_per_sec' not in row:
      row['pipeline_windows_per_sec'] = pipeline_speed(
        workdir / f'prepared-{size}-w1', 256, 16, 100
      )
      _save(results_path, results)
  return results


def _save(path: pathlib.Path, results: dict) -> None:
  partial = path.with_suffix('.partial')
  partial.write_text(json.dumps(results, indent=1))
  partial.replace(path)


def table(results: dict) -> str:
  gib = lambda x: f'{x / 2**30:.2f} GiB'
  cell = lambda r: f'{r["seconds"]:.1f} s, {gib(r["peak_rss"])}' if r else ''
  ratio = lambda a, b: f'{a["seconds"] / b["seconds"]:.2f}x' if a and b else ''
  lines = [
    '| corpus | text | prepare, 1 worker | 2 workers | speed-up '
    '| tokenizer given: 1 worker | 2 workers | speed-up | training peak RSS '
    '| pipeline windows/s (masking) | step consumes windows/s |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for size, row in sorted(results.items(), key=lambda kv: int(kv[0])):
    one, two = row.get('prepare_1'), row.get('prepare_2')
    given_one, given_two = row.get('given_1'), row.get('given_2')
    train = row.get('train')
    pipe = row.get('pipeline_windows_per_sec')
    cells = [
      f'{size}x',
      f'{row["text_bytes"] / 2**20:.0f} MiB',
      cell(one),
      cell(two),
      ratio(one, two),
      cell(given_one),
      cell(given_two),
      ratio(given_one, given_two),
      gib(train['peak_rss']) if train else '',
      f'{pipe:,.0f}' if pipe else '',
      f'{train["windows_per_sec"]:,.1f}' if train else '',
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--smoke', action='store_true', help='sizes 1 and 2, 4 training steps')
  parser.add_argument('--sizes', type=int, nargs='*', default=list(SIZES))
  parser.add_argument('--repeats', type=int, default=REPEATS, help='runs of each prepare (median)')
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sizes, steps, repeats = ((1, 2), 4, 1) if args.smoke else (args.sizes, 20, args.repeats)
  results = run(workdir, sizes, steps, repeats)
  markdown = table(results)
  (workdir / 'data_bench.md').write_text(markdown + '\n')
  print(markdown)
  return 0


if __name__ == '__main__':
  sys.exit(main())
