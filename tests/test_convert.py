"""Hugging Face checkpoints in and out (fm/convert), against fixtures transformers wrote
(tests/fixtures/hf/make.py: tiny random models, their logits and greedy ids)."""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fm import ConfigError, checkpoint, convert, decoding, sharding
from fm.models import decoder

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures' / 'hf'
NAMES = ('llama', 'llama-tied', 'qwen2', 'llama3', 'gpt2', 'bert', 't5', 't5-tied')


def restored(ckpt):
  """(model, params) of a checkpoint on one device."""
  return checkpoint.restore_local(ckpt)[:2]


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp('imported')
  return {name: convert.import_hf(FIXTURES / name, root / name) for name in NAMES}


# T5 in the slow set (about 20 s); its tied variant, the same encoder-decoder import, by default.
@pytest.mark.parametrize(
  'name', [pytest.param(n, marks=pytest.mark.slow) if n == 't5' else n for n in NAMES]
)
def test_imported_logits_and_greedy_ids_match_transformers(imported, name):
  reference = np.load(FIXTURES / name / 'reference.npz')
  model, params = restored(imported[name])
  inputs = jnp.asarray(reference['inputs'])
  family = 'encdec' if 'decoder_inputs' in reference else 'decoder'
  if family == 'encdec':  # The encoder's output too.
    logits = model.apply(params, inputs, jnp.asarray(reference['decoder_inputs']))
    encoded = model.apply(params, inputs, encode_only=True)
    np.testing.assert_allclose(encoded, reference['hidden'], atol=1e-4, rtol=0)
  else:
    logits = model.apply(params, inputs)
  np.testing.assert_allclose(logits, reference['logits'], atol=1e-4, rtol=0)
  if 'generated' not in reference:  # An encoder: its final hidden states too.
    _, states = model.apply(
      params, jnp.asarray(reference['inputs']), capture_intermediates=True, mutable='intermediates'
    )
    last = states['intermediates'][f'layer_{model.model_cfg.num_layers - 1}']['__call__'][0]
    np.testing.assert_allclose(last, reference['hidden'], atol=1e-4, rtol=0)
    return
  prompt = jnp.asarray(reference['prompt'])
  new = reference['generated'].shape[1] - prompt.shape[1]
  ids = decoding.greedy(family, model.model_cfg, params, prompt, jnp.ones_like(prompt), new)
  np.testing.assert_array_equal(ids, reference['generated'][:, prompt.shape[1] :])


@pytest.mark.parametrize('name', NAMES)
def test_export_then_import_is_bit_identical(imported, name, tmp_path):
  """Exported tensors are the fixture's bit for bit (sharded, with an index); imported again,
  the params are the first import's."""
  config = convert.export_hf(imported[name], tmp_path / 'hf', shard_mb=0)
  assert (
    config['model_type'] == json.loads((FIXTURES / name / 'config.json').read_text())['model_type']
  )
  original, exported = convert.Reader(FIXTURES / name), convert.Reader(tmp_path / 'hf')
  assert set(exported.weight_map) == set(original.weight_map)
  assert len(set(exported.weight_map.values())) > 1
  for tensor in original.weight_map:
    a, b = original.get(tensor), exported.get(tensor)
    assert a.dtype == b.dtype and np.array_equal(a, b), tensor
  again = convert.import_hf(tmp_path / 'hf', tmp_path / 'again')
  first, second = restored(imported[name])[1], restored(again)[1]
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), first, second))


