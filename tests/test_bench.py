"""fm.bench: the step benchmark's JSON on the tiny shape."""

import json
import time

import pytest

from fm import bench, metrics


@pytest.mark.slow  # Compiles and times a step (about 35 s); CI runs it.
def test_bench_tiny_two_steps_writes_every_field(tmp_path, capsys):
  path = tmp_path / 'bench.json'
  argv = ['--shape', 'tiny', '--steps', '2', '--warmup', '1', '--pipeline_batches', '2']
  assert bench.main([*argv, '--json', str(path)]) == 0
  result = json.loads(path.read_text())
  for key in (
    'step_time_s',
    'tokens_per_s',
    'flops_per_token',
    'achieved_flops',
    'peak_flops',
    'probe_flops',
    'compile_s',
  ):
    assert result[key] > 0, key
  assert 0 < result['mfu'] <= 1
  assert len(result['step_times_s']) == 2 and result['params'] == 131_392
  assert (
    result['tokens_per_s'] == result['seq_len'] * result['global_batch'] / result['step_time_s']
  )
  assert result['memory']['compiled_temp_bytes'] > 0 and result['memory']['host_peak_rss_bytes'] > 0
  assert result['input']['windows_per_s'] > 0 and result['input']['dataset'] == 'news'
  assert 'MFU' in capsys.readouterr().out
  # Without a corpus (no network) the step's figures are printed, the pipeline's reason with them.
  result['input'] = {'dataset': 'news', 'error': 'no network'}
  assert 'not measured: no network (--pipeline_batches 0 skips it)' in bench.table(result)


def test_a_batch_the_devices_do_not_divide_is_one_sentence(capsys):
  assert bench.main(['--shape', 'tiny', '--batch', '3', '--pipeline_batches', '0']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: --batch 3 is not divisible by the 8 batch shards'), err


def test_throughput_is_timed_over_finished_steps_only():
  """A report with no step finished since the window started (the step logged right after
  compiling) gives no rates and leaves the window open, so the next report's rate counts all
  of its time: never a rate above what the steps took."""
  progress = metrics.Progress(total_steps=10, tokens_per_step=100, flops_per_step=1e9, peak=1e12)
  progress.reset(1)
  time.sleep(0.05)
  assert progress.report(1) == {}
  time.sleep(0.05)
  assert progress.report(2)['steps_per_sec'] <= 1 / 0.1  # One step in at least 0.1 s.
  line = metrics.progress_line(1, 10, {'train/loss': 2.0})
  assert line == 'step 1/10 | loss 2.0000 | n/a tok/s | MFU n/a | ETA ?'
