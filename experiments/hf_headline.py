"""A published encoder-decoder (T5 1.1 / Flan-T5), imported from Hugging Face, fine-tuned to
write a news article's headline.

  python -m fm.main --config experiments/hf_headline.py --workdir /tmp/hf_headline \
      --config.pretrained.hf=/models/flan-t5-small
  python -m fm.main --config experiments/hf_headline.py:lora --workdir /tmp/hf_headline_lora \
      --config.pretrained.hf=/models/flan-t5-small
  python -m fm.main --config experiments/hf_headline.py:smoke --workdir /tmp/smoke

`pretrained.hf` is a Hugging Face T5 directory (config.json, *.safetensors, tokenizer.json): it
is imported into WORKDIR/pretrained once (python -m fm.convert import) and reused; articles and
titles are encoded with its own tokenizer (T5's: the source and target each end in </s>, the
decoder starts from token 0). The encoder reads the article's first `data.source_len` tokens;
the decoder writes the title. After fine-tuning, titles are generated for the first
`task_args.eval_examples` test articles with greedy and beam search and scored with ROUGE-1/2/L.
The smoke variant uses the tiny T5 of the test fixtures.
"""

import pathlib

import ml_collections

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'fixtures' / 'hf' / 't5'


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'headline'
  c.task_args = dict(train_fraction=1.0, split_seed=0, eval_examples=192)
  c.pretrained = dict(hf='', experiment='', workdir='', overrides='')
  c.finetune = dict(
    init='pretrained',
    mode='full',
    beams=4,
    no_repeat_ngram=0,
    lora_rank=8,
    lora_alpha=16.0,
    lora_targets=('query', 'key', 'value', 'out', 'gate', 'up', 'down'),
  )
  c.data = dict(source_len=256, target_len=32, seed=0)
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
  # T5's fine-tuning recipe: a constant-ish rate of about 1e-4 to 1e-3 with Adam-style updates.
  c.optim = dict(
    lr=3e-4, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0, b1=0.9, b2=0.999
  )
  c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
  c.checkpoint = dict(every_steps=200, keep=2)

  if arg == 'lora':
    c.finetune.mode = 'lora'
    c.optim.lr = 1e-3
  elif arg == 'smoke':
    c.pretrained.hf = str(FIXTURE)
    c.task_args.eval_examples = 8
    c.data.update(source_len=48, target_len=16)
    c.train.update(steps=10, global_batch=8, log_every=5, eval_every=10, eval_batches=2)
    c.optim.update(lr=1e-3, warmup_steps=2)
    c.finetune.beams = 2
    c.checkpoint.every_steps = 10
  elif arg:
    raise ValueError(f'Unknown variant {arg!r} of hf_headline; choose "", "lora" or "smoke".')
  return c