def fm_checkpoint(
  directory: pathlib.Path, name: str = 'decoder', adjust=lambda params: params, **fields
) -> tuple[pathlib.Path, decoder.Config]:
  """A randomly initialised fm model of family `name` (a decoder: fm's own tied, scaled logits),
  its params passed through `adjust`, saved as a checkpoint."""
  from fm import registry

  family = registry.get('models', name)
  model_cfg = family.Config(**{**family.VARIANTS['tiny'], 'vocab_size': 300, **fields})
  tokens = jnp.zeros((1, 8), jnp.int32)
  variables = family.Model(model_cfg).init(jax.random.key(1), *family.inputs(model_cfg, tokens))
  params = adjust({'params': sharding.unbox(variables)['params']})
  ckpt = directory / 'checkpoints' / '7'
  ocp.PyTreeCheckpointer().save(ckpt / 'state', {'params': params})
  (ckpt / 'meta').mkdir()
  meta = {'family': name, 'model': dataclasses.asdict(model_cfg)}
  (ckpt / 'meta' / 'metadata').write_text(json.dumps(meta))
  return ckpt, model_cfg


TOKENS = np.random.default_rng(0).integers(0, 300, (2, 12))


def test_an_fm_model_exports_as_llama(tmp_path):
  """fm's tied logits scaled by d_model**-0.5 leave as an untied head: the model imported back
  gives the same logits."""
  ckpt, _ = fm_checkpoint(tmp_path / 'fm')
  config = convert.export_hf(tmp_path / 'fm', tmp_path / 'hf')
  assert config['model_type'] == 'llama' and not config['tie_word_embeddings']
  mode = lambda name: (tmp_path / 'hf' / name).stat().st_mode & 0o777
  assert mode('model.safetensors') == mode('config.json')  # Not its owner's alone.
  model, params = restored(ckpt)
  back_model, back_params = restored(convert.import_hf(tmp_path / 'hf', tmp_path / 'back'))
  np.testing.assert_allclose(
    back_model.apply(back_params, jnp.asarray(TOKENS)),
    model.apply(params, jnp.asarray(TOKENS)),
    atol=1e-5,
  )


def copy_fixture(tmp_path: pathlib.Path, name: str = 'llama') -> pathlib.Path:
  return pathlib.Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_bad_input_is_one_sentence(tmp_path):
  hf = copy_fixture(tmp_path)
  config = json.loads((hf / 'config.json').read_text())
  (hf / 'config.json').write_text(json.dumps({**config, 'model_type': 'mamba'}))
  with pytest.raises(
    ConfigError,
    match=r"model_type 'mamba' is not supported; fm converts bert, gpt2, llama, mistral, qwen2, t5.",
  ):
    convert.import_hf(hf, tmp_path / 'out')
  qwen2 = copy_fixture(tmp_path, 'qwen2')
  windowed = json.loads((qwen2 / 'config.json').read_text())
  windowed.update(use_sliding_window=True, sliding_window=16, max_window_layers=1)
  (qwen2 / 'config.json').write_text(json.dumps(windowed))
  with pytest.raises(
    ConfigError, match=r"this qwen2 checkpoint uses sliding_window, which fm's decoder does not"
  ):
    convert.import_hf(qwen2, tmp_path / 'out')
  (hf / 'config.json').write_text(json.dumps({**config, 'intermediate_size': 100}))
  with pytest.raises(
    ConfigError,
    match=r'tensor model.layers.0.mlp.gate_proj.weight has shape \(96, 64\), but config.json '
    r'makes it \(100, 64\)',
  ):
    convert.import_hf(hf, tmp_path / 'out')
  (hf / 'config.json').write_text(json.dumps(config))
  shard = sorted(hf.glob('model-*.safetensors'))[1]
  data = shard.read_bytes()
  shard.write_bytes(data[:-100])
  with pytest.raises(ConfigError, match=rf'{shard} ends inside tensor .*: the file is truncated'):
    convert.import_hf(hf, tmp_path / 'out')
  shard.unlink()
  with pytest.raises(ConfigError, match=rf'{shard.name} is missing \(model.safetensors.index.json'):
    convert.import_hf(hf, tmp_path / 'out')
  assert not (tmp_path / 'out').exists() and not list(tmp_path.glob('.out.*'))
  with pytest.raises(ConfigError, match=r'--mesh names model; the axes are data, fsdp, sequence'):
    convert.parse_mesh('fsdp=2,model=4')
  with pytest.raises(ConfigError, match=r"--mesh 'fsdp' is not a list of axis=size"):
    convert.parse_mesh('fsdp')


