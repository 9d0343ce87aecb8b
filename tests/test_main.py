"""End to end: the README's smoke command, a 2-step run of every experiment, and bad input."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from workdirs import load_experiment, smoke_config, train_losses

from fm import ConfigError, checkpoint, configs, registry, runs, train
from fm.data import tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Experiment files (configs); scripts such as label_efficiency.py are run by their own tests.
EXPERIMENTS = sorted(
  p.stem for p in (ROOT / 'experiments').glob('*.py') if 'def get_config' in p.read_text()
)


def run_main(*args, timeout=300):
  # conftest's XLA_FLAGS are inherited: the subprocess sees the same 8 fake devices.
  return subprocess.run(
    [sys.executable, '-m', 'fm.main', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def readme_commands() -> list[list[str]]:
  """The README's smoke-sized `python -m fm.main` commands, as argument lists."""
  lines = [line.strip() for line in (ROOT / 'README.md').read_text().splitlines()]
  return [shlex.split(line) for line in lines if 'python -m fm.main' in line and ':smoke' in line]


def run_readme_command(cmd: list[str], workdir: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  while '=' in cmd[0]:  # Leading VAR=value assignments.
    key, value = cmd.pop(0).split('=', 1)
    env[key] = value
  cmd[cmd.index('--workdir') + 1] = str(workdir)
  assert cmd[:3] == ['python', '-m', 'fm.main']
  return subprocess.run(
    [sys.executable] + cmd[1:], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )


@pytest.mark.slow  # The README's quick commands, end to end (about 1 min); CI runs it.
def test_readme_smoke_commands(tmp_path):
  """The smoke command writes what the README says; the fsdp=8 variant computes the same."""
  commands = [c for c in readme_commands() if 'experiments/lm_shakespeare.py:smoke' in c]
  assert len(commands) == 2, commands
  plain, fsdp = sorted(commands, key=lambda c: 'XLA_FLAGS' in c[0])
  result = run_readme_command(plain, tmp_path / 'w')
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r'step \d+/\d+ \| loss .* tok/s \| MFU .* ETA', result.stdout)
  workdir = tmp_path / 'w'
  assert list(workdir.glob('events.out.tfevents.*'))
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  final = [r for r in records if 'eval/bits_per_byte' in r][-1]
  assert 0 < final['eval/bits_per_byte'] < 8
  resolved = json.loads((workdir / 'config.json').read_text())
  assert resolved['config']['objective'] == 'causal_lm'
  assert resolved['tokenizer']['kind'] == 'sentencepiece'

  result = run_readme_command(fsdp, tmp_path / 'fsdp')
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((tmp_path / 'fsdp' / 'config.json').read_text())['mesh'] == {
    'data': 1,
    'fsdp': 8,
    'sequence': 1,
    'tensor': 1,
  }
  a, b = train_losses(tmp_path / 'w'), train_losses(tmp_path / 'fsdp')
  assert a.keys() == b.keys()
  for step in a:
    assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


