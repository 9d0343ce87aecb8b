"""Every objective module (discovered with pkgutil) honours its contract and gives finite grads."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fm import ConfigError, configs, objectives, optim, plan, registry, sharding, train
from fm.data import pipeline
from fm.objectives import causal_lm, distill, masked_lm, span_corruption, ul2

OBJECTIVES = registry.choices('objectives')
VOCAB = 384


def args(objective, **overrides) -> ml_collections.ConfigDict:
  """The objective's args as a run resolves them: its ARGS (or the default) with `overrides`."""
  defaults = registry.get('objectives', objective.__name__.rpartition('.')[2]).ARGS
  return ml_collections.ConfigDict({**defaults, **overrides})


def tiny_batch(objective=None, vocab=VOCAB, B=8, L=32):
  """Two packed documents and padding per row, corrupted by the objective's host transform
  (an image objective: random 28 x 28 images, masked by it)."""
  rng = np.random.default_rng(0)
  if objective is not None and objective.MODALITY == 'image_text':  # The tiny two-tower's.
    images = rng.integers(0, 256, (B, 32, 32, 3)).astype(np.uint8)
    tokens = rng.integers(3, 259, (B, L)).astype(np.int32)
    tokens[:, L // 2 :] = 0  # Padding after each caption.
    return {'image': images, 'tokens': tokens}
  if objective is not None and objective.MODALITY == 'image':
    images = rng.integers(0, 256, (B, 28, 28, 1)).astype(np.uint8)
    mask = objective.host_transform((28 // 4) ** 2, args(objective))
    rows = [mask({'image': images[i]}, np.random.default_rng(i)) for i in range(B)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  tokens = rng.integers(4, vocab, (B, L)).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  seg[:, 20:] = 2
  seg[:, 28:] = 0  # Padding.
  pos = np.concatenate([np.arange(20), np.arange(8), np.zeros(4, int)])[None].repeat(B, 0)
  rows = [
    {
      'tokens': tokens[i],
      'segment_ids': seg[i],
      'positions': pos[i].astype(np.int32),
      'token_bytes': np.full(L, 2, np.int32),
    }
    for i in range(B)
  ]
  if objective is not None and objective.host_transform:
    corrupt = objective.host_transform(vocab - objective.EXTRA_TOKENS, args(objective))
    rows = [corrupt(r, np.random.default_rng(i)) for i, r in enumerate(rows)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def frozen_models(objective, model, sample, mesh=None, rules=None) -> dict:
  """name -> (apply_fn, params) for each frozen model the objective reads (a teacher): the
  same architecture from another seed, sharded over `mesh` when given."""
  init = lambda rng: nn.unbox(model.init(rng, *sample))
  if mesh is not None:
    abstract = jax.eval_shape(model.init, jax.random.key(7), *sample)
    init = jax.jit(init, out_shardings=sharding.tree_shardings(abstract, mesh, rules))
  return {name: (model.apply, init(jax.random.key(7))) for name in objective.FROZEN}


def setup_model(name, model_name):
  """(resolved config, model, zero inputs of tiny_batch's shape) of a tiny model."""
  modality = registry.get('objectives', name).MODALITY
  image = modality != 'text'
  datasets = {'image': 'fashion_mnist', 'image_text': 'emoji'}
  config = configs.resolve(
    dict(
      objective=name,
      model=dict(name=model_name, variant='tiny'),
      data=dict(dataset=datasets[modality]) if image else dict(dataset='shakespeare', seq_len=32),
      train=dict(steps=10, global_batch=8),
      # Adam's first update is g / (|g| + eps): a larger eps keeps rounding in near-zero
      # gradients from turning into full-size steps that differ between meshes.
      optim=dict(lr=1e-3, eps=1e-4),
    )
  )
  family, model_cfg = train.model_config(config, vocab_size=None if image else VOCAB)
  return config, family.Model(model_cfg), train.sample_inputs(family, model_cfg, 8, 32)


def test_every_objective_honours_its_contract():
  """Each discovered module defines what fm/objectives/__init__.py requires, with values of
  the right kinds; its compatible models exist and its default args pass its own checks."""
  for name in OBJECTIVES:
    objective = registry.get('objectives', name)
    assert all(hasattr(objective, m) for m in registry.members(objectives.Objective)), name
    assert callable(objective.loss_fn) and callable(objective.summarize)
    assert set(objective.COMPATIBLE_MODELS) <= set(registry.choices('models')), name
    assert isinstance(objective.ARGS, dict) and objective.EXTRA_TOKENS >= 0
    objective.validate(args(objective))


def test_a_module_missing_a_required_name_is_refused(tmp_path, monkeypatch):
  """A new objective without `summarize` is named in one sentence when it is looked up."""
  monkeypatch.setattr(objectives, '__path__', [*objectives.__path__, str(tmp_path)])
  (tmp_path / 'half_done.py').write_text(
    "COMPATIBLE_MODELS = ('decoder',)\n\n\n"
    'def loss_fn(apply_fn, params, batch, rng, args):\n'
    '  return 0.0, {}\n'
  )
  message = (
    r'fm.objectives.half_done does not define summarize, which the Objective contract in '
    r'fm.objectives requires; add it to .*half_done.py'
  )
  with pytest.raises(ConfigError, match=message):
    registry.get('objectives', 'half_done')


# UL2 (span corruption's encoder-decoder loss with a mixture, whose host side
# test_ul2_mixture_modes_and_reassembly checks) and the contrastive loss (test_contrastive's) in
# the slow set.
@pytest.mark.parametrize(
  'name',
  [
    pytest.param(n, marks=pytest.mark.slow) if n in ('ul2', 'contrastive') else n
    for n in OBJECTIVES
  ],
)
def test_interface_and_finite_gradients(name):
  objective = registry.get('objectives', name)
  for model_name in objective.COMPATIBLE_MODELS:
    config, model, sample = setup_model(name, model_name)
    batch = jax.tree.map(jnp.asarray, tiny_batch(objective))
    params = jax.jit(lambda rng: nn.unbox(model.init(rng, *sample)))(jax.random.key(0))
    frozen = {
      k: functools.partial(apply, p)
      for k, (apply, p) in frozen_models(objective, model, sample).items()
    }
    grad_fn = jax.value_and_grad(objective.loss_fn, argnums=1, has_aux=True)
    # Jitted: one compilation instead of thousands of eagerly dispatched ops.
    (loss, aux), grads = jax.jit(
      lambda p, b: grad_fn(model.apply, p, b, jax.random.key(1), config.objective_args, **frozen)
    )(params, batch)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    summary = objective.summarize(jax.tree.map(float, aux))
    assert np.isclose(summary['loss'], loss, rtol=1e-5)


@pytest.mark.parametrize('name', ['span_corruption', 'ul2'])
def test_step_flops_count_the_rows_the_objective_makes(name):
  """An encoder-decoder objective states the shapes its host transform makes (`row_lengths`),
  and train.step_flops, counting those rows, agrees within 5% with XLA's count of the loss
  gradient on such a batch (counting the window under T5's default shares instead misses 39% of
  UL2's rows at 256-token windows)."""
  objective = registry.get('objectives', name)
  config, model, sample = setup_model(name, 'encdec')
  batch = tiny_batch(objective, B=2, L=32)
  lengths = (batch['inputs'].shape[1], batch['targets'].shape[1])
  assert objective.row_lengths(32, config.objective_args) == lengths
  family = registry.get('models', 'encdec')
  ours = train.step_flops(family, model.model_cfg, objective, config.objective_args, 32, 2)
  assert ours == 2 * family.flops_per_row(model.model_cfg, *lengths)  # The rows, not the window.
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *sample)))
  grad = jax.grad(lambda p, b: objective.loss_fn(model.apply, p, b, None, config.objective_args)[0])
  cost = jax.jit(grad).lower(params, batch).cost_analysis()  # The lowered program's count.
  xla = (cost[0] if isinstance(cost, list) else cost)['flops']
  assert abs(xla / ours - 1) < 0.05, (xla, ours)
  # fm.plan's `minimal` remat recomputes the attention scores of these rows (not of T5's shares).
  scores = family._scores(model.model_cfg, *lengths) * 6
  remat = dataclasses.replace(model.model_cfg, remat='minimal')
  factor = plan.recompute_factor(family, remat, objective, config.objective_args, 32)
  assert abs(factor - (1 + scores / family.flops_per_row(model.model_cfg, *lengths) / 3)) < 0.01


# Every objective's sharded step runs in the slow set (20-40 s each on a 2-core AVX2 machine);
# tests/test_sharding.py checks the causal LM's step on data and tensor meshes by default.
@pytest.mark.slow
@pytest.mark.parametrize('name', OBJECTIVES)
def test_sharded_step_equals_single_device(name):
  """One optimizer step of every objective gives the same loss on 8 devices as on one."""
  objective = registry.get('objectives', name)
  config, model, sample = setup_model(name, objective.COMPATIBLE_MODELS[0])
  batch = tiny_batch(objective)
  loss_fn = functools.partial(objective.loss_fn, args=config.objective_args)
  results = []
  for mesh_cfg, devices in (
    (dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
    (dict(data=2, fsdp=2, tensor=2), jax.devices()),
  ):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_cfg), devices)
    rules = sharding.DEFAULT_RULES
    with sharding.use(mesh, rules):
      frozen = frozen_models(objective, model, sample, mesh, rules)
      tx = optim.make(config.optim, 10)
      program = train.build(model, tx, loss_fn, config, mesh, rules, sample, frozen)
      state = program.init(jax.random.key(0))
      for _ in range(2):
        state, metrics = program.train_step(
          state, sharding.put_batch(batch, mesh, rules), jax.random.key(1)
        )
      results.append(float(metrics['loss']))
  np.testing.assert_allclose(results[1], results[0], rtol=1e-5)


def test_causal_lm_weights_skip_boundaries_and_padding():
  _, weights = causal_lm.targets_and_weights(jax.tree.map(jnp.asarray, tiny_batch()))
  w = np.asarray(weights[0])
  assert w[:19].all() and not w[19]  # Last token of doc 1 does not predict doc 2.
  assert w[20:27].all() and not w[27]  # Last token of doc 2 does not predict padding.
  assert not w[28:].any()  # Padding is never a target.


def test_bits_per_byte_of_uniform_model():
  """Uniform logits cost ln(V) nats per token; with 2 bytes per token that is log2(V)/2 bits/byte."""
  V = 256
  batch = jax.tree.map(jnp.asarray, tiny_batch(vocab=V))
  apply_fn = lambda params, tokens, seg, pos: jnp.zeros((*tokens.shape, V))
  _, aux = causal_lm.loss_fn(apply_fn, None, batch, None, None)
  summary = causal_lm.summarize(jax.tree.map(float, aux))
  assert math.isclose(summary['loss'], math.log(V), rel_tol=1e-5)  # float32 sums.
  assert math.isclose(summary['bits_per_byte'], math.log2(V) / 2, rel_tol=1e-5)


def test_masking_statistics():
  """Over many draws: 15% of real tokens chosen, of which 80% masked, 10% random, 10% kept."""
  V, L = 4096, 256
  corrupt = masked_lm.host_transform(V, args(masked_lm))
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, V, L).astype(np.int32)
  seg = np.r_[np.ones(200, np.int32), np.zeros(56, np.int32)]
  window = {'tokens': tokens, 'segment_ids': seg, 'positions': np.arange(L, dtype=np.int32)}
  outs = [corrupt(window, np.random.default_rng(i)) for i in range(2000)]
  chosen = np.stack([o['target_weights'] for o in outs]) > 0
  corrupted = np.stack([o['tokens'] for o in outs])
  assert not chosen[:, 200:].any()  # Padding is never chosen.
  assert abs(chosen[:, :200].mean() - 0.15) < 0.005
  masked = (corrupted == V)[chosen].mean()
  replaced = ((corrupted != V) & (corrupted != tokens))[chosen].mean()
  assert abs(masked - 0.8) < 0.01 and abs(replaced - 0.1) < 0.01
  assert np.array_equal(np.stack([o['targets'] for o in outs])[0], tokens)
  # The mask id lies past every text id, and random replacements are text ids.
  assert corrupted.max() == V and corrupted[corrupted != V].max() < V


