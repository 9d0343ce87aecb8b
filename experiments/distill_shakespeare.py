"""Distillation of the lm_shakespeare decoder (teacher) into a smaller decoder (student).

  python -m fm.main --config experiments/distill_shakespeare.py --workdir /tmp/distill
  python -m fm.main --config experiments/distill_shakespeare.py:smoke --workdir /tmp/smoke

The teacher is trained first into WORKDIR/teacher by experiments/lm_shakespeare.py unless that
run is already there; to reuse a finished run elsewhere, pass
--config.objective_args.teacher.workdir=/tmp/lm_shakespeare. The student learns from the
teacher's temperature-softened next-token distributions plus the true next token.
Held-out plays measure the student's bits per byte next to the teacher's.
"""

import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'distill'
  # The student: `mini` at half the width and depth. Keys listed here can be overridden from
  # the command line (--config.model.dtype=bfloat16).
  c.model = dict(
    name='decoder',
    variant='mini',
    num_layers=2,
    d_model=128,
    num_heads=4,
    num_kv_heads=4,
    head_dim=32,
    mlp_dim=384,
    dtype='float32',
    param_dtype='float32',
    scan_layers=False,
    remat='none',
    attention_impl='xla',
  )
  # Must match the teacher's data and tokenizer.
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
  c.objective_args = dict(
    teacher=dict(experiment='experiments/lm_shakespeare.py', workdir=''),  # '': WORKDIR/teacher
    temperature=2.0,
    hard_weight=0.5,
  )
  c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
  c.checkpoint = dict(every_steps=100, keep=3)
  c.init = dict(from_checkpoint='')  # A run whose matching params start this one ('': none).

  if arg == 'smoke':
    c.model.update(
      variant='tiny', num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=96
    )
    c.data.seq_len = 64
    c.train.update(
      steps=20, global_batch=8, log_every=5, eval_every=20, eval_batches=2, final_eval_batches=4
    )
    c.optim.warmup_steps = 5
    c.objective_args.teacher.experiment = 'experiments/lm_shakespeare.py:smoke'
    c.checkpoint.every_steps = 10
  elif arg:
    raise ValueError(f'Unknown variant {arg!r} of distill_shakespeare; choose "" or "smoke".')
  return c