def test_import_streams_onto_a_mesh(tmp_path, monkeypatch):
  """Each tensor is written before the next is read (with no buffer, no array read earlier is
  alive when one is read), sharded for --mesh as the trainer's rules place it, in its
  published dtype (bfloat16 here), and restores onto one device as the same values."""
  import weakref

  import ml_dtypes
  import safetensors.numpy

  hf = copy_fixture(tmp_path)
  for shard in hf.glob('model-*.safetensors'):
    tensors = safetensors.numpy.load_file(str(shard))
    half = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    safetensors.numpy.save_file(half, str(shard), metadata={'format': 'pt'})
  read, get = [], convert.Reader.get

  def tracked(reader, name):
    assert not [r for r in read if r() is not None], f'an earlier tensor is alive reading {name}'
    array = get(reader, name)
    read.append(weakref.ref(array))
    return array

  monkeypatch.setattr(convert.Reader, 'get', tracked)
  monkeypatch.setattr(convert, 'BUFFER_BYTES', 0)
  mesh = convert.parse_mesh('fsdp=4,tensor=2')
  ckpt = convert.import_hf(hf, tmp_path / 'w', mesh=mesh)
  assert len(read) == len(convert.Reader(hf).weight_map)
  saved = ocp.PyTreeCheckpointHandler().metadata(ckpt / 'state').tree['params']['params']
  query = saved['layer_0']['attn']['query']
  assert query.dtype == ml_dtypes.bfloat16
  assert tuple(query.sharding.partition_spec) == ('fsdp', 'tensor', None)
  assert dict(zip(query.sharding.axis_names, query.sharding.shape))['fsdp'] == 4
  model, params = restored(ckpt)
  want = convert.Reader(hf).get('model.layers.0.self_attn.q_proj.weight').astype(np.float32)
  got = params['params']['layer_0']['attn']['query']
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got.reshape(got.shape[0], -1), want.T)


def test_the_command_refuses_an_existing_target(tmp_path):
  command = [sys.executable, '-m', 'fm.convert']
  run = lambda *args: subprocess.run(
    [*command, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  done = run('import', FIXTURES / 'llama', tmp_path / 'w')
  assert done.returncode == 0, done.stderr[-2000:]
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'hf' / 'keep.txt').write_text('mine')
  done = run('export', tmp_path / 'w', tmp_path / 'hf')
  assert done.returncode == 2
  assert done.stderr.strip() == (
    f'error: HF_DIR {tmp_path / "hf"} exists; give another or add --overwrite to replace it.'
  )
  assert (tmp_path / 'hf' / 'keep.txt').read_text() == 'mine'
  done = run('export', tmp_path / 'w', tmp_path / 'hf', '--overwrite')
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / 'hf' / 'config.json').exists() and not (tmp_path / 'hf' / 'keep.txt').exists()