def test_masking_is_deterministic_and_process_independent(shakespeare_data):
  corrupt = masked_lm.host_transform(shakespeare_data.tokenizer.vocab_size, args(masked_lm))
  stream = shakespeare_data.train
  one = next(iter(pipeline.train_dataset(stream, 64, 8, 0, transform=corrupt)))
  again = next(iter(pipeline.train_dataset(stream, 64, 8, 0, transform=corrupt)))
  np.testing.assert_array_equal(one['tokens'], again['tokens'])
  halves = [
    next(iter(pipeline.train_dataset(stream, 64, 8, 0, p, 2, transform=corrupt))) for p in range(2)
  ]
  rows = lambda b: {(t.tobytes(), w.tobytes()) for t, w in zip(b['tokens'], b['target_weights'])}
  assert len(halves[0]['tokens']) == len(halves[1]['tokens']) == 4  # Each process its half.
  assert not rows(halves[0]) & rows(halves[1])
  assert rows(halves[0]) | rows(halves[1]) == rows(one)


@pytest.mark.parametrize('seq_len', [32, 64, 256])
def test_span_corruption_reassembles_exactly(seq_len):
  V = 4096
  corrupt = span_corruption.host_transform(V, args(span_corruption))
  num_noise, num_spans, input_len = span_corruption.lengths(seq_len)
  rng = np.random.default_rng(0)
  span_lengths = []
  for i in range(200):
    tokens = rng.integers(4, V, seq_len).astype(np.int32)
    out = corrupt(
      {
        'tokens': tokens,
        'segment_ids': np.ones(seq_len, np.int32),
        'positions': np.arange(seq_len),
      },
      np.random.default_rng(i),
    )
    np.testing.assert_array_equal(
      span_corruption.reassemble(out['inputs'], out['targets'], V), tokens
    )
    assert out['inputs'].shape == (input_len,) and out['targets'].shape == (num_noise + num_spans,)
    # Sentinels: one per span, ids past every text id, in order, in both inputs and targets.
    sentinels = out['inputs'][out['inputs'] >= V]
    np.testing.assert_array_equal(sentinels, V + np.arange(num_spans))
    np.testing.assert_array_equal(out['targets'][out['targets'] >= V], sentinels)
    kept = out['inputs'][out['inputs'] < V]  # The text left in place.
    assert len(kept) == seq_len - num_noise and set(kept) <= set(tokens)
    np.testing.assert_array_equal(out['decoder_in'], np.r_[0, out['targets'][:-1]])
    span_lengths += [
      len(s) - 1 for s in np.split(out['targets'], np.flatnonzero(out['targets'] >= V))[1:]
    ]
  assert num_noise == round(0.15 * seq_len) and num_spans == max(round(num_noise / 3.0), 1)
  assert abs(np.mean(span_lengths) - num_noise / num_spans) < 1e-9 and min(span_lengths) >= 1


