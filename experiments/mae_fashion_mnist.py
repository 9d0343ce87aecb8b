"""A ViT pretrained as a masked autoencoder on Fashion-MNIST (He et al. 2022), then probed or
fine-tuned on its labels, in one command.

  python -m fm.main --config experiments/mae_fashion_mnist.py --workdir /tmp/mae_probe
  python -m fm.main --config experiments/mae_fashion_mnist.py:finetune --workdir /tmp/mae_ft \
      --config.pretrained.workdir=/tmp/mae_probe/pretrained
  python -m fm.main --config experiments/mae_fashion_mnist.py:pretrain --workdir /tmp/mae
  python -m fm.main --config experiments/mae_fashion_mnist.py:smoke --workdir /tmp/smoke

The backbone (variant pretrain) is trained first into WORKDIR/pretrained unless that run is
there already: 75% of each image's 4x4 patches are hidden, the encoder (ViT mini, fixed 2-D
sine-cosine positions) reads the rest and a 2-block decoder predicts the hidden patches'
normalised pixels (loss on the validation split, the same masks at every evaluation). Then a
linear classifier on the mean of the frozen patch states (default: the linear probe) or the
whole network (finetune) learns the 10 classes; `--config.finetune.init=random` gives the same
architecture without pretraining, the baseline either is compared with.
"""

import ml_collections

PRETRAIN = 'experiments/mae_fashion_mnist.py:pretrain'


def pretraining(smoke: bool) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'mae'
  c.objective_args = dict(mask_ratio=0.75, norm_pix_loss=True)
  c.model = dict(
    name='vit',
    variant='mini',
    patch_size=4,
    positions='sincos2d',
    decoder_layers=2,
    decoder_dim=128,
    decoder_heads=4,
    dtype='float32',
  )
  c.data = dict(dataset='fashion_mnist', seed=0, workers=0)
  c.train = dict(
    steps=2000,
    global_batch=128,
    log_every=100,
    eval_every=500,
    eval_batches=8,
    final_eval_batches=-1,
    nonfinite='raise',
    microbatches=1,
  )
  c.optim = dict(
    lr=1.5e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.05, clip_norm=1.0, b1=0.9, b2=0.95
  )
  c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
  c.checkpoint = dict(every_steps=500, keep=2)
  if smoke:
    c.model.update(variant='tiny', decoder_layers=1, decoder_dim=32, decoder_heads=2)
    c.train.update(
      steps=4, global_batch=16, log_every=2, eval_every=4, eval_batches=1, final_eval_batches=1
    )
    c.optim.warmup_steps = 1
    c.checkpoint.every_steps = 2
  return c


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  if arg in ('pretrain', 'pretrain_smoke'):
    return pretraining(arg == 'pretrain_smoke')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'image_classification'
  c.task_args = dict(dataset='fashion_mnist', train_fraction=1.0, split_seed=0, pad=2, flip=True)
  c.pretrained = dict(experiment=PRETRAIN, workdir='', overrides='')
  # The probe reads the mean of the patches' final states (the CLS token is not what the
  # reconstruction trains).
  c.finetune = dict(init='pretrained', mode='linear_probe', pool='mean', head_lr=0.0)
  c.data = dict(seed=0)
  c.train = dict(
    steps=1000,
    global_batch=128,
    log_every=100,
    eval_every=500,
    eval_batches=-1,
    nonfinite='raise',
    select='',  # Early stopping: a validation metric ('accuracy', 'min:loss').
    microbatches=1,
  )
  c.optim = dict(
    lr=1e-2, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0, b1=0.9, b2=0.999
  )
  c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
  c.checkpoint = dict(every_steps=500, keep=2)
  if arg == 'finetune':
    c.finetune.update(mode='full', pool='')
    c.optim.update(lr=1e-3, weight_decay=0.05)
  elif arg == 'smoke':
    c.pretrained.experiment = 'experiments/mae_fashion_mnist.py:pretrain_smoke'
    c.train.update(steps=20, global_batch=16, log_every=5, eval_every=20, eval_batches=2)
    c.optim.warmup_steps = 5
    c.checkpoint.every_steps = 10
  elif arg:
    raise ValueError(
      f'Unknown variant {arg!r} of mae_fashion_mnist; choose "", "finetune", "pretrain", '
      f'"pretrain_smoke" or "smoke".'
    )
  return c