def reference_script():
  """tests/fixtures/hf/make.py (it needs torch and transformers, which fm does not)."""
  import importlib.util

  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  spec = importlib.util.spec_from_file_location('make', FIXTURES / 'make.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_transformers_reads_an_exported_fm_model(tmp_path):
  """With transformers installed (not a dependency), it computes an exported fm model's
  logits."""
  make = reference_script()  # Skips unless torch and transformers are importable.
  import torch

  ckpt, _ = fm_checkpoint(tmp_path / 'fm')
  convert.export_hf(tmp_path / 'fm', tmp_path / 'hf')
  model, params = restored(ckpt)
  theirs = make.auto(make.transformers.AutoConfig.from_pretrained(tmp_path / 'hf'))
  with torch.no_grad():
    logits = theirs.from_pretrained(tmp_path / 'hf').eval()(torch.tensor(TOKENS)).logits.numpy()
  np.testing.assert_allclose(logits, model.apply(params, jnp.asarray(TOKENS)), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_transformers_reads_an_exported_import(imported, name, tmp_path):
  """With transformers installed: each fixture imported and exported again gives transformers'
  logits and greedy ids (as `make.py --check` shows)."""
  make = reference_script()  # Skips unless torch and transformers are importable.
  import torch

  convert.export_hf(imported[name], tmp_path / 'hf')
  want = np.load(FIXTURES / name / 'reference.npz')
  config = make.transformers.AutoConfig.from_pretrained(tmp_path / 'hf')
  theirs = make.auto(config).from_pretrained(tmp_path / 'hf', dtype=torch.float32).eval()
  with torch.no_grad():
    logits = make.run(theirs, want['inputs']).logits.numpy()
  np.testing.assert_allclose(logits, want['logits'], atol=1e-4, rtol=0)
  if 'generated' in want:
    np.testing.assert_array_equal(make.reference(theirs)['generated'], want['generated'])


def test_hf_tokenizer_matches_transformers(tmp_path):
  """kind=hf: the gpt2 fixture's tokenizer.json gives the ids transformers gives, decodes back
  losslessly, and counts bytes exactly; a corpus prepares with it; an import carries it."""
  from fm.data import pipeline, prepare, tokenizer

  reference = np.load(FIXTURES / 'gpt2' / 'reference.npz')
  text = str(reference['text'])
  tok = tokenizer.load_hf(str(FIXTURES / 'gpt2'))
  ids = tok.encode(text)
  assert ids == reference['text_ids'].tolist() and tok.decode(ids) == text
  assert tok.token_bytes()[ids].sum() == len(text.encode('utf-8'))
  assert tok.vocab_size == 300 and tok.eos_id == tok.bos_id == 0
  (tmp_path / 'in.jsonl').write_text(
    ''.join(json.dumps({'text': f'{text} {i}'}) + '\n' for i in range(40))
  )
  spec = prepare.Spec(
    train=(str(tmp_path / 'in.jsonl'),),
    tokenizer='hf',
    tokenizer_model=str(FIXTURES / 'gpt2'),
    validation_fraction=0.2,
  )
  manifest = prepare.prepare(spec, tmp_path / 'prepared')
  assert manifest['tokenizer'] == tok.identity
  data_cfg = ml_collections.ConfigDict(
    dict(
      dataset='prepared',
      path=str(tmp_path / 'prepared'),
      mixture=(),
      tokenizer=dict(kind='hf', vocab_size=4096, model=str(FIXTURES / 'gpt2')),
    )
  )
  data = pipeline.prepare(data_cfg)
  assert data.tokenizer.decode(data.train.document(0)[:-1]).startswith(text)
  convert.import_hf(FIXTURES / 'gpt2', tmp_path / 'w')
  assert tokenizer.load_hf(str(tmp_path / 'w' / 'tokenizer')).identity == tok.identity
  convert.export_hf(tmp_path / 'w', tmp_path / 'hf')
  assert (tmp_path / 'hf' / 'tokenizer.json').read_bytes() == tok.proto


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
  hf = copy_fixture(tmp_path)  # 256 embedding rows.
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(FIXTURES / 'gpt2' / name, hf / name)
  with pytest.raises(
    ConfigError, match=r"tokenizer.json has 300 tokens, more than the 256 rows of the model's"
  ):
    convert.import_hf(hf, tmp_path / 'out')


def test_a_tokenizer_without_eos_token_ends_documents_with_its_separator(tmp_path):
  """BERT's tokenizer_config.json names sep_token, not eos_token: [SEP] ends a document; with
  neither, one sentence."""
  from fm.data import tokenizer as tokenizer_lib

  shutil.copy(FIXTURES / 'gpt2' / 'tokenizer.json', tmp_path / 'tokenizer.json')
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'sep_token': '<|endoftext|>'}))
  tok = tokenizer_lib.load_hf(str(tmp_path))
  gpt2 = tokenizer_lib.load_hf(str(FIXTURES / 'gpt2'))
  assert tok.eos_id == gpt2.eos_id and tok.encode('a b') == gpt2.encode('a b')
  (tmp_path / 'tokenizer_config.json').write_text('{}')
  with pytest.raises(ConfigError, match=r'names no eos_token \(nor sep_token\), which ends'):
    tokenizer_lib.load_hf(str(tmp_path))
  for path in (FIXTURES / 'gpt2').glob('*'):
    if path.name.startswith(('config', 'model')):
      shutil.copy(path, tmp_path / path.name)
  with pytest.raises(ConfigError, match=r'^HF_DIR .*: its tokenizer_config.json names no eos'):
    convert.import_hf(tmp_path, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_a_target_that_is_a_file_is_refused(tmp_path):
  (tmp_path / 'f').write_text('')
  with pytest.raises(ConfigError, match=r'WORKDIR .*/f is a file; give a directory to write'):
    convert.import_hf(FIXTURES / 'gpt2', tmp_path / 'f')
  assert (tmp_path / 'f').read_text() == ''


def test_pretrained_hf_imports_once(tmp_path, monkeypatch):
  """pretrained.hf: the backbone config comes from config.json and the tokenizer files alone;
  the import is made once and reused; a workdir holding another run is refused."""
  from fm import runs

  spec = ml_collections.ConfigDict(dict(hf=str(FIXTURES / 'gpt2'), experiment='', workdir=''))
  dep = runs.dependency(spec, 'config.pretrained', tmp_path / 'pretrained')
  assert dep.config.model.norm == 'layer' and dep.config.data.tokenizer.kind == 'hf'
  assert not (tmp_path / 'pretrained').exists()  # Nothing written before the run starts.
  ckpt = runs.obtain(dep)
  stamp = (ckpt / 'meta' / 'metadata').stat().st_mtime_ns
  monkeypatch.setattr(convert, 'import_hf', lambda *a, **k: pytest.fail('imported twice'))
  assert runs.obtain(dep) == ckpt and (ckpt / 'meta' / 'metadata').stat().st_mtime_ns == stamp
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'metrics.jsonl').write_text('')
  with pytest.raises(ConfigError, match=r'other holds another run; move it away'):
    runs.obtain(runs.dependency(spec, 'config.pretrained', tmp_path / 'other'))
  # The import named as a workdir: the key that takes it is named.
  by_workdir = ml_collections.ConfigDict(dict(hf='', experiment='', workdir=str(ckpt)))
  with pytest.raises(
    ConfigError,
    match=r'is a Hugging Face model imported by fm.convert, .*; give config.pretrained.hf='
    rf"'{FIXTURES / 'gpt2'}' \(the directory it came from\) instead of config.pretrained.workdir",
  ):
    runs.dependency(by_workdir, 'config.pretrained', tmp_path / 'p2')