@pytest.mark.slow  # About 40 s; distillation's loss and gradients run by default (interface).
def test_distillation_loss_is_zero_when_student_equals_teacher():
  _, model, sample = setup_model('distill', 'decoder')
  batch = jax.tree.map(jnp.asarray, tiny_batch())
  params = nn.unbox(model.init(jax.random.key(0), *sample))
  teacher = functools.partial(model.apply, params)
  for temperature in (1.0, 2.0, 4.0):
    soft = args(distill, temperature=temperature, hard_weight=0.0)
    (loss, aux), grads = jax.value_and_grad(distill.loss_fn, argnums=1, has_aux=True)(
      model.apply, params, batch, None, soft, teacher=teacher
    )
    assert abs(float(loss)) < 1e-6 and float(optax.tree.norm(grads)) < 1e-6
  # A different student: positive KL; hard_weight=1 is plain next-token cross-entropy.
  student = nn.unbox(model.init(jax.random.key(1), *sample))
  loss, aux = distill.loss_fn(model.apply, student, batch, None, soft, teacher=teacher)
  assert float(loss) > 0.01
  hard = args(distill, hard_weight=1.0)
  loss, aux = distill.loss_fn(model.apply, student, batch, None, hard, teacher=teacher)
  plain, _ = causal_lm.loss_fn(model.apply, student, batch, None, args(causal_lm))
  np.testing.assert_allclose(float(loss), float(plain), rtol=1e-6)
  summary = distill.summarize(jax.tree.map(float, aux))
  teacher_plain, _ = causal_lm.loss_fn(model.apply, params, batch, None, args(causal_lm))
  np.testing.assert_allclose(summary['teacher_loss'], float(teacher_plain), rtol=1e-5)
  np.testing.assert_allclose(summary['lm_loss'], float(plain), rtol=1e-5)


