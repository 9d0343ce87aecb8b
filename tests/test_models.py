"""Model shapes, finiteness, causality and packing isolation (checked through gradients)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from workdirs import smoke_config

from fm import ConfigError, models, registry, train
from fm.models import decoder, encdec, encoder
from fm.objectives import causal_lm

FITS_ON_CPU = ('tiny', 'mini', 'small')


def make(variant='tiny', length=32, **overrides):
  cfg = decoder.Config(**{**decoder.VARIANTS[variant], 'vocab_size': 384, **overrides})
  model = decoder.Model(cfg)
  # Distinct token ids, so each embedding row belongs to exactly one position.
  tokens = jax.random.permutation(jax.random.key(1), cfg.vocab_size)[:length][None]
  params = nn.unbox(model.init(jax.random.key(0), tokens))
  return cfg, model, params, tokens


@pytest.mark.parametrize('name', registry.choices('models'))
def test_every_family_honours_its_contract(name):
  """Each discovered family defines what fm/models/__init__.py requires: its VARIANTS build its
  Config, its sample inputs (a text, or images) are what its Model accepts, with and without a
  classifier head, and param_count agrees with the pretraining model's init (num_classes=0; a
  fine-tuning run counts its params from their shapes, fm/finetune.py)."""
  family = registry.get('models', name)
  assert all(hasattr(family, m) for m in registry.members(models.ModelFamily)), name
  assert family.SEQ2SEQ in ('', 'prefix_lm', 'encdec') and family.POOL in ('last', 'mean', 'first')
  for num_classes in (0, 3):
    model_cfg = family.Config(**{**family.VARIANTS['tiny'], 'num_classes': num_classes})
    shapes = jax.eval_shape(
      family.Model(model_cfg).init,
      jax.random.key(0),
      *models.sample_inputs(family, model_cfg, 2, 16),
    )
    n = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
    if not num_classes:
      assert n == family.param_count(model_cfg)['total'], name
  assert family.flops_per_token(model_cfg, 16) > 0


def test_flops_agree_with_xla():
  """encdec.flops_per_row is within 5% of XLA's count of the gradient of the tiny model's
  outputs at three (encoder input, decoder target) lengths, and with no target (a classifier:
  the encoder alone); so is the decoder's flops_per_token, as a language model and as a
  classifier (no output projection). What 64 more encoder tokens and 64 more decoder tokens
  add agrees within 7% with what they add to XLA's count (about 4% of the
  encoder tokens' is the norms' and softmaxes' elementwise work, which XLA also counts):
  cross-attention's keys and values counted per decoder token instead of per encoder token
  would be 10% off."""
  model_cfg = encdec.Config(**encdec.VARIANTS['tiny'])
  model = encdec.Model(model_cfg)
  rows = {}
  for lengths in ((32, 16), (96, 16), (32, 80)):
    inputs = [jnp.ones((1, n), jnp.int32) for n in lengths * 2]
    rows[lengths] = xla_grad_flops(model, inputs), encdec.flops_per_row(model_cfg, *lengths)
    assert abs(rows[lengths][0] / rows[lengths][1] - 1) < 0.05, lengths
  for longer in ((96, 16), (32, 80)):
    (xla_long, ours_long), (xla_base, ours_base) = rows[longer], rows[(32, 16)]
    assert abs((xla_long - xla_base) / (ours_long - ours_base) - 1) < 0.07, longer
  classifier_cfg = dataclasses.replace(model_cfg, num_classes=3)  # The encoder alone.
  inputs = encdec.inputs(classifier_cfg, jnp.ones((1, 64), jnp.int32))
  count = encdec.flops_per_row(classifier_cfg, 64, 0)
  assert abs(xla_grad_flops(encdec.Model(classifier_cfg), inputs) / count - 1) < 0.05
  model_cfg = decoder.Config(**decoder.VARIANTS['tiny'])
  inputs = decoder.inputs(model_cfg, jnp.ones((1, 64), jnp.int32))
  for num_classes in (0, 3):  # A classifier has no output projection (the pooled head reads it).
    model_cfg = dataclasses.replace(model_cfg, num_classes=num_classes)
    count = decoder.flops_per_token(model_cfg, 64) * 64
    assert abs(xla_grad_flops(decoder.Model(model_cfg), inputs) / count - 1) < 0.05, num_classes


def xla_grad_flops(model, inputs) -> float:
  """XLA's FLOPs of the gradient of the mean output (forward and backward passes), counted on
  the lowered program (within 0.3% of the compiled one's count here, at a 25th of the time)."""
  params = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  grad = jax.grad(lambda p: model.apply(p, *inputs).mean())
  cost = jax.jit(grad).lower(params).cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


# `mini` and `small` in the slow set: `tiny` runs by default, and every family's param_count is
# checked against its init in test_every_family_honours_its_contract.
@pytest.mark.parametrize(
  'variant', [v if v == 'tiny' else pytest.param(v, marks=pytest.mark.slow) for v in FITS_ON_CPU]
)
def test_forward_shapes_and_finite(variant):
  cfg, model, params, tokens = make(variant)
  logits = model.apply(params, tokens)
  assert logits.shape == (*tokens.shape, cfg.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()
  assert sum(x.size for x in jax.tree.leaves(params)) == decoder.param_count(cfg)['total']


@pytest.mark.parametrize('variant,expected', [('llama-1b', 1.236e9), ('llama-8b', 8.03e9)])
def test_published_shapes(variant, expected):
  """The planning variants have the published parameter counts (shapes only, nothing allocated)."""
  cfg = decoder.Config(**decoder.VARIANTS[variant])
  shapes = jax.eval_shape(
    decoder.Model(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16), jnp.int32)
  )
  n = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
  assert n == decoder.param_count(cfg)['total']
  assert abs(n - expected) / expected < 0.01


def influence(model, params, tokens, t, **kwargs):
  """|d output_t / d input_s| for every position s, via the (untied) input embedding rows."""

  def out_t(p):
    return jnp.sum(model.apply(p, tokens, **kwargs)[0, t] ** 2)

  grad_VD = jax.grad(out_t)(params)['params']['embed']['embedding']
  return np.abs(np.asarray(grad_VD[tokens[0]])).sum(-1)


# The scanned stack in the slow set (24 s on a 2-core AVX2 machine); scanning's equivalence is
# test_remat_and_scan_leave_loss_and_gradients_unchanged's, by default.
@pytest.mark.parametrize('scan', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_causal(scan):
  _, model, params, tokens = make(tie_embeddings=False, scan_layers=scan)
  for t in (0, 7, 31):
    g = influence(model, params, tokens, t)
    assert np.all(g[t + 1 :] == 0), f'position {t} sees the future'
    assert np.all(g[: t + 1] > 0), f'position {t} ignores its past'


def test_packed_documents_do_not_attend_to_each_other():
  _, model, params, tokens = make(tie_embeddings=False)
  seg = jnp.array([[1] * 12 + [2] * 20])
  pos = jnp.array([list(range(12)) + list(range(20))])
  g = influence(model, params, tokens, 20, segment_ids_BL=seg, positions_BL=pos)
  assert np.all(g[:12] == 0) and np.all(g[12:21] > 0)
  # The second document's outputs equal those of running it alone.
  packed = model.apply(params, tokens, seg, pos)[0, 12:]
  alone = model.apply(params, tokens[:, 12:])[0]
  np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_matches_repeated_kv_heads():
  """GQA with G kv heads equals MHA whose kv weights repeat each group's head."""
  cfg, model, params, tokens = make(num_heads=4, num_kv_heads=2)
  mha = decoder.Model(decoder.Config(**{**cfg.__dict__, 'num_kv_heads': 4}))

  def repeat_kv(path, x):
    name = jax.tree_util.keystr(path)
    return jnp.repeat(x, 2, axis=1) if name.endswith("['key']") or name.endswith("['value']") else x

  mha_params = jax.tree_util.tree_map_with_path(repeat_kv, params)
  np.testing.assert_allclose(
    model.apply(params, tokens), mha.apply(mha_params, tokens), rtol=1e-5, atol=1e-5
  )


def test_prefix_lm_is_bidirectional_before_the_split_and_causal_after():
  _, model, params, tokens = make(tie_embeddings=False)
  prefix = jnp.arange(32)[None] < 10
  g = influence(model, params, tokens, 3, prefix_BL=prefix)
  assert np.all(g[:10] > 0) and np.all(g[10:] == 0)  # A prefix token sees the whole prefix.
  g = influence(model, params, tokens, 15, prefix_BL=prefix)
  assert np.all(g[:16] > 0) and np.all(g[16:] == 0)  # After the split: causal.


def test_encoder_is_bidirectional_within_a_document():
  cfg = decoder.Config(**{**encoder.VARIANTS['tiny'], 'vocab_size': 384, 'tie_embeddings': False})
  model = encoder.Model(cfg)
  tokens = jax.random.permutation(jax.random.key(1), 384)[:32][None]
  params = nn.unbox(model.init(jax.random.key(0), tokens))
  assert np.all(influence(model, params, tokens, 3) > 0)
  seg = jnp.array([[1] * 12 + [2] * 20])
  g = influence(model, params, tokens, 3, segment_ids_BL=seg)
  assert np.all(g[:12] > 0) and np.all(g[12:] == 0)


# `minimal` in the slow set: `full` and `dots_saveable` run by default.
@pytest.mark.parametrize(
  'remat', ['full', 'dots_saveable', pytest.param('minimal', marks=pytest.mark.slow)]
)
def test_remat_and_scan_leave_loss_and_gradients_unchanged(remat):
  """Rematerialisation and nn.scan over layers change memory, never the numbers."""
  cfg, model, params, tokens = make()

  def loss_and_grads(m, p):
    return jax.value_and_grad(lambda q: jnp.mean(m.apply(q, tokens) ** 2))(p)

  ref_loss, ref_grads = loss_and_grads(model, params)
  loss, grads = loss_and_grads(
    decoder.Model(decoder.Config(**{**cfg.__dict__, 'remat': remat})), params
  )
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads
  )

  # Scanned params are the per-layer params stacked on a leading `layers` axis.
  layer_names = [f'layer_{i}' for i in range(cfg.num_layers)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params['params'][n] for n in layer_names])
  scan_params = {
    'params': {
      **{k: v for k, v in params['params'].items() if k not in layer_names},
      'layers': stacked,
    }
  }
  scanned = decoder.Model(decoder.Config(**{**cfg.__dict__, 'remat': remat, 'scan_layers': True}))
  loss, grads = loss_and_grads(scanned, scan_params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for i, name in enumerate(layer_names):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7),
      grads['params']['layers'],
      ref_grads['params'][name],
    )


