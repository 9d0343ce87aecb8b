"""Image-text contrastive pretraining: the losses on a sharded batch, the two-tower model, the
zero-shot mode and their bad input."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fm import ConfigError, registry, sharding
from fm.data import images
from fm.models import two_tower
from fm.objectives import contrastive


def _embeddings(B: int, E: int, seed: int = 0):
  a, b = jax.random.split(jax.random.key(seed))
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  image = unit(jax.random.normal(a, (B, E)))
  # Captions near their images, so the positives matter to the loss.
  return image, unit(image + 0.7 * jax.random.normal(b, (B, E)))


def _mesh(devices: int) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(
    np.array(jax.devices()[:devices]).reshape(devices, 1, 1, 1), sharding.AXES
  )


def _ours(loss):
  def fn(image, text, scale, bias, weight):
    sums = contrastive.pairwise(image, text, scale, bias, weight, loss)
    return sums['loss_sum'] / sums['count']

  return fn


@pytest.mark.parametrize('loss', contrastive.LOSSES)
@pytest.mark.parametrize('devices', [1, 8])
def test_losses_equal_the_plain_reference_on_a_sharded_batch(loss, devices):
  """Loss and gradients (embeddings, scale, bias) of the ring over `devices` equal the plain
  B x B computation on one device; padding rows (weight 0) take part in nothing."""
  image, text = _embeddings(32, 16)
  weight = jnp.ones(32).at[jnp.array([3, 17, 30])].set(0.0)
  args = (image, text, jnp.float32(7.0), jnp.float32(-4.0), weight)
  grads = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2, 3))
  want, want_grads = jax.jit(grads(lambda *a: contrastive.reference(*a, loss)))(*args)
  mesh = _mesh(devices)
  with sharding.use(mesh, sharding.DEFAULT_RULES):
    rows = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, 2)
    sharded = (jax.device_put(image, rows), jax.device_put(text, rows), *args[2:])
    assert contrastive.batch_axes() == (('data',) if devices > 1 else ())
    got, got_grads = jax.jit(grads(_ours(loss)))(*sharded)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  # The padding rows' embeddings get no gradient.
  assert float(jnp.abs(got_grads[0][jnp.array([3, 17, 30])]).max()) == 0.0


def test_per_device_memory_is_below_a_slab_of_the_global_matrix():
  """On 8 devices with 512 rows each, the sharded loss and its gradient need less scratch per
  device than one device's 512 x 4096 rows of the global logits (what an all-gather of the
  texts holds), and the plain computation needs more."""
  b, E, n = 512, 64, 8
  mesh, rules = _mesh(n), sharding.DEFAULT_RULES
  slab = b * b * n * 4  # Bytes of float32 logits of this device's images against all texts.
  with sharding.use(mesh, rules):
    rows = sharding.batch_sharding(mesh, rules, 2)
    x = jax.ShapeDtypeStruct((b * n, E), jnp.float32, sharding=rows)
    w = jax.ShapeDtypeStruct((b * n,), jnp.float32, sharding=sharding.batch_sharding(mesh, rules))
    scratch = {}
    plain = lambda *a: contrastive.reference(*a, 'sigmoid')
    for name, fn in (('ring', _ours('sigmoid')), ('plain', plain)):
      f = lambda i, t, w, fn=fn: fn(i, t, 10.0, -10.0, w)
      grad = jax.jit(jax.grad(f, argnums=(0, 1)))
      scratch[name] = grad.lower(x, x, w).compile().memory_analysis().temp_size_in_bytes
  assert scratch['ring'] < slab / 2 < scratch['plain'], (scratch, slab)


def test_retrieval_recall():
  image = jnp.eye(4)
  text = jnp.eye(4)[jnp.array([0, 1, 3, 2])]  # Pairs 2 and 3 swapped.
  r = contrastive.retrieval(image, text, ks=(1, 2))
  assert r['image_to_text_recall@1'] == r['text_to_image_recall@1'] == 0.5
  assert r['image_to_text_recall@2'] == 1.0 and r['chance@1'] == 0.25 and r['chance@2'] == 0.5


def test_two_tower_shapes_param_count_and_classifier():
  for variant in two_tower.VARIANTS:
    cfg = two_tower.Config(**two_tower.VARIANTS[variant])
    sample = two_tower.sample_inputs(cfg, 2)
    abstract = jax.eval_shape(lambda: two_tower.Model(cfg).init(jax.random.key(0), *sample))
    params = sharding.unbox(abstract)['params']
    assert sum(x.size for x in jax.tree.leaves(params)) == two_tower.param_count(cfg)['total']
  cfg = two_tower.Config(**two_tower.VARIANTS['tiny'])
  model = two_tower.Model(cfg)
  images_, tokens = two_tower.sample_inputs(cfg, 2)
  tokens = tokens.at[:, :5].set(70)
  params = jax.jit(model.init)(jax.random.key(0), images_, tokens)
  image_BE, text_BE, scale, bias = jax.jit(model.apply)(params, images_, tokens)
  assert image_BE.shape == text_BE.shape == (2, cfg.embed_dim)
  np.testing.assert_allclose(jnp.linalg.norm(text_BE, axis=-1), 1.0, rtol=1e-5)
  assert float(scale) == pytest.approx(10.0) and float(bias) == -10.0
  # The padding after a caption changes nothing (texts pool their real tokens): the same
  # caption in a row of 8 tokens embeds as in a row of max_len.
  shorter = jax.jit(lambda p, t: model.apply(p, t, method='encode_text'))(params, tokens[:, :8])
  np.testing.assert_allclose(shorter, text_BE, atol=1e-5)
  # The classifier: the image tower and a head; the pretrained projections keep their names.
  classifier = two_tower.Config(**{**two_tower.VARIANTS['tiny'], 'num_classes': 9})
  shapes = jax.eval_shape(two_tower.Model(classifier).init, jax.random.key(0), images_)
  cp = sharding.unbox(shapes)['params']
  assert set(cp) == {'image', 'head'} and 'head' not in cp['image']
  backbone = sum(x.size for x in jax.tree.leaves(cp['image']))
  assert backbone == two_tower.param_count(classifier)['total']
  assert 'head' in params['params']['image'] and 'head' in params['params']['text']


def test_caption_tokens_and_bad_input(tmp_path, monkeypatch):
  """Captions as bytes; a caption too long, an uncaptioned dataset for an image-text objective,
  microbatches with a contrastive loss, a contrastive loss on a ViT and zero-shot on a ViT are
  each refused in one sentence."""
  from fm import configs, registry, train
  from fm.tasks import _image

  tokens = images.caption_tokens(['cat', 'dog face'], 10, 'config.model.max_len')
  assert tokens.shape == (2, 10) and tokens[0, 3] == 0 and tokens[1, 7] > 0
  assert images.CAPTION_TOKENIZER.decode(tokens[1]) == 'dog face'
  with pytest.raises(
    ConfigError,
    match=r"config.model.max_len=4 is shorter than the caption 'dog face' \(8 bytes\); raise it to 8",
  ):
    images.caption_tokens(['cat', 'dog face'], 4, 'config.model.max_len')
  base = dict(
    objective='contrastive',
    model=dict(name='two_tower', variant='tiny'),
    data=dict(dataset='fashion_mnist'),
    train=dict(steps=1, global_batch=8),
    optim=dict(lr=1e-3),
  )
  with pytest.raises(
    ConfigError,
    match=r"config.data.dataset='fashion_mnist' has no captions to pair its images with; choose "
    r'one of: emoji.',
  ):
    train.validate(configs.resolve(base), {'data': 1}, 1)
  with pytest.raises(
    ConfigError, match=r'config.train.microbatches=2: the contrastive loss couples'
  ):
    bad = {
      **base,
      'data': dict(dataset='emoji'),
      'train': dict(steps=1, global_batch=8, microbatches=2),
    }
    train.validate(configs.resolve(bad), {'data': 1}, 1, corpus=False)
  with pytest.raises(
    ConfigError, match=r"config.objective='contrastive' does not work with config.model.name='vit'"
  ):
    train.validate(
      configs.resolve({**base, 'model': dict(name='vit')}), {'data': 1}, 1, corpus=False
    )
  with pytest.raises(ConfigError, match=r"config.objective_args.loss='cosine' is unknown"):
    contrastive.validate(ml_collections.ConfigDict(dict(loss='cosine')))
  task = registry.get('tasks', 'image_classification')
  config = ml_collections.ConfigDict(dict(finetune=dict(mode='zero_shot')))
  with pytest.raises(
    ConfigError,
    match=r"config.finetune.mode='zero_shot' embeds the class names as text, which a 'vit'",
  ):
    _image.check_backbone(task, config, 'vit', registry.get('models', 'vit'))
  _image.check_backbone(task, config, 'two_tower', registry.get('models', 'two_tower'))


def test_an_image_text_run_records_its_caption_tokenizer(tmp_path):
  """An image-text run's config has no data.tokenizer (images need none); its record still
  writes the captions' byte tokenizer's files beside config.json."""
  from fm import configs, train
  from fm.data import tokenizer

  config = configs.resolve(
    dict(
      objective='contrastive',
      model=dict(name='two_tower', variant='tiny'),
      data=dict(dataset='emoji'),
      train=dict(steps=1, global_batch=8),
      optim=dict(lr=1e-3),
    )
  )
  assert 'tokenizer' not in config.data
  family, model_cfg, tok = train.image_model_config(
    config, registry.get('objectives', 'contrastive')
  )
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  train.record(tmp_path, config, family, model_cfg, tok, {}, mesh)
  assert tokenizer.load_hf(str(tmp_path / 'tokenizer')).encode('cat 🐱') == tok.encode('cat 🐱')