def test_ul2_mixture_modes_and_reassembly():
  """Denoisers are drawn with the configured weights; R and X reassemble exactly with their
  spans and densities; S splits the window; mode tokens and sentinels lie past the text ids."""
  V, L, draws = 4096, 128, 3000
  args = ml_collections.ConfigDict(
    dict(
      mixture=dict(R=0.5, S=0.2, X=0.3),
      r_spans=((3.0, 0.15),),
      x_spans=((32.0, 0.5),),
      s_density=0.25,
    )
  )
  corrupt = ul2.host_transform(V, args)
  input_len, target_len = ul2.row_lengths(L, args)
  rng = np.random.default_rng(0)
  counts = np.zeros(3)
  for i in range(draws):
    tokens = rng.integers(4, V, L).astype(np.int32)
    out = corrupt(
      {'tokens': tokens, 'segment_ids': np.ones(L, np.int32), 'positions': np.arange(L)},
      np.random.default_rng(i),
    )
    assert out['inputs'].shape == (input_len,) and out['targets'].shape == (target_len,)
    mode = int(out['mode'])
    counts[mode] += 1
    inputs = out['inputs'][out['input_segment_ids'] > 0]
    targets = out['targets'][out['target_segment_ids'] > 0]
    assert inputs[0] == V + span_corruption.EXTRA_TOKENS + mode  # The mode token leads.
    assert not out['inputs'][out['input_segment_ids'] == 0].any()
    np.testing.assert_array_equal(out['decoder_in'][: len(targets)], np.r_[0, targets[:-1]])
    if ul2.MODES[mode] == 'S':
      np.testing.assert_array_equal(np.r_[inputs[1:], targets], tokens)
      assert 1 <= len(targets) <= round(2 * 0.25 * L)
    else:
      np.testing.assert_array_equal(span_corruption.reassemble(inputs[1:], targets, V), tokens)
      density, span = (0.15, 3.0) if ul2.MODES[mode] == 'R' else (0.5, 32.0)
      num_noise, num_spans, _ = span_corruption.lengths(L, density, span)
      assert len(targets) == num_noise + num_spans
      assert (targets[targets >= V] < V + span_corruption.EXTRA_TOKENS).all()
  np.testing.assert_allclose(counts / draws, [0.5, 0.2, 0.3], atol=0.03)