def spm_model(texts: list[str], **options) -> bytes:
  import io

  import sentencepiece as spm

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts), model_writer=model, vocab_size=600, minloglevel=2, **options
  )
  return model.getvalue()


def test_every_tokenizer_kind_has_hf_files_with_its_ids(tmp_path):
  """fm's SentencePiece models (identity normaliser, byte fallback), SentencePiece's defaults
  (NFKC, a dummy prefix, extra whitespace removed) with byte fallback, and bytes: their HF
  files (loaded as kind=hf) give the same ids, text, special ids and bytes per token."""
  from fm.data import sources, tokenizer

  plays = sources.shakespeare()['validation']
  texts = [p for play in plays for p in play.split('\n\n') if p.strip()]
  probes = [
    '  two  spaces ',
    'Ｆｕｌｌｗｉｄｔｈ ① ﬁ',
    ' lead',
    'tab\there\n\nnl ',
    'ünï 日本語 😀',
    '',
    '\nthe king',  # Trimming spaces leaves other whitespace.
    ' \tthe ',
  ]
  held_out, train_texts = texts[::5] + probes, [t for i, t in enumerate(texts) if i % 5]
  fm_kind = tokenizer.SentencePieceTokenizer(tokenizer.train_sentencepiece(train_texts, 600))
  defaults = tokenizer.SentencePieceTokenizer(
    spm_model(train_texts, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3)
  )
  for i, tok in enumerate([fm_kind, defaults, tokenizer.ByteTokenizer()]):
    tokenizer.save(tok, tmp_path / str(i))
    back = tokenizer.load_hf(str(tmp_path / str(i)))
    assert (back.vocab_size, back.eos_id, back.bos_id) == (tok.vocab_size, tok.eos_id, tok.bos_id)
    for text in held_out:
      assert back.encode(text) == list(tok.encode(text)), (i, text)
      assert back.decode(back.encode(text)) == tok.decode(tok.encode(text)), (i, text)
    np.testing.assert_array_equal(back.token_bytes(), tok.token_bytes())
  # Models whose ids a unigram tokenizer.json would not give: no files, and the reason.
  for options, reason in [
    ({}, 'has no byte fallback'),
    ({'model_type': 'bpe', 'byte_fallback': True}, 'is not a unigram model'),
    ({'byte_fallback': True, 'treat_whitespace_as_suffix': True}, 'whitespace at the end'),
  ]:
    tok = tokenizer.SentencePieceTokenizer(spm_model(train_texts, **options))
    assert tokenizer.hf_files(tok) == {} and reason in tokenizer.no_hf_files(tok)


