"""Causal-LM pretraining with Llama 3.1 8B shapes, sharded for a TPU pod or GPU cluster.

  python -m fm.plan --config experiments/llama_8b.py --topology v5e:16x16
  python -m fm.plan --config experiments/llama_8b.py --topology v5e:2x4
  python -m fm.main --config experiments/llama_8b.py --workdir gs://BUCKET/llama_8b  # On the pod.

Fully sharded (fsdp over every chip), bf16 compute with float32 master params and Adam state,
layers scanned and rematerialised; 256 sequences of 4,096 tokens (1M tokens) per step.
Plan it before renting the pod (fm.plan compiles this step for the topology on a laptop).
"""
import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'causal_lm'
  c.model = dict(name='decoder', variant='llama-8b', dtype='bfloat16', param_dtype='float32',
                 scan_layers=True, remat='full', attention_impl='xla')
  c.data = dict(dataset='news', seq_len=4096, seed=0,
                tokenizer=dict(kind='sentencepiece', vocab_size=4096))
  c.train = dict(steps=10_000, global_batch=256, log_every=10, eval_every=1000, eval_batches=16,
                 final_eval_batches=64, nonfinite='raise', microbatches=1)
  c.optim = dict(lr=3e-4, warmup_steps=500, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0,
                 b1=0.9, b2=0.95)
  c.mesh = dict(data=1, fsdp=-1, sequence=1, tensor=1)
  c.checkpoint = dict(every_steps=500, keep=3)
  if arg == 'smoke':  # The same recipe at test size.
    c.model.variant = 'tiny'
    c.data.seq_len = 64
    c.train.update(steps=20, global_batch=8, log_every=5, eval_every=20, eval_batches=2,
                   final_eval_batches=4)
    c.optim.warmup_steps = 5
    c.checkpoint.every_steps = 10
  elif arg:
    raise ValueError(f'Unknown variant {arg!r} of llama_8b; choose "" or "smoke".')
  return c
