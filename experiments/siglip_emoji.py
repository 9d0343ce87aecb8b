"""Image-text contrastive pretraining on emoji and their names (SigLIP), then zero-shot retrieval
and classification of held-out emoji, in one command.

  python -m fm.main --config experiments/siglip_emoji.py --workdir /tmp/siglip
  python -m fm.main --config experiments/siglip_emoji.py:softmax --workdir /tmp/clip
  python -m fm.main --config experiments/siglip_emoji.py:pretrain --workdir /tmp/siglip_pt
  python -m fm.main --config experiments/siglip_emoji.py:smoke --workdir /tmp/smoke

A two-tower model (fm/models/two_tower.py, variant mini: a ViT on 64x64 images in 8x8 patches,
fm's encoder on the caption's UTF-8 bytes) learns from 1,606 emoji with their Unicode names
(npm emoji-datasource-google 16.0.0) with the sigmoid loss (variant softmax: CLIP's loss), into
WORKDIR/pretrained unless that run is there already. Then, with no training
(finetune.mode=zero_shot), the 200 held-out test emoji are scored: recall@1 and @5 of each
image's name among the 200 names and of each name's image among the 200 images (chance: k /
200), and the emoji's category (9, e.g. 'food & drink') chosen as the prompt 'an emoji of
{category}' whose embedding is nearest (accuracy, macro-F1).
"""

import ml_collections


def pretraining(loss: str, smoke: bool) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'contrastive'
  c.objective_args = dict(loss=loss)
  c.model = dict(name='two_tower', variant='mini', dtype='float32')
  # Each training image is shifted by up to 4 pixels (a random crop of it padded by 4).
  c.data = dict(dataset='emoji', seed=0, workers=0, pad=4, flip=False)
  c.train = dict(
    steps=400,
    global_batch=128,
    log_every=50,
    eval_every=100,
    eval_batches=-1,
    final_eval_batches=-1,
    nonfinite='raise',
    microbatches=1,
  )
  c.optim = dict(
    lr=2e-3, warmup_steps=50, min_lr_ratio=0.05, weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95
  )
  c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
  c.checkpoint = dict(every_steps=100, keep=2)
  if smoke:
    c.model.update(
      variant='tiny', image_size=64, max_len=80, num_layers=1, text_layers=1, embed_dim=16
    )
    c.train.update(
      steps=4, global_batch=16, log_every=2, eval_every=4, eval_batches=1, final_eval_batches=1
    )
    c.optim.warmup_steps = 1
    c.checkpoint.every_steps = 2
  return c


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  pretrain = {
    'pretrain': ('sigmoid', False),
    'pretrain_softmax': ('softmax', False),
    'pretrain_smoke': ('sigmoid', True),
  }
  if arg in pretrain:
    return pretraining(*pretrain[arg])
  variants = {'': 'pretrain', 'softmax': 'pretrain_softmax', 'smoke': 'pretrain_smoke'}
  if arg not in variants:
    raise ValueError(
      f'Unknown variant {arg!r} of siglip_emoji; choose "", "softmax", "smoke", "pretrain", '
      f'"pretrain_softmax" or "pretrain_smoke".'
    )
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'image_classification'
  c.task_args = dict(
    dataset='emoji', train_fraction=1.0, split_seed=0, pad=0, flip=False, prompt='an emoji of {}'
  )
  c.pretrained = dict(
    experiment=f'experiments/siglip_emoji.py:{variants[arg]}', workdir='', overrides=''
  )
  c.finetune = dict(init='pretrained', mode='zero_shot', pool='', head_lr=0.0)
  c.data = dict(seed=0)
  c.train = dict(
    steps=0, global_batch=200, log_every=1, eval_every=1, eval_batches=-1, nonfinite='raise'
  )
  c.optim = dict(lr=0.0, warmup_steps=0)  # Nothing trains.
  c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
  c.checkpoint = dict(every_steps=1, keep=1)
  if arg == 'smoke':
    c.train.global_batch = 16
  return c
