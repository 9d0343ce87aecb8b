"""BERT-style masked-LM pretraining of a bidirectional encoder on the Shakespeare corpus.

  python -m fm.main --config experiments/mlm_shakespeare.py --workdir /tmp/mlm_shakespeare
  python -m fm.main --config experiments/mlm_shakespeare.py:smoke --workdir /tmp/smoke

Held-out plays (both editions of each) measure masked-token loss and accuracy (15% of tokens
chosen; 80% masked, 10% random, 10% kept).
"""

import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'masked_lm'
  # Keys listed here can be overridden from the command line (--config.model.dtype=bfloat16).
  c.model = dict(
    name='encoder',
    variant='mini',
    dtype='float32',
    param_dtype='float32',
    scan_layers=False,
    remat='none',
    attention_impl='xla',
  )
  # `train`/`validation`: globs of your own files with dataset='files'; `path`: a corpus
  # written by python -m fm.data.prepare, with dataset='prepared'; `workers`: grain processes.
  c.data = dict(
    dataset='shakespeare',
    seq_len=256,
    seed=0,
    tokenizer=dict(kind='sentencepiece', vocab_size=4096, model=''),
    train='',
    validation='',
    path='',
    workers=0,
  )
  c.train = dict(
    steps=360,
    global_batch=16,
    log_every=20,
    eval_every=120,
    eval_batches=16,
    final_eval_batches=-1,
    nonfinite='raise',
    microbatches=1,
  )
  c.optim = dict(
    lr=3e-3, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95
  )
  c.objective_args = dict(mask_rate=0.15)
  c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
  c.checkpoint = dict(every_steps=100, keep=3)
  c.init = dict(from_checkpoint='')  # A run whose matching params start this one ('': none).

  if arg == 'smoke':
    c.model.variant = 'tiny'
    c.data.seq_len = 64
    c.train.update(
      steps=20, global_batch=8, log_every=5, eval_every=20, eval_batches=2, final_eval_batches=4
    )
    c.optim.warmup_steps = 5
    c.checkpoint.every_steps = 10
  elif arg:
    raise ValueError(f'Unknown variant {arg!r} of mlm_shakespeare; choose "" or "smoke".')
  return c
