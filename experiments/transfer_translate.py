"""Transfer to translation: English -> Spanish Bible verses (King James -> Reina-Valera 1909)
with a decoder pretrained on English news, fine-tuned as a prefix LM.

  python -m fm.main --config experiments/transfer_translate.py --workdir /tmp/translate
  python -m fm.main --config experiments/transfer_translate.py:smoke --workdir /tmp/smoke

The backbone is trained first by experiments/lm_news.py into WORKDIR/pretrained unless that run
is there already (or --config.pretrained.workdir=DIR: transfer_sentiment's WORKDIR/pretrained is
the same run). Each verse is read bidirectionally as the prefix; its translation is predicted
after it. Rows hold 96 source and 160 target tokens: the news tokenizer splits Spanish finely
(a median verse is 70 tokens, 1% are longer than 160). After fine-tuning, the first
`task_args.eval_examples` test verses are translated with greedy and beam search (KV cache) and
scored with BLEU and chrF; WORKDIR/samples.txt shows some.
--config.pretrained.experiment=experiments/t5_news.py uses an encoder-decoder instead.
"""

import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'translate'
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
  c.data = dict(source_len=96, target_len=160, seed=0)
  c.train = dict(
    steps=600,
    global_batch=16,
    log_every=50,
    eval_every=200,
    eval_batches=16,
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
    c.data.update(source_len=32, target_len=32)
    c.train.update(steps=20, global_batch=8, log_every=5, eval_every=20, eval_batches=2)
    c.optim.warmup_steps = 5
    c.checkpoint.every_steps = 10
  elif arg:
    raise ValueError(f'Unknown variant {arg!r} of transfer_translate; choose "" or "smoke".')
  return c