def test_an_fm_model_exports_with_its_runs_tokenizer(tmp_path, capsys):
  """export ships the tokenizer files a run wrote into WORKDIR/tokenizer, and names the end
  token in config.json; a workdir without them exports its weights and says why."""
  from fm.data import tokenizer

  tok = tokenizer.ByteTokenizer()
  fm_checkpoint(tmp_path / 'fm')
  meta = tmp_path / 'fm' / 'checkpoints' / '7' / 'meta' / 'metadata'
  meta.write_text(json.dumps({**json.loads(meta.read_text()), 'tokenizer': tok.identity}))
  convert.export_hf(tmp_path / 'fm', tmp_path / 'bare')
  assert 'written without a tokenizer' in capsys.readouterr().out
  assert not (tmp_path / 'bare' / 'tokenizer.json').exists()
  tokenizer.save(tok, tmp_path / 'fm' / 'tokenizer')
  config = convert.export_hf(tmp_path / 'fm', tmp_path / 'hf')
  assert (config['eos_token_id'], config['bos_token_id']) == (tok.eos_id, tok.bos_id)
  assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['eos_token_id'] == tok.eos_id
  assert tokenizer.load_hf(str(tmp_path / 'hf')).encode('fm ü') == tok.encode('fm ü')
  # Files of another tokenizer than the checkpoint's: refused before anything is written.
  other = tokenizer.load_hf(str(FIXTURES / 'gpt2'))
  meta.write_text(json.dumps({**json.loads(meta.read_text()), 'tokenizer': other.identity}))
  with pytest.raises(ConfigError, match=r'holds tokenizer .* but .* was trained with'):
    convert.export_hf(tmp_path / 'fm', tmp_path / 'refused')
  assert not list(tmp_path.glob('*refused*'))


@pytest.mark.parametrize(
  'name, layout',
  [
    ('decoder', {}),  # Exported as llama.
    ('encdec', dict(positions='relative', attention_scale=1.0, num_kv_heads=4)),  # As T5.
  ],
)
def test_a_lora_run_exports_once_merged(name, layout, tmp_path):
  """A checkpoint with LoRA adapters (a causal LM's or a seq2seq run's) is refused by export in
  one sentence naming the merge command; the merged checkpoint exports, and the model imported
  back gives the adapted model's logits."""
  from fm import finetune, registry

  # Adapters that change the outputs (their B factors start at zero).
  lora = lambda params: jax.tree_util.tree_map_with_path(
    lambda path, x: x + 0.05 if 'lora' in jax.tree_util.keystr(path) else x, params
  )
  ckpt, _ = fm_checkpoint(tmp_path / 'fm', name, lora, lora_rank=4, **layout)
  with pytest.raises(
    ConfigError,
    match=r'has LoRA adapters; fold them in first \(python -m fm.finetune merge .*/fm\) and export '
    r'the merged checkpoint it writes',
  ):
    convert.export_hf(tmp_path / 'fm', tmp_path / 'hf')
  assert not (tmp_path / 'hf').exists()
  merged, _ = finetune.merge(str(tmp_path / 'fm'))
  convert.export_hf(merged, tmp_path / 'hf')
  family, tokens = registry.get('models', name), jnp.asarray(TOKENS)
  logits = lambda model, params: model.apply(params, *family.inputs(model.model_cfg, tokens))
  back = restored(convert.import_hf(tmp_path / 'hf', tmp_path / 'back'))
  np.testing.assert_allclose(logits(*back), logits(*restored(ckpt)), atol=1e-4)