def test_encoder_decoder_sees_all_inputs_and_only_past_targets():
  cfg = decoder.Config(**{**encdec.VARIANTS['tiny'], 'vocab_size': 384})
  model = encdec.Model(cfg)
  ids = jax.random.permutation(jax.random.key(1), 384)
  inputs, decoder_in = ids[:20][None], ids[20:32][None]
  params = nn.unbox(model.init(jax.random.key(0), inputs, decoder_in))
  assert sum(x.size for x in jax.tree.leaves(params)) == encdec.param_count(cfg)['total']
  out = model.apply(params, inputs, decoder_in)[0]

  # Changing a future decoder token leaves earlier outputs bitwise unchanged.
  changed = model.apply(params, inputs, decoder_in.at[0, 8].set(ids[40]))[0]
  np.testing.assert_array_equal(changed[:8], out[:8])
  assert np.abs(changed[8:] - out[8:]).max(-1).min() > 0
  # Changing any encoder input changes every output (cross-attention reads all of them).
  for s in (0, 10, 19):
    changed = model.apply(params, inputs.at[0, s].set(ids[40]), decoder_in)[0]
    assert np.abs(changed - out).max(-1).min() > 0


@pytest.mark.slow  # Compiles two steps and their memory analyses (about 25 s); CI runs it.
def test_gradient_accumulation_matches_the_whole_batch_and_saves_memory():
  """microbatches=4 gives the whole batch's loss and update (float32, rtol 1e-5) with less
  temporary memory in the compiled step."""
  cfg = decoder.Config(**{**decoder.VARIANTS['tiny'], 'vocab_size': 512})
  model = decoder.Model(cfg)
  rng = np.random.default_rng(0)
  B, L = 16, 128
  seg = np.ones((B, L), np.int32)
  seg[::3, 100:] = 0  # Rows with fewer targets: slices weigh by their target counts.
  batch = {
    'tokens': rng.integers(4, 512, (B, L)).astype(np.int32),
    'segment_ids': seg,
    'positions': np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
  }
  params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(batch['tokens'])))
  tx = optax.sgd(0.5)
  state = {
    'step': jnp.zeros((), jnp.int32),
    'params': params,
    'opt_state': tx.init(params),
    'nonfinite': jnp.zeros((), jnp.int32),
    'first_nonfinite': jnp.full((), -1, jnp.int32),
  }
  results, temp = [], []
  for k in (1, 4):
    config = smoke_config(train=dict(microbatches=k))
    loss_fn = functools.partial(causal_lm.loss_fn, args=None)
    step = jax.jit(train.make_train_step(model.apply, loss_fn, tx, config))
    temp.append(
      step.lower(state, batch, jax.random.key(1)).compile().memory_analysis().temp_size_in_bytes
    )
    results.append(step(state, batch, jax.random.key(1)))
  (whole, whole_metrics), (accumulated, accumulated_metrics) = results
  np.testing.assert_allclose(accumulated_metrics['loss'], whole_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(accumulated_metrics['count'], whole_metrics['count'])
  for a, b in zip(jax.tree.leaves(accumulated['params']), jax.tree.leaves(whole['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert temp[1] < temp[0], temp


@pytest.mark.parametrize(
  'fields',
  [
    dict(norm='layer', mlp='gelu_tanh', positions='learned', bias=True),  # GPT-2
    dict(qkv_bias=True, tie_embeddings=False),  # Qwen2
    dict(mlp='gelu', rope_scaling=(8.0, 1.0, 4.0, 64.0), scale_tied_logits=False),
    dict(norm_position='post', embed_norm=True, token_types=2, mlm_head=True),  # BERT's parts
  ],
)
def test_architecture_fields(fields):
  """The decoder's published-architecture fields: param_count agrees with the init, the model
  runs finite; the encoder-decoder refuses them; an unknown choice names the key."""
  cfg = decoder.Config(**{**decoder.VARIANTS['tiny'], **fields})
  tokens = jnp.ones((2, 16), jnp.int32)
  params = decoder.Model(cfg).init(jax.random.key(0), tokens)
  assert sum(x.size for x in jax.tree.leaves(params)) == decoder.param_count(cfg)['total']
  assert np.isfinite(np.asarray(decoder.Model(cfg).apply(params, tokens))).all()
  name = next(k for k in fields if k in encdec.DECODER_ONLY)
  with pytest.raises(ConfigError, match=rf'config.model.{name}=.* is a decoder option'):
    encdec.Model(cfg).init(jax.random.key(0), tokens, tokens)
  with pytest.raises(
    ConfigError, match=r"config.model.norm='batch' is unknown; choose one of: rms"
  ):
    decoder.Config(norm='batch')


def test_t5_fields_of_the_encoder_decoder():
  """Relative attention bias, GEGLU, unscaled logits and an untied head: param_count agrees
  with the init, the model runs finite; a decoder refuses relative positions and the
  encoder-decoder names the choices it computes."""
  fields = dict(positions='relative', mlp='geglu', attention_scale=1.0, tie_embeddings=False)
  cfg = decoder.Config(**{**decoder.VARIANTS['tiny'], **fields, 'relative_buckets': 8})
  tokens = jnp.ones((2, 16), jnp.int32)
  params = encdec.Model(cfg).init(jax.random.key(0), tokens, tokens)
  assert set(params['params']) >= {'encoder_relative', 'decoder_relative', 'lm_head'}
  assert sum(x.size for x in jax.tree.leaves(params)) == encdec.param_count(cfg)['total']
  assert np.isfinite(np.asarray(encdec.Model(cfg).apply(params, tokens, tokens))).all()
  with pytest.raises(ConfigError, match=r"config.model.positions='relative' \(T5's relative"):
    decoder.Model(cfg).init(jax.random.key(0), tokens)
  with pytest.raises(
    ConfigError,
    match=r"config.model.mlp='gelu' is not computed by the encoder-decoder; choose one of: "
    r'swiglu, geglu.',
  ):
    encdec.Model(dataclasses.replace(cfg, mlp='gelu')).init(jax.random.key(0), tokens, tokens)


@pytest.mark.parametrize(
  'spec,x_shape,w_shape,n_in',
  [
    ('BLD,DF->BLF', (2, 5, 8), (8, 12), 1),
    ('BLD,DHK->BLHK', (2, 5, 8), (8, 3, 4), 1),
    ('BLHK,HKD->BLD', (2, 5, 3, 4), (3, 4, 8), 2),
  ],
)
def test_project_equals_the_einsum_forward_and_backward(spec, x_shape, w_shape, n_in):
  """layers.project (one 2-D matmul over flattened leading dims, faster on XLA:CPU) gives the
  einsum's values and gradients."""
  from fm.models import layers

  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  cotangent = jax.random.normal(kc, jnp.einsum(spec, x, w).shape)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * cotangent)
  ours = jax.jit(jax.value_and_grad(loss(lambda x, w: layers.project(x, w, n_in)), (0, 1)))(x, w)
  ref = jax.jit(jax.value_and_grad(loss(lambda x, w: jnp.einsum(spec, x, w)), (0, 1)))(x, w)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
