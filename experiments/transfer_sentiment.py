"""Transfer: pretrain a decoder on news (causal LM), then fine-tune it on movie-review sentiment.

  python -m fm.main --config experiments/transfer_sentiment.py --workdir /tmp/transfer
  python -m fm.main --config experiments/transfer_sentiment.py:smoke --workdir /tmp/smoke

The backbone is trained first by experiments/lm_news.py into WORKDIR/pretrained, unless that run
is there already (a second command reuses it; --config.pretrained.workdir=DIR reuses one
elsewhere). Then a classification head on the last token's state is trained with the whole
network (finetune.mode=full; also linear_probe or lora) on Rotten Tomatoes reviews, split by
movie. Reports validation and test accuracy and macro-F1. --config.finetune.init=random trains
the same architecture and tokenizer from scratch instead, for comparison.
"""

import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'sentiment'
  c.task_args = dict(train_fraction=1.0, split_seed=0)
  # The backbone: `experiment` is trained into WORKDIR/pretrained (`overrides`: 'key=value ...'
  # on its config) unless `workdir` names a run to use as it is.
  c.pretrained = dict(experiment='experiments/lm_news.py', workdir='', overrides='')
  c.finetune = dict(
    init='pretrained',
    mode='full',
    pool='',
    shots=4,
    head_lr=3e-3,
    lora_rank=8,
    lora_alpha=16.0,
    lora_targets=('query', 'key', 'value', 'out', 'gate', 'up', 'down'),
  )
  c.data = dict(seq_len=64, seed=0)
  c.train = dict(
    steps=900,
    global_batch=32,
    log_every=50,
    eval_every=300,
    eval_batches=-1,
    nonfinite='raise',
    select='',  # Early stopping: a validation metric ('accuracy', 'min:loss').
    microbatches=1,
  )
  c.optim = dict(
    lr=3e-4, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.999
  )
  c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
  c.checkpoint = dict(every_steps=100, keep=2)

  if arg == 'smoke':
    c.pretrained.experiment = 'experiments/lm_shakespeare.py:smoke'
    c.train.update(steps=20, global_batch=8, log_every=5, eval_every=20, eval_batches=2)
    c.optim.warmup_steps = 5
    c.checkpoint.every_steps = 10
  elif arg:
    raise ValueError(f'Unknown variant {arg!r} of transfer_sentiment; choose "" or "smoke".')
  return c