def test_ul2_bad_mixture_is_one_sentence():
  with pytest.raises(ConfigError, match=r'config.objective_args.mixture=.* weight >= 0 to each'):
    ul2.validate(args(ul2, mixture=dict(R=1.0, S=-1.0, X=0.0)))
  with pytest.raises(ConfigError, match=r'config.objective_args.x_spans=.*\(mean span length'):
    ul2.validate(args(ul2, x_spans=((3.0, 1.5),)))


# An untied head, a chunk that does not divide the vocabulary and prefix LM in the slow set.
@pytest.mark.parametrize(
  'objective,tied,chunk',
  [('causal_lm', True, 128)]
  + [
    pytest.param(*p, marks=pytest.mark.slow)
    for p in (('causal_lm', False, 100), ('prefix_lm', True, 96))
  ],
)
def test_vocab_chunked_cross_entropy_equals_whole_logits(objective, tied, chunk):
  """objective_args.vocab_chunk gives the loss, metrics and gradients of the whole logits (a
  chunk that does not divide the vocabulary included), and compiles to less temporary memory."""
  from fm.models import decoder

  cfg = decoder.Config(**{**decoder.VARIANTS['tiny'], 'vocab_size': 512, 'tie_embeddings': tied})
  model = decoder.Model(cfg)
  rng = np.random.default_rng(0)
  B, L = 4, 64
  seg = np.ones((B, L), np.int32)
  seg[1, 40:] = 2
  seg[2, 50:] = 0
  batch = {
    'tokens': rng.integers(4, 512, (B, L)).astype(np.int32),
    'segment_ids': seg,
    'positions': np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
    'token_bytes': rng.integers(1, 5, (B, L)).astype(np.int32),
  }
  params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(batch['tokens'])))
  loss_fn = registry.get('objectives', objective).loss_fn
  results, temp = [], []
  for vocab_chunk in (0, chunk):
    args = ml_collections.ConfigDict({'vocab_chunk': vocab_chunk})
    f = jax.jit(
      jax.value_and_grad(
        lambda p, a=args: loss_fn(model.apply, p, batch, jax.random.key(3), a), has_aux=True
      )
    )
    temp.append(f.lower(params).compile().memory_analysis().temp_size_in_bytes)
    results.append(f(params))
  ((whole, whole_parts), whole_grads), ((chunked, chunked_parts), chunked_grads) = results
  np.testing.assert_allclose(chunked, whole, rtol=1e-6)
  for key in whole_parts:
    np.testing.assert_allclose(chunked_parts[key], whole_parts[key], rtol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(whole_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert temp[1] < temp[0], temp


def test_bad_vocab_chunk_is_one_sentence():
  with pytest.raises(ConfigError, match='config.objective_args.vocab_chunk=-1 must be >= 0'):
    causal_lm.validate(ml_collections.ConfigDict({'vocab_chunk': -1}))


# A vocabulary of blocks in the default set; a large one and a prime one (no blocks) slow.
@pytest.mark.parametrize(
  'vocab', [50] + [pytest.param(v, marks=pytest.mark.slow) for v in (4096, 997)]
)
def test_token_accuracy_is_the_arg_max_one_ties_included(vocab):
  """Token accuracy picks the first maximum, as jnp.argmax does, through blocks (faster on
  XLA:CPU): the same on logits rounded to bfloat16 (many ties), on rows that are all tied, and for
  a prime vocabulary (no blocks); the chunked loss agrees."""
  from fm.objectives import _losses

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 16, vocab)).astype(jnp.bfloat16).astype(np.float32)
  targets = rng.integers(0, vocab, (4, 16)).astype(np.int32)
  targets[:, ::2] = np.argmax(logits, -1)[:, ::2]  # Half right.
  logits[0, 1] = 0.0  # All tied: the arg max is 0.
  targets[0, 1], targets[0, 3] = 0, 1
  logits[0, 3, [1, vocab - 1]] = logits[0, 3].max() + 1.0  # Target first among two maxima.
  logits[0, 5, [0, 2]] = logits[0, 5].max() + 1.0
  targets[0, 5] = 2  # Second among two maxima: not correct.
  weights = np.ones((4, 16), np.float32)
  weights[3] = 0.0
  np.testing.assert_array_equal(_losses.first_argmax(logits), np.argmax(logits, -1))
  _, parts = _losses.weighted_cross_entropy(logits, targets, weights)
  expected = np.sum((np.argmax(logits, -1) == targets) * weights)
  assert float(parts['correct_sum']) == expected and 24 <= expected < 48
  # The chunked loss: the same count from the final states and output projection, whose rows
  # repeat (every row a copy of one of the first half's: tied maxima), half the targets the first
  # maximum (right), a quarter the last (wrong where tied).
  x = rng.normal(size=(4, 16, 8)).astype(np.float32)
  w = rng.normal(size=(vocab, 8)).astype(np.float32)
  w = w[np.r_[np.arange(vocab // 2), rng.integers(0, vocab // 2, vocab - vocab // 2)]]
  logits = np.einsum('bld,vd->blv', x, w)
  targets[:, ::2] = np.argmax(logits, -1)[:, ::2]
  targets[:, 1::4] = (vocab - 1 - np.argmax(logits[..., ::-1], -1))[:, 1::4]
  tied = np.argmax(logits, -1) != vocab - 1 - np.argmax(logits[..., ::-1], -1)
  assert tied.any()
  _, whole = _losses.weighted_cross_entropy(logits, targets, weights)
  expected = np.sum((np.argmax(logits, -1) == targets) * weights)
  assert float(whole['correct_sum']) == expected and 24 <= expected < 40
  _, chunked = _losses.chunked_cross_entropy(x, w, 1.0, targets, weights, chunk=16)
  assert float(chunked['correct_sum']) == expected
