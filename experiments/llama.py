"""Causal-LM pretraining with Llama shapes (3.1 8B or 3.2 1B), sharded for a TPU pod or GPUs.

  python -m fm.plan --config experiments/llama.py:8b --topology v5e:16x16
  python -m fm.plan --config experiments/llama.py:1b --topology h100:1 --max_batch
  python -m fm.main --config experiments/llama.py:8b --workdir /mnt/bucket/llama_8b  # On the pod (a shared mount).

Fully sharded (fsdp over every chip), bf16 compute with float32 master params and Adam state,
layers scanned and rematerialised, 4,096-token sequences: 256 per step (1M tokens) for 8b, 16
for 1b (fm.plan --max_batch finds the largest that fits). Plan it before renting the pod
(fm.plan compiles this step for the topology on a laptop). `smoke`: the 8b recipe at test size.
"""

import ml_collections

SIZES = {
  '8b': dict(variant='llama-8b', global_batch=256),
  '1b': dict(variant='llama-1b', global_batch=16),
}


def get_config(arg: str = '8b') -> ml_collections.ConfigDict:
  size = SIZES.get('8b' if arg in ('', 'smoke') else arg)
  if size is None:
    raise ValueError(f'Unknown variant {arg!r} of llama; choose 8b, 1b or smoke.')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'causal_lm'
  c.model = dict(
    name='decoder',
    variant=size['variant'],
    dtype='bfloat16',
    param_dtype='float32',
    scan_layers=True,
    remat='full',
    attention_impl='xla',
  )
  # `train`/`validation`: globs of your own files with dataset='files'; `path`: a corpus
  # written by python -m fm.data.prepare, with dataset='prepared'; `workers`: grain processes.
  c.data = dict(
    dataset='news',
    seq_len=4096,
    seed=0,
    tokenizer=dict(kind='sentencepiece', vocab_size=4096, model=''),
    train='',
    validation='',
    path='',
    workers=0,
  )
  c.train = dict(
    steps=10_000,
    global_batch=size['global_batch'],
    log_every=10,
    eval_every=1000,
    eval_batches=16,
    final_eval_batches=64,
    nonfinite='raise',
    microbatches=1,
  )
  c.optim = dict(
    lr=3e-4, warmup_steps=500, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95
  )
  c.mesh = dict(data=1, fsdp=-1, sequence=1, tensor=1)
  c.checkpoint = dict(every_steps=500, keep=3)
  c.init = dict(from_checkpoint='')  # A run whose matching params start this one ('': none).
  if arg == 'smoke':  # The same recipe at test size.
    c.model.variant = 'tiny'
    c.data.seq_len = 64
    c.train.update(
      steps=20, global_batch=8, log_every=5, eval_every=20, eval_batches=2, final_eval_batches=4
    )
    c.optim.warmup_steps = 5
    c.checkpoint.every_steps = 10
  return c