@pytest.mark.slow  # A pretraining and a fine-tuning run (about 1 min); CI runs it.
def test_readme_transfer_command_reuses_the_backbone(tmp_path):
  """The README's transfer command pretrains, fine-tunes and tests; run again, it trains
  nothing and reports the test accuracy again."""
  [command] = [c for c in readme_commands() if 'experiments/transfer_sentiment.py:smoke' in c]
  workdir = tmp_path / 't'
  first = run_readme_command(list(command), workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  # Nothing that is not the user's business on the console (orbax once warned at warm starts).
  assert 'WARNING' not in first.stderr and 'Warning' not in first.stderr, first.stderr[-3000:]
  assert 'training experiments/lm_shakespeare.py:smoke' in first.stdout
  tested = [
    json.loads(line)
    for line in (workdir / 'metrics.jsonl').read_text().splitlines()
    if 'test/accuracy' in line
  ]
  assert len(tested) == 1 and 0 <= tested[0]['test/accuracy'] <= 1
  pretraining = (workdir / 'pretrained' / 'metrics.jsonl').read_text()
  second = run_readme_command(list(command), workdir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'training experiments' not in second.stdout and 'nothing to train' in second.stdout
  assert 'test @ 20: loss' in second.stdout
  assert (workdir / 'pretrained' / 'metrics.jsonl').read_text() == pretraining


def test_ci_runs_the_readme_test_command():
  """.ci/run runs the test command exactly as the README gives it."""
  readme = (ROOT / 'README.md').read_text().splitlines()
  [command] = [line for line in readme if line.startswith('python -m pytest')]
  assert command in (ROOT / '.ci' / 'run').read_text().splitlines()


def test_readme_overrides_name_keys_the_command_line_takes():
  """Every --config.a.b the README shows is a key of some experiment's resolved config (the
  defaults table's and those the file sets) or a field of its model family."""
  readme = (ROOT / 'README.md').read_text()
  keys = set(re.findall(r'--config\.([a-z_.]*[a-z_])', readme))
  variants = {(e, 'smoke') for e in EXPERIMENTS}  # And those the README's commands name.
  variants |= set(re.findall(r'experiments/(\w+)\.py:(\w+)', readme))
  resolved = [configs.resolve(load_experiment(e).get_config(v)) for e, v in sorted(variants)]

  def takes(config, path):
    node = config
    for name in path.split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        head, _, field = path.partition('.')
        model = config.get('model', {}).get('name')
        fields = registry.get('models', model).Config.__dataclass_fields__ if model else {}
        return head == 'model' and field in fields
      node = node[name]
    return True

  assert len(keys) > 10
  assert not [k for k in keys if not any(takes(c, k) for c in resolved)]


# In the slow set: distillation and transfer_sentiment (covered by larger tests here, also in
# the slow set: test_distill_trains_the_teacher_once and the README command above; by default
# distillation's loss is test_objectives' interface test, fine-tuning test_finetune's),
# transfer_translate (the
# seq2seq path of transfer_headline, with another task's data) and llama (the 8b recipe at test
# size: fsdp, bf16, scanned and rematerialised layers, each also tested in test_models and
# test_sharding), and hf_headline (an imported T5 fine-tuned on headlines: its import, logits and
# decoding are test_convert's, its plan test_plan's, the seq2seq fine-tuning transfer_headline's),
# and the vision recipes (mae_fashion_mnist, vit_fashion_mnist, siglip_emoji: the ViT, the masked
# autoencoder's loss and masking, the image task's data and augmentation are test_vision's and
# test_objectives', the two towers and their losses test_contrastive's), hf_sentiment (an
# imported GPT-2 fine-tuned on sentiment: its import and logits are test_convert's, its plan
# test_plan's, the classification fine-tuning the README transfer command's) and ul2_news (the
# encoder-decoder recipe of t5_news with UL2's mixture: by default test_objectives checks the
# mixture's rows, its loss is span corruption's cross-entropy plus each denoiser's share, and
# test_step_flops lowers its gradient).
COVERED_ELSEWHERE = (
  'distill_shakespeare',
  'hf_headline',
  'hf_sentiment',
  'llama',
  'mae_fashion_mnist',
  'siglip_emoji',
  'transfer_sentiment',
  'transfer_translate',
  'ul2_news',
  'vit_fashion_mnist',
)
# The longest of the rest (30-60 s each on a 2-core AVX2 machine) run in the slow set too: masked
# LM's, prefix LM's and span corruption's losses are test_objectives' interface tests, by default;
# seq2seq fine-tuning (transfer_headline, named above for hf_headline) then runs in CI only.
LONGEST = ('mlm_shakespeare', 'prefixlm_shakespeare', 't5_news', 'transfer_headline')


@pytest.mark.parametrize(
  'name',
  [
    pytest.param(e, marks=pytest.mark.slow) if e in COVERED_ELSEWHERE + LONGEST else e
    for e in EXPERIMENTS
  ],
)
def test_every_experiment_runs_two_steps(name, tmp_path):
  config = smoke_config(name, train=dict(steps=2, log_every=1, eval_every=2))
  metrics = runs.run(config, tmp_path)
  assert metrics and all(np.isfinite(v) for v in metrics.values())  # Present and finite.


# (flags on lm_shakespeare:smoke, message): config mistakes that a run refuses in one sentence
# before it writes anything. Checked in-process, with the overrides applied as the command line
# applies them; CLI_ERRORS below run fm.main itself.
BAD_INPUT = [
  (['model.name=gpt5'], r"config.model.name='gpt5' is unknown; choose one of: decoder"),
  (['objective=telepathy'], r"config.objective='telepathy' is unknown; choose one of: .*causal_lm"),
  (['mesh.data=3'], r'config.mesh \(data=3,fsdp=1,sequence=1,tensor=1\) spans 3 devices but 8 are'),
  (['train.global_batch=7'], r'config.train.global_batch=7 is not divisible by the 8'),
  (
    ['data.seq_len=4096'],
    r"config.data.seq_len=4096 exceeds the max_len=512 of decoder variant 'tiny'; lower it with "
    r'--config.data.seq_len=512, or add max_len=4096 to config.model in the experiment file',
  ),
  (['data.dataset=wikipedia'], r"config.data.dataset='wikipedia' is unknown"),
  (['train.nonfinite=ignore'], r"config.train.nonfinite='ignore' is unknown; choose raise or skip"),
  (['train.steps=-1'], r'config.train.steps=-1 must be >= 0 \(0 only evaluates\)'),
  (['optim.lr=-0.001'], r'config.optim.lr=-0.001 must be >= 0'),
  (
    ['objective=distill'],
    r'config.objective_args.teacher needs a Hugging Face model directory \(.hf=DIR\), a workdir',
  ),
  (
    ['train.microbatches=3'],
    r'config.train.microbatches=3 must be >= 1 and split config.train.global_batch=8 into '
    r'slices that the 8 batch shards divide',
  ),
  (
    ['objective=ul2'],
    r"config.objective='ul2' does not work with config.model.name='decoder'; compatible "
    r'models: encdec',
  ),
  (['model.dtype=float17'], r"config.model.dtype='float17' is unknown; choose one of: float32"),
  (['model.remat=bogus'], r"config.model.remat='bogus' is unknown; choose one of: none, full"),
  (['model.attention_impl=flash'], r"config.model.attention_impl='flash' is unknown; choose"),
  (['data.seq_len=0'], r'config.data.seq_len=0 must be >= 2'),
  (['checkpoint.keep=0'], r'config.checkpoint.keep=0 must be >= 1'),
  (['data.tokenizer.kind=bpe'], r"config.data.tokenizer.kind='bpe' is unknown"),
  (['init.from_checkpoint=/nonexistent'], r"config.init.from_checkpoint='/nonexistent' holds no"),
  # A key the experiment leaves out is checked by name and type like any other.
  (['data.validation_fraction=abc'], r"config.data.validation_fraction='abc' is a str; give a "),
]
# (experiment, flags, message) for the objectives' own arguments.
BAD_OBJECTIVE_ARGS = [
  (
    'ul2_news',
    ['objective_args.mixture.S=-1.0'],
    r'config.objective_args.mixture=.* must give a weight >= 0',
  ),
  (
    'distill_shakespeare',
    ['objective_args.teacher.experiment=experiments/nope.py'],
    r"config.objective_args.teacher.experiment='experiments/nope.py': no such experiment file",
  ),
  (
    'distill_shakespeare',
    ['objective_args.teacher.workdir=/nonexistent'],
    r"config.objective_args.teacher.workdir='/nonexistent' holds no checkpoint",
  ),
  (
    'distill_shakespeare',
    ['objective_args.temperature=0'],
    r'config.objective_args.temperature=0.0 must be > 0',
  ),
]


@pytest.mark.parametrize(
  'experiment,flags,message', [('lm_shakespeare', f, m) for f, m in BAD_INPUT] + BAD_OBJECTIVE_ARGS
)
def test_bad_input_is_refused_before_anything_is_written(experiment, flags, message, tmp_path):
  config = load_experiment(experiment).get_config('smoke')
  configs.apply_overrides(config, ' '.join(flags), '--config')
  with pytest.raises(ConfigError, match=message):
    runs.run(config, tmp_path / 'w')
  assert not (tmp_path / 'w').exists()


def test_keys_the_experiment_leaves_out_can_be_overridden():
  """The command line sets any key of the defaults table (and an objective's options), also
  one the experiment file does not set (in a dict it leaves out too), and the run has it."""
  script = (
    'import sys; from absl import flags; from fm import cli, configs; cli.define_config(); '
    'cli.parse_flags(sys.argv); c = configs.resolve(flags.FLAGS.config); '
    'print(c.data.text_field, c.data.validation_fraction, c.optim.schedule, '
    'c.objective_args.vocab_chunk)'
  )
  raw = load_experiment('lm_shakespeare').get_config('smoke')
  assert 'objective_args' not in raw and 'text_field' not in raw.data
  assert 'schedule' not in raw.optim and 'validation_fraction' not in raw.data
  args = ['--config=experiments/lm_shakespeare.py:smoke', '--config.data.text_field=body']
  args += ['--config.data.validation_fraction=0.05', '--config.optim.schedule=constant']
  args += ['--config.objective_args.vocab_chunk=64']
  result = subprocess.run(
    [sys.executable, '-c', script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ['body', '0.05', 'constant', '64']
  configs.apply_overrides(raw, 'optim.schedule=constant data.text_field=body', 'x.overrides')
  resolved = configs.resolve(raw)  # `pretrained.overrides` and the like, alike.
  assert (resolved.optim.schedule, resolved.data.text_field) == ('constant', 'body')


def test_a_suggested_fix_works():
  """The seq_len error suggests --config.data.seq_len=512: a key the command line takes, and
  the config it gives passes the checks."""
  config = load_experiment('lm_shakespeare').get_config('smoke')
  config.data.seq_len = 4096
  with pytest.raises(ConfigError, match=r'lower it with --config\.data\.seq_len=512') as error:
    train.validate(configs.resolve(config), {'data': 8}, 8)
  key, value = re.search(r'--config\.(\S+)=(\d+)', str(error.value)).groups()
  configs.apply_overrides(config, f'{key}={value}', '--config')  # Refuses keys no table knows.
  train.validate(configs.resolve(config), {'data': 8}, 8)


# (arguments of fm.main, message): mistakes caught while parsing the command line.
CLI_ERRORS = [
  (
    ['--config', 'experiments/nope.py'],
    r'error: --config=experiments/nope.py: no such experiment file; give a path like',
  ),
  (
    ['--config', 'experiments/label_efficiency.py'],
    r'error: --config=experiments/label_efficiency.py: experiments/label_efficiency.py defines no '
    r'get_config\(arg\), so it is not an experiment file \(a script of its own: see python '
    r'experiments/label_efficiency.py --help\)',
  ),
  (
    ['--config', 'experiments/lm_shakespeare.py:smok'],
    r"error: --config=experiments/lm_shakespeare.py:smok: Unknown variant 'smok' of lm_shakespeare",
  ),
  (
    ['--config', 'experiments/lm_shakespeare.py:smoke', '--config.train.stepz=3'],
    r'error: --config.train.stepz=3: config.train.stepz is not a key of config.train \(did you '
    r"mean 'steps'\?\)",
  ),
  (
    ['--config', 'experiments/lm_shakespeare.py:smoke', '--config.optim.learning_rate=0.1'],
    r"config.optim.learning_rate is not a key of config.optim \(did you mean 'lr'\?\); its "
    r'keys: .*lr',
  ),
  (
    ['--config', 'experiments/lm_shakespeare.py:smoke', '--config.train.steps=abc'],
    r'--config.train.steps=abc',
  ),
  (
    ['--config', 'experiments/lm_shakespeare.py:smoke', '--config.data.text_fiel=body'],
    r'error: --config.data.text_fiel=body: config.data.text_fiel is not a key of config.data '
    r"\(did you mean 'text_field'\?\)",
  ),
  (
    ['--config', 'experiments/lm_shakespeare.py:smoke', '--config.optim.schedule=2'],
    r'error: --config.optim.schedule=2: config.optim.schedule=2 is a int; give a string like ',
  ),
  (
    ['--config', 'experiments/lm_shakespeare.py:smoke', '--config.mesh.data=3'],
    r'error: config.mesh \(data=3,fsdp=1,sequence=1,tensor=1\) spans 3 devices',
  ),
]


@pytest.mark.parametrize('args,message', CLI_ERRORS)
def test_command_line_mistakes_are_one_line(args, message, tmp_path):
  """One line on stderr, no traceback, exit status 2, and no workdir created."""
  result = run_main(*args, '--workdir', str(tmp_path / 'w'))
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and re.search(message, lines[0]), result.stderr
  assert not (tmp_path / 'w').exists()


def test_an_experiment_file_that_does_not_run_is_one_sentence_with_its_line(tmp_path):
  (tmp_path / 'syntax.py').write_text('def get_config(arg=None)\n  return 1\n')
  (tmp_path / 'key.py').write_text('def get_config(arg=None):\n  x = {}\n  return x["lr"]\n')
  with pytest.raises(ConfigError, match=r'syntax.py: SyntaxError: .* at line 1; fix that line'):
    configs.load(str(tmp_path / 'syntax.py'), '--config')
  with pytest.raises(ConfigError, match=r"key.py: get_config: KeyError: 'lr' at line 3; fix"):
    configs.load(str(tmp_path / 'key.py'), '--config')


def test_a_url_workdir_or_corpus_is_refused_not_written_locally(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match=r'workdir gs://b/run is a URL; .* e.g. --workdir /mnt/'):
    runs.run(smoke_config(), 'gs://b/run')
  config = smoke_config(data={'dataset': 'prepared', 'path': 'gs://b/prepared'})
  with pytest.raises(
    ConfigError, match=r'config.data.path gs://b/prepared is a URL; .* e.g. /mnt/'
  ):
    runs.run(config, tmp_path / 'w')
  assert not list(tmp_path.iterdir())


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(
    ConfigError, match=r'workdir .*/file/w is not writable .*; choose a directory'
  ):
    runs.run(smoke_config(), blocker / 'w')


def test_a_workdir_of_another_run_is_refused_before_anything_is_written(tmp_path):
  """A workdir whose config.json is another experiment's is refused in one sentence, leaving
  it as it was; the same run resumes there on another mesh or with more data workers."""
  held = smoke_config()
  (tmp_path / 'config.json').write_text(json.dumps({'config': train.as_json(held.to_dict())}))
  before = (tmp_path / 'config.json').read_text()
  with pytest.raises(
    ConfigError,
    match=r"workdir .* holds another run \(its config.json has data.dataset='shakespeare', this "
    r"config 'news'; it differs in data.dataset\); give another --workdir, or move .* away",
  ):
    runs.run(smoke_config('lm_news'), tmp_path)
  assert [p.name for p in tmp_path.iterdir()] == ['config.json']
  assert (tmp_path / 'config.json').read_text() == before
  with pytest.raises(ConfigError, match=r'differs in model.variant'):
    runs.run(smoke_config(model={'variant': 'mini'}), tmp_path)
  resumed = smoke_config(mesh={'data': 2, 'fsdp': 4}, data={'workers': 2}, train={'steps': 99})
  runs._check_own_workdir(tmp_path, resumed)


def own_files(directory: pathlib.Path, files: int, lines: int, seed: int = 0) -> None:
  """`files` .jsonl files of `lines` documents of 40 random words each (the ones missing)."""
  rng = np.random.default_rng(seed)
  words = 'the a river stone light of and in is was quiet north field bright old'.split()
  directory.mkdir(exist_ok=True)
  for part in range(files):
    if not (directory / f'{part}.jsonl').exists():
      docs = [json.dumps({'text': ' '.join(rng.choice(words, 40))}) for _ in range(lines)]
      (directory / f'{part}.jsonl').write_text('\n'.join(docs))


@pytest.mark.slow  # Prepares and trains in subprocesses (about 45 s); CI runs it.
def test_bring_your_own_files_from_the_command_line(tmp_path):
  """Any experiment trains on your own files with --config.data.dataset=files
  --config.data.train=GLOB (a held-out fraction when no validation files are given)."""
  own_files(tmp_path / 'in', 2, 300)
  result = run_main(
    '--config',
    'experiments/prefixlm_shakespeare.py:smoke',
    '--workdir',
    str(tmp_path / 'w'),
    '--config.data.dataset=files',
    f'--config.data.train={tmp_path}/in/*.jsonl',
    '--config.data.tokenizer.kind=bytes',
    '--config.train.steps=2',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'final eval @ 2' in result.stdout
  prepared = json.loads((tmp_path / 'w' / 'config.json').read_text())['tokenizer']
  assert prepared == {'kind': 'bytes', 'vocab_size': 259}


def test_help_lists_each_commands_flags():
  """--help of fm.main and fm.plan lists --config (defined in fm/cli.py) with their own flags
  (absl's --help exits 1); fm.checkpoint's prints its usage and exits 0."""
  for module in ('fm.main', 'fm.plan'):
    done = subprocess.run(
      [sys.executable, '-m', module, '--help'],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert '--config: Experiment file, optionally with :variant.' in done.stdout, done.stderr
    assert '--workdir' in done.stdout if module == 'fm.main' else '--topology' in done.stdout
  done = subprocess.run(
    [sys.executable, '-m', 'fm.checkpoint', '--help'], cwd=ROOT, capture_output=True, text=True
  )
  assert done.returncode == 0 and done.stdout.startswith('usage: python -m fm.checkpoint inspect')


def test_a_run_whose_files_changed_is_not_resumed(tmp_path):
  """A `files` run resumed after a file was added (its corpus prepared anew, with a tokenizer
  trained anew) is refused in one sentence, its workdir untouched; with the files restored it
  resumes."""
  own_files(tmp_path / 'in', 2, 200)
  data = dict(dataset='files', train=f'{tmp_path}/in/*.jsonl', tokenizer=dict(vocab_size=300))
  config = smoke_config(data=data, train=dict(steps=2, eval_every=2))
  workdir = tmp_path / 'w'
  runs.run(config, workdir)
  before = (workdir / 'config.json').read_text()
  own_files(tmp_path / 'in', 3, 200, seed=1)  # A third file, 2.jsonl.
  config.train.steps = 4
  with pytest.raises(
    ConfigError,
    match=r'/w holds checkpoints up to step 2 trained with tokenizer [0-9a-f]{64}, config.data now '
    r'gives [0-9a-f]{64} \(its files, or their tokenizer, changed since\); restore the data',
  ):
    runs.run(config, workdir)
  assert (workdir / 'config.json').read_text() == before
  assert checkpoint.latest_step(workdir) == 2
  (tmp_path / 'in' / '2.jsonl').unlink()
  runs.run(config, workdir)
  assert checkpoint.latest_step(workdir) == 4


def test_another_tokenized_corpus_is_not_resumed(tmp_path):
  """The same tokenizer on another corpus (a given or byte tokenizer, the files changed) is
  refused too; a checkpoint from before corpora were recorded is not."""
  ckpt = tmp_path / 'checkpoints' / '6'
  (ckpt / 'state').mkdir(parents=True)
  (ckpt / 'meta').mkdir()
  tok = tokenizer.ByteTokenizer()
  meta = {'tokenizer': train.as_json(tok.identity), 'corpus': 'a' * 64}
  (ckpt / 'meta' / 'metadata').write_text(json.dumps(meta))
  train._check_same_data(tmp_path, tok, 'a' * 64)
  with pytest.raises(ConfigError, match=r'trained with tokenized corpus aaaaaaaaaaaa, config.data'):
    train._check_same_data(tmp_path, tok, 'b' * 64)
  (ckpt / 'meta' / 'metadata').write_text(json.dumps({**meta, 'corpus': None}))
  train._check_same_data(tmp_path, tok, 'b' * 64)
  (ckpt / 'meta' / 'metadata').write_text('{"tok')  # Damaged: for the restore to move aside.
  train._check_same_data(tmp_path, tok, 'b' * 64)


@pytest.mark.slow  # A teacher and a student run (about 50 s); CI runs it.
def test_distill_trains_the_teacher_once(tmp_path):
  """The first run trains the teacher into WORKDIR/teacher; a later run reuses it."""
  config = smoke_config('distill_shakespeare', train=dict(steps=2, log_every=1, eval_every=2))
  runs.run(config, tmp_path)
  teacher = tmp_path / 'teacher'
  assert checkpoint.latest_step(teacher) == 20
  trained = (teacher / 'metrics.jsonl').read_text()
  config.train.steps = 4
  metrics = runs.run(config, tmp_path)
  assert (teacher / 'metrics.jsonl').read_text() == trained  # Not trained again.
  frozen = json.loads((tmp_path / 'config.json').read_text())['frozen']
  assert frozen == {'teacher': str(teacher / 'checkpoints' / '20')}
  assert 0 < metrics['teacher_loss'] and 0 <= metrics['kl']


def test_teacher_with_another_tokenizer_is_refused():
  meta = {
    'config': {'model': {'name': 'decoder'}},
    'tokenizer': {'kind': 'byte'},
    'model': {'vocab_size': 384},
  }
  _, student = train.model_config(smoke_config('distill_shakespeare'), 4096)
  with pytest.raises(
    ConfigError,
    match=r'config.objective_args.teacher: /t was trained with '
    r'tokenizer .* set config.data to the same',
  ):
    train._check_frozen(
      'teacher',
      '/t',
      meta,
      registry.get('objectives', 'distill'),
      student,
      {'kind': 'sentencepiece'},
    )
  meta['config']['model']['name'] = 'encdec'
  with pytest.raises(ConfigError, match=r"holds a 'encdec' model; fm.objectives.distill needs"):
    train._check_frozen(
      'teacher', '/t', meta, registry.get('objectives', 'distill'), student, {'kind': 'byte'}
    )
