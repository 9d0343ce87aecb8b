"""The image path: ViT patches, the masked autoencoder's encoder, image sources and tasks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fm import ConfigError, sharding
from fm.data import images
from fm.models import vit
from fm.objectives import mae
from fm.tasks import _image

ARGS = ml_collections.ConfigDict(mae.ARGS)


@pytest.mark.parametrize(
  'shape,patch', [((2, 28, 28, 1), 4), ((3, 32, 32, 3), 8), ((1, 6, 6, 2), 3)]
)
def test_patchify_round_trip(shape, patch):
  images_ = jax.random.normal(jax.random.key(0), shape)
  patches = vit.patchify(images_, patch)
  assert patches.shape == (shape[0], (shape[1] // patch) ** 2, patch * patch * shape[3])
  # Patch 1 is the grid's second patch of the first row: columns patch..2*patch.
  np.testing.assert_array_equal(
    patches[:, 1].reshape(shape[0], patch, patch, shape[3]), images_[:, :patch, patch : 2 * patch]
  )
  np.testing.assert_array_equal(vit.unpatchify(patches, patch, shape[3]), images_)


@pytest.mark.slow  # About 25 s; the masked autoencoder's loss and gradients are test_objectives'.
def test_mae_encoder_never_sees_masked_patches():
  """The encoder's output (kept patches only) has zero gradient with respect to every pixel of
  a masked patch, and not with respect to the kept ones."""
  cfg = vit.Config(**vit.VARIANTS['tiny'])
  images_ = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  rows = [
    mae.host_transform(cfg.num_patches, ARGS)({'image': None}, np.random.default_rng(i))
    for i in range(2)
  ]
  keep = jnp.asarray(np.stack([r['keep'] for r in rows]))
  masked = np.stack([r['mask'] for r in rows])
  model = vit.Model(cfg)
  params = model.init(jax.random.key(1), images_)
  grads = jax.jit(jax.grad(lambda x: jnp.sum(model.apply(params, x, keep) ** 2)))(images_)
  per_patch = np.abs(np.asarray(vit.patchify(grads, cfg.patch_size))).sum(-1)
  assert (per_patch[masked == 1] == 0).all()
  assert (per_patch[masked == 0] > 0).all()
  assert (masked.sum(1) == cfg.num_patches - keep.shape[1]).all()


def test_mae_reconstructs_every_patch_and_restores_grid_order():
  cfg = vit.Config(**vit.VARIANTS['tiny'])
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  row = mae.host_transform(cfg.num_patches, ARGS)({}, np.random.default_rng(0))
  keep, restore = row['keep'], row['restore']
  # Kept patch j sits at place j; the masked ones take the places after them.
  np.testing.assert_array_equal(restore[keep], np.arange(len(keep)))
  masked = np.flatnonzero(row['mask'])
  assert sorted(restore[masked]) == list(range(len(keep), cfg.num_patches))
  model = vit.Model(cfg)
  # Random params without a jitted init (whose compilation is most of this test's time otherwise).
  shapes = jax.eval_shape(model.init, jax.random.key(1), x)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)
  # The same kept patches in another order, `restore` saying where each now sits: the decoder puts
  # them back in grid order, so the reconstruction is the same.
  order = rng.permutation(len(keep))
  restore_2 = restore.copy()
  restore_2[keep[order]] = np.arange(len(keep))
  apply = jax.jit(model.apply)
  out = apply(params, x, jnp.asarray([keep] * 2), jnp.asarray([restore] * 2))
  out_2 = apply(params, x, jnp.asarray([keep[order]] * 2), jnp.asarray([restore_2] * 2))
  assert out.shape == (2, cfg.num_patches, cfg.patch_dim)
  np.testing.assert_allclose(out_2, out, rtol=1e-4, atol=1e-5)
  # Without the restore, places and grid patches would not match: the outputs would differ.
  unordered = apply(params, x, jnp.asarray([keep[order]] * 2), jnp.asarray([restore] * 2))
  assert np.abs(np.asarray(unordered - out)).max() > 1e-2


def test_vit_param_count_and_bad_shapes():
  for variant in vit.VARIANTS:
    cfg = vit.Config(**vit.VARIANTS[variant])
    sample = vit.sample_inputs(cfg, 1)
    abstract = jax.eval_shape(lambda: vit.Model(cfg).init(jax.random.key(0), *sample))
    params = sharding.unbox(abstract)['params']
    assert sum(x.size for x in jax.tree.leaves(params)) == vit.param_count(cfg)['total'], variant
  with pytest.raises(
    ConfigError, match=r'config.model.image_size=30 is not a multiple of config.model.patch_size=4'
  ):
    vit.Config(image_size=30)
  cfg = vit.Config(**vit.VARIANTS['tiny'])
  with pytest.raises(
    ConfigError,
    match=r'images of shape \(28, 28, 3\) do not fit config.model \(image_size=28, channels=1\)',
  ):
    vit.Model(cfg).init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))


def test_image_sources_and_augmentation():
  splits = images.load('mnist_5k')
  assert images.classes('mnist_5k') == tuple('0123456789')
  assert {k: len(v[1]) for k, v in splits.items()} == {
    'train': 4000,
    'validation': 500,
    'test': 500,
  }
  image = splits['train'][0][0]
  assert image.dtype == np.uint8 and image.shape == (28, 28, 1) and image.max() > 0
  with pytest.raises(
    ConfigError,
    match=r"config.data.dataset='cifar' is not an image dataset fm has; choose one of: fashion_mnist, mnist_5k, emoji.",
  ):
    images.load('cifar')
  config = ml_collections.ConfigDict(dict(task_args=dict(pad=2, flip=True)))
  augment = _image.transform(None, config)
  rows = [augment({'image': image}, np.random.default_rng(i))['image'] for i in range(20)]
  assert all(r.shape == image.shape and r.dtype == np.uint8 for r in rows)
  assert len({r.tobytes() for r in rows}) > 1
  np.testing.assert_array_equal(
    augment({'image': image}, np.random.default_rng(3))['image'], rows[3]
  )


def test_bad_input_is_one_sentence(tmp_path, monkeypatch):
  """A missing package manager names the command that fetches the package; MAE on a text
  model, and a ViT without a decoder, are refused before anything trains."""
  from fm import configs, train
  from fm.data import sources

  monkeypatch.setenv('FM_DATA_DIR', str(tmp_path))
  monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
  with pytest.raises(
    ConfigError,
    match=r'apt-get is not installed here, and it fetches dataset-fashion-mnist; run '
    r'`apt-get download dataset-fashion-mnist=0.0~git20200523.55506a9-1` where it is and place '
    r'dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb in ',
  ):
    sources.fetch(images.FASHION_MNIST)
  config = configs.resolve(
    dict(
      objective='mae',
      model=dict(name='decoder'),
      data=dict(dataset='fashion_mnist'),
      train=dict(steps=1, global_batch=8),
      optim=dict(lr=1e-3),
    )
  )
  with pytest.raises(ConfigError, match=r"config.objective='mae' does not work with config.model"):
    train.validate(config, {'data': 1}, 1, corpus=False)
  cfg = vit.Config(**{**vit.VARIANTS['tiny'], 'decoder_dim': 0})
  x = jnp.zeros((1, 28, 28, 1))
  params = vit.Model(cfg).init(jax.random.key(0), x)
  with pytest.raises(ConfigError, match=r'config.model.decoder_dim=0: this ViT has no decoder'):
    vit.Model(cfg).apply(params, x, jnp.zeros((1, 12), jnp.int32), jnp.zeros((1, 49), jnp.int32))
