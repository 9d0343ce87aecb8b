"""Transfer to generation: a decoder pretrained on news (causal LM), fine-tuned as a prefix LM to
write an article's headline.

  python -m fm.main --config experiments/transfer_headline.py --workdir /tmp/headline
  python -m fm.main --config experiments/transfer_headline.py:smoke --workdir /tmp/smoke

The backbone is trained first by experiments/lm_news.py into WORKDIR/pretrained unless that run
is there already (or --config.pretrained.workdir=DIR: transfer_sentiment's WORKDIR/pretrained is
the same run). The article's first 128 tokens are read bidirectionally as the prefix and the
title is predicted after it. Test articles are those held out from pretraining. After
fine-tuning, titles are generated for the first `task_args.eval_examples` test articles with
greedy and beam search (KV cache) and scored with ROUGE-1/2/L; WORKDIR/samples.txt shows some.
--config.pretrained.experiment=experiments/t5_news.py uses a T5-style encoder-decoder instead.
"""

import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'headline'
  c.task_args = dict(train_fraction=1.0, split_seed=0, eval_examples=192)
  # The backbone: `experiment` is trained into WORKDIR/pretrained (`overrides`: 'key=value ...'
  # on its config) unless `workdir` names a run to use as it is.
  c.pretrained = dict(experiment='experiments/lm_news.py', workdir='', overrides='')
  c.finetune = dict(
    init='pretrained',
    mode='full',
    beams=4,
    no_repeat_ngram=0,
    lora_rank=8,
    lora_alpha=16.0,
    lora_targets=('query', 'key', 'value', 'out', 'gate', 'up', 'down'),
  )
  c.data = dict(source_len=128, target_len=32, seed=0)
  c.train = dict(
    steps=600,
    global_batch=16,
    log_every=50,
    eval_every=200,
    eval_batches=-1,
    nonfinite='raise',
    select='',  # Early stopping: a validation metric ('accuracy', 'min:loss').
    microbatches=1,
  )
  c.optim = dict(
    lr=1e-3, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.999
  )
  c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
  c.checkpoint = dict(every_steps=200, keep=2)

  if arg == 'smoke':
    c.pretrained.experiment = 'experiments/lm_shakespeare.py:smoke'
    c.task_args.eval_examples = 16
    c.data.update(source_len=48, target_len=16)
    c.train.update(steps=20, global_batch=8, log_every=5, eval_every=20, eval_batches=2)
    c.optim.warmup_steps = 5
    c.checkpoint.every_steps = 10
  elif arg:
    raise ValueError(f'Unknown variant {arg!r} of transfer_headline; choose "" or "smoke".')
  return c