def test_a_scanned_model_exports_and_warm_starts_across_layer_layouts(tmp_path):
  """A scanned model's stacked layers export as HF's one tensor set per layer (the model
  imported back gives its logits); the import, unscanned, warm-starts a scanned model, which
  gives the same logits again."""
  ckpt, model_cfg = fm_checkpoint(tmp_path / 'fm', scan_layers=True)
  convert.export_hf(tmp_path / 'fm', tmp_path / 'hf')
  tokens = jnp.asarray(TOKENS)
  want = decoder.Model(model_cfg).apply(restored(ckpt)[1], tokens)
  back_ckpt = convert.import_hf(tmp_path / 'hf', tmp_path / 'back')
  back_model, back_params = restored(back_ckpt)
  assert not back_model.model_cfg.scan_layers
  np.testing.assert_allclose(back_model.apply(back_params, tokens), want, atol=1e-5)
  scanned = dataclasses.replace(back_model.model_cfg, scan_layers=True)
  fresh = sharding.unbox(decoder.Model(scanned).init(jax.random.key(9), tokens))
  said = []
  params = checkpoint.load_backbone(str(tmp_path / 'back'), fresh, log=said.append)
  assert 'from its layers in the other layout' in said[0] and 'freshly' not in said[0]
  np.testing.assert_allclose(decoder.Model(scanned).apply(params, tokens), want, atol=1e-5)


@pytest.mark.parametrize(
  'fields',
  [
    dict(attention_scale=1.0),  # HF's GPT-2 scales by head_dim**-0.5.
    dict(head_dim=32),  # HF's GPT-2 makes head_dim n_embd // n_head (16).
  ],
)
def test_a_model_no_layout_holds_is_refused_by_export(fields, tmp_path):
  """A GPT-2-shaped decoder that GPT-2's layout cannot hold is refused, not written wrong."""
  gpt2 = dict(
    norm='layer',
    positions='learned',
    bias=True,
    scale_tied_logits=False,
    mlp='gelu',
    num_kv_heads=4,
  )
  fm_checkpoint(tmp_path / 'fm', **gpt2)
  assert convert.export_hf(tmp_path / 'fm', tmp_path / 'ok')['model_type'] == 'gpt2'
  fm_checkpoint(tmp_path / 'other', **gpt2, **fields)
  with pytest.raises(ConfigError, match=r'no HF layout fm writes holds this decoder'):
    convert.export_hf(tmp_path / 'other', tmp_path / 'hf')
  assert not list(tmp_path.glob('*hf*'))


def test_a_target_holding_the_source_is_refused(tmp_path):
  """Export into the checkpoint's own workdir (or import into the HF directory), even with
  overwrite, is refused: replacing the target would delete what is converted."""
  fm_checkpoint(tmp_path / 'fm')
  for target in (tmp_path / 'fm', tmp_path):
    with pytest.raises(ConfigError, match=r'holds .*/fm/checkpoints/7, which is converted'):
      convert.export_hf(tmp_path / 'fm', target, overwrite=True)
  assert (tmp_path / 'fm' / 'checkpoints' / '7' / 'state').is_dir()
  hf = copy_fixture(tmp_path)
  with pytest.raises(ConfigError, match=r'holds .*/llama, which is converted'):
    convert.import_hf(hf, hf, overwrite=True)
  assert (hf / 'config.json').exists()
