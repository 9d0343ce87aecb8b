"""Tests run on 8 fake CPU devices; the flag must be set before jax is imported."""

import os
import pathlib
import tempfile

# The 8 devices are threads on a few cores: on a busy machine one can reach a collective long
# after the others, so XLA's 40 s rendezvous deadline (which aborts the process) is raised.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  ' --xla_cpu_collective_call_terminate_timeout_seconds=900'
  ' --xla_cpu_collective_timeout_seconds=1800'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# XLA's CPU client sizes its thread pools to max(cores, devices): 8 threads for 8 devices on a
# 2-core machine. A device's program can hold two of them at once (one blocked in a collective),
# and a run then waited forever with 7 devices in an all-reduce and the 8th device's work queued
# behind the blocked threads. Twice the devices leaves room (fm.main.cpu_threads does the same).
os.environ.setdefault('PJRT_NPROC', '16')
# Many tests compile the same smoke-sized programs, in this process, in subprocesses and in the
# other pytest-xdist workers of the session (which share its run id): one persistent
# compilation cache for them all.
_run = os.environ.get('PYTEST_XDIST_TESTRUNUID')
_cache = pathlib.Path(tempfile.gettempdir()) / f'fm-jax-cache-{_run}' if _run else None
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', str(_cache) if _cache else tempfile.mkdtemp(prefix='fm-jax-cache-')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
# Implicit broadcasting between arrays of different ranks is an error, not a silent reshape.
jax.config.update('jax_numpy_rank_promotion', 'raise')


@pytest.fixture(scope='session')
def shakespeare_data():
  """The real Shakespeare corpus with its SentencePiece tokenizer (downloaded and cached once)."""
  from workdirs import smoke_config

  from fm.data import pipeline

  return pipeline.prepare(smoke_config('lm_shakespeare').data)


# The default set's longest tests, run in the slow set instead (`.ci/run` runs both), so that
# `pytest -m "not slow"` stays within 10 minutes on the slower CPUs this project is tested on
# (the default set took 18 min 15 s on a 2-core AVX2 machine with these in it, 8 min 12 s on an
# AVX-512 one; 10 min 12 s without the first 29 of these). Each is still run by CI, in the slow
# set.
LONGEST = {
  'test_main.py::test_readme_smoke_commands',
  'test_main.py::test_readme_transfer_command_reuses_the_backbone',
  'test_main.py::test_distill_trains_the_teacher_once',
  'test_main.py::test_bring_your_own_files_from_the_command_line',
  'test_main.py::test_every_experiment_runs_two_steps[transfer_headline]',
  'test_main.py::test_every_experiment_runs_two_steps[t5_news]',
  'test_main.py::test_every_experiment_runs_two_steps[mlm_shakespeare]',
  'test_checkpoint.py::test_partial_save_on_disk_is_ignored',
  'test_checkpoint.py::test_sigkill_then_resume_is_exact[during_save]',
  'test_checkpoint.py::test_sigterm_saves_and_exits_zero[no_save_in_flight]',
  'test_checkpoint.py::test_warm_start_loads_backbone_and_keeps_fresh_head',
  'test_finetune.py::test_task_and_mode_two_steps_on_8_devices'
  '[sentiment-lora-experiments/mlm_shakespeare.py:smoke]',
  'test_finetune.py::test_task_and_mode_two_steps_on_8_devices'
  '[sentiment-zero_shot-experiments/lm_shakespeare.py:smoke]',
  'test_finetune.py::test_pointing_at_a_run_never_trains_it',
  'test_finetune.py::test_frozen_params_stay_bitwise_unchanged[full]',
  'test_finetune.py::test_frozen_params_stay_bitwise_unchanged[lora]',
  'test_plan.py::test_remat_and_accumulation_lower_compiled_memory',
  'test_objectives.py::test_distillation_loss_is_zero_when_student_equals_teacher',
  'test_objectives.py::test_sharded_step_equals_single_device[causal_lm]',
  'test_objectives.py::test_interface_and_finite_gradients[mae]',
  'test_objectives.py::test_interface_and_finite_gradients[distill]',
  'test_objectives.py::test_interface_and_finite_gradients[span_corruption]',
  'test_bench.py::test_bench_tiny_two_steps_writes_every_field',
  'test_sharding.py::test_sharded_step_equals_single_device[data=2,sequence=2,tensor=2]',
  'test_sharding.py::test_sharded_step_equals_single_device[data=2,fsdp=2,tensor=2]',
  'test_decoding.py::test_beam_search[decoder]',
  'test_decoding.py::test_kv_cache_matches_recomputation[encdec-False]',
  'test_vision.py::test_mae_encoder_never_sees_masked_patches',
  'test_models.py::test_causal[True]',
  'test_sharding.py::test_sharded_step_equals_single_device[fsdp=8]',
  'test_objectives.py::test_interface_and_finite_gradients[contrastive]',
  'test_objectives.py::test_interface_and_finite_gradients[ul2]',
  'test_objectives.py::test_sharded_step_equals_single_device[masked_lm]',
  'test_models.py::test_gradient_accumulation_matches_the_whole_batch_and_saves_memory',
  'test_finetune.py::test_merged_lora_gives_the_same_outputs[fm.models.decoder-False]',
  'test_decoding.py::test_kv_cache_matches_recomputation[decoder-True]',
  'test_decoding.py::test_kv_cache_matches_recomputation[prefix_lm-False]',
  'test_checkpoint.py::test_corrupt_checkpoint_is_skipped',
  'test_checkpoint.py::test_nonfinite_skip_counts_and_keeps_params',
  'test_convert.py::test_imported_logits_and_greedy_ids_match_transformers[t5]',
  'test_main.py::test_every_experiment_runs_two_steps[prefixlm_shakespeare]',
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  found = set()
  for item in items:
    name = f'{item.path.name}::{item.name}'
    if name in LONGEST:
      item.add_marker(pytest.mark.slow)
      found.add(name)
  # Whole test directories, collected without errors: every name must still name a test.
  whole = all(pathlib.Path(arg).is_dir() for arg in config.args)
  if whole and items and not items[0].session.testsfailed and found != LONGEST:
    raise pytest.UsageError(f'tests/conftest.py LONGEST names no test: {sorted(LONGEST - found)}')
