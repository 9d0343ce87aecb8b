"""A published decoder, imported from Hugging Face, fine-tuned on movie-review sentiment.

  python -m fm.main --config experiments/hf_sentiment.py --workdir /tmp/hf_sentiment \
      --config.pretrained.hf=/models/Qwen2.5-0.5B
  python -m fm.main --config experiments/hf_sentiment.py:lora --workdir /tmp/hf_lora \
      --config.pretrained.hf=/models/Qwen2.5-0.5B
  python -m fm.main --config experiments/hf_sentiment.py:smoke --workdir /tmp/smoke

`pretrained.hf` is a Hugging Face model directory (config.json, *.safetensors, tokenizer.json)
of a type fm converts (llama, mistral, qwen2, gpt2): it is imported into WORKDIR/pretrained once
(python -m fm.convert import) and reused; the reviews are encoded with its own tokenizer. A
classification head on the last token's state is trained with the whole network (mode full) or
with LoRA adapters (variant lora). The smoke variant uses the tiny GPT-2 of the test fixtures.
"""

import pathlib

import ml_collections

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'fixtures' / 'hf' / 'gpt2'


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'sentiment'
  c.task_args = dict(train_fraction=1.0, split_seed=0)
  c.pretrained = dict(hf='', experiment='', workdir='', overrides='')
  c.finetune = dict(
    init='pretrained',
    mode='full',
    pool='',
    shots=4,
    head_lr=1e-3,
    lora_rank=8,
    lora_alpha=16.0,
    lora_targets=('query', 'key', 'value', 'out', 'gate', 'up', 'down'),
  )
  c.data = dict(seq_len=128, seed=0)
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
    lr=2e-5, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.01, clip_norm=1.0, b1=0.9, b2=0.999
  )
  c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
  c.checkpoint = dict(every_steps=200, keep=2)

  if arg == 'lora':
    c.finetune.mode = 'lora'
    c.optim.lr = 2e-4
  elif arg == 'smoke':
    c.pretrained.hf = str(FIXTURE)
    c.data.seq_len = 64
    c.train.update(steps=20, global_batch=8, log_every=5, eval_every=20, eval_batches=2)
    c.optim.update(lr=1e-3, warmup_steps=5)
    c.checkpoint.every_steps = 10
  elif arg:
    raise ValueError(f'Unknown variant {arg!r} of hf_sentiment; choose "", "lora" or "smoke".')
  return c
