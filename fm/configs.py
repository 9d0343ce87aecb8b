"""Experiment configs: loading experiment files, the default of every key, and resolving a
config against them.

An experiment file (`get_config(arg)` returning an ml_collections ConfigDict) is a whole recipe;
on the command line any key of the table below can be overridden (`--config.train.steps=100`),
whether the file sets it or not (`overridable`). `resolve` fills in every key the file leaves out
from the table, which is the one home of each default, so the trainers read
`config.train.microbatches` and never `.get(key, default)`. It also refuses a key that the table
does not know (naming the closest one), a value whose type is not its default's, and a required
key that is missing. Plugin options have their defaults in the plugin: an objective's `ARGS`
(`config.objective_args`), a task kind's `ARGS` (`config.task_args`) and `FINETUNE`; model
fields in the model's `VARIANTS` and `Config`.
"""

import ast
import difflib
import importlib.util
import pathlib
from typing import Any

import ml_collections

from fm import ConfigError, registry
from fm.tasks import kind_of

REPO = pathlib.Path(__file__).resolve().parents[1]


class _Required:
  """Marks a key an experiment must set."""

  def __repr__(self):
    return 'REQUIRED'


class _Free:
  """Marks a dict whose keys are checked by its user, not here (default: empty)."""

  def __repr__(self):
    return 'FREE'


class _Optional:
  """Marks a key that may be set, with no default here (a model's Config field)."""

  def __repr__(self):
    return 'OPTIONAL'


REQUIRED, FREE, OPTIONAL = _Required(), _Free(), _Optional()

# =============================================================================================
# Every key, with its default
# =============================================================================================
# Keys of every run.
SHARED = dict(
  seed=0,  # Init, the step rng, and which labels task_args.train_fraction keeps.
  train=dict(
    steps=REQUIRED,  # Optimizer steps (0: only evaluate).
    global_batch=REQUIRED,  # Rows per step, over all devices and hosts.
    microbatches=1,  # Gradient accumulation over that many slices of each batch.
    log_every=50,  # Steps between progress lines (and train/* metrics).
    eval_every=500,  # Steps between evaluations on the validation split.
    eval_batches=-1,  # Batches per periodic evaluation (-1: the whole split).
    final_eval_batches=-1,  # Batches of the final evaluation of a pretraining run (-1: all).
    nonfinite='raise',  # A non-finite loss or update: 'raise' (stop, save nothing) or 'skip'.
    # Early stopping: the validation metric (scored on the whole split at every evaluation)
    # whose best value picks the params that are returned and tested: 'accuracy' (higher is
    # better) or 'min:loss' (lower); '': the last step's. The best params are kept in the train
    # state (saved and resumed with it).
    select='',
  ),
  optim=dict(  # AdamW with linear warmup, then cosine decay (fm/optim.py).
    lr=REQUIRED,  # Peak learning rate.
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.0,  # Decoupled, not on norm scales and biases.
    clip_norm=0.0,  # Global gradient-norm clipping (0: off).
    warmup_steps=0,
    schedule='cosine',  # 'cosine' (to lr * min_lr_ratio at the last step) or 'constant'.
    min_lr_ratio=0.1,
  ),
  mesh=dict(data=-1, fsdp=1, sequence=1, tensor=1),  # Device mesh; one axis may be -1: the rest.
  sharding=dict(rules=()),  # [logical name, mesh axes] pairs over fm/sharding.py's defaults.
  checkpoint=dict(
    every_steps=0,  # Save every N steps (0: only at the end and on preemption).
    keep=3,  # Newest checkpoints kept.
  ),
  init=dict(from_checkpoint=''),  # A workdir or checkpoint whose matching params start the run.
)
# A pretraining run (no `task`).
PRETRAINING = dict(
  objective=REQUIRED,  # A module of fm/objectives/.
  objective_args=FREE,  # The objective's options: its ARGS.
  model=dict(
    name=REQUIRED,  # A module of fm/models/.
    variant='tiny',  # One of its VARIANTS; other keys override fields of its Config.
  ),
  data=dict(  # A corpus prepared once (fm/data/prepare.py), streamed by fm/data/pipeline.py.
    dataset=REQUIRED,  # 'shakespeare', 'news' (prepared and cached), 'files' or 'prepared'.
    seq_len=REQUIRED,  # Tokens per packed window.
    seed=0,  # Shuffle order of the windows.
    tokenizer=dict(
      # 'sentencepiece' (trained on a sample of the corpus, or `model`), 'bytes', or 'hf' (the
      # tokenizer.json of the Hugging Face model directory `model`).
      kind='sentencepiece',
      vocab_size=4096,  # SentencePiece vocabulary size.
      model='',  # A SentencePiece .model instead of training one, or (hf) a model directory.
    ),
    train='',  # 'files': glob of .txt, .jsonl, .jsonl.gz or .parquet training files.
    validation='',  # 'files': glob of held-out files ('': validation_fraction of the documents).
    validation_fraction=0.01,  # 'files' without validation files: share held out, by hash.
    text_field='text',  # 'files': the field (.jsonl) or column (.parquet) holding the text.
    encoding_errors='strict',  # 'files': 'replace' turns bytes that are not UTF-8 into U+FFFD.
    path='',  # 'prepared': the directory python -m fm.data.prepare wrote.
    mixture=(),  # 'prepared': ((directory, weight), ...) drawn in proportion, instead of path.
    workers=0,  # Grain worker processes for windows and host-side transforms (0: in-process).
  ),
)
# The data of a pretraining run whose objective reads images (its MODALITY).
IMAGE_DATA = dict(
  # A named image dataset of fm/data/images.py: 'fashion_mnist', 'mnist_5k', 'emoji' (captioned:
  # what an image-text objective needs).
  dataset=REQUIRED,
  seed=0,  # Shuffle order of the images.
  workers=0,  # Grain worker processes for the objective's host-side transform (0: in-process).
  # Training augmentation: pixels of zero padding before a random crop (0: none), a random
  # horizontal flip.
  pad=0,
  flip=False,
)
# A fine-tuning run (`task` set).
FINETUNING = dict(
  task=REQUIRED,  # A module of fm/tasks/.
  task_args=dict(
    train_fraction=1.0,  # Share of the training examples kept (seeded by `seed`).
    split_seed=0,  # Seed of the task's train/validation/test split.
  ),
  pretrained=dict(  # The backbone run (fm/runs.py).
    experiment='',  # An experiment file trained into WORKDIR/pretrained unless finished there.
    workdir='',  # A finished run's workdir, used as it is; takes precedence over `experiment`.
    overrides='',  # 'key=value ...' applied to `experiment`'s config (e.g. 'train.steps=100').
    # A Hugging Face model directory (fm/convert), imported into WORKDIR/pretrained once and
    # reused; takes precedence over `workdir` and `experiment`.
    hf='',
  ),
  finetune=dict(
    init='pretrained',  # 'pretrained' (warm start) or 'random' (same architecture, fresh).
    mode='full',  # One of the task's MODES: full, linear_probe, lora, prompt, zero/few_shot.
    head_lr=0.0,  # The learning rate of a task head (0: optim.lr).
    lora_rank=8,  # Adapters' rank, for mode lora.
    lora_alpha=16.0,  # Adapters' scale: alpha / rank.
    lora_targets=('query', 'key', 'value', 'out', 'gate', 'up', 'down'),
  ),
)
# A pretrained-run spec (`pretrained`, an objective's frozen models).
RUN_SPEC = dict(FINETUNING['pretrained'])


# =============================================================================================
# Loading experiment files
# =============================================================================================
def load(spec: str, key: str) -> ml_collections.ConfigDict:
  """'experiments/x.py[:variant]' (relative to the working directory or the repository) ->
  that file's get_config(variant), as `--config` loads it; `key` names the setting in errors."""
  path, _, arg = spec.partition(':')
  named = f'{key}={spec}' if key.startswith('--') else f'{key}={spec!r}'  # A flag, or a key.
  found = next((p for p in (pathlib.Path(path).expanduser(), REPO / path) if p.is_file()), None)
  if found is None:
    raise ConfigError(
      f'{named}: no such experiment file; give a path like '
      f'experiments/lm_shakespeare.py (optionally with :smoke).'
    )
  module_spec = importlib.util.spec_from_file_location(found.stem, found)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # An edited experiment file that does not run: where and why.
    raise ConfigError(f'{named}: {_where(e, found)}; fix that line.') from None
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(
      f'{named}: {path} defines no get_config(arg), so it is not an experiment file '
      f'(a script of its own: see python {path} --help); give an experiment like '
      f'experiments/lm_shakespeare.py.'
    )
  try:
    return module.get_config(arg)
  except ValueError as e:  # An unknown variant.
    raise ConfigError(f'{named}: {e}') from None
  except Exception as e:
    raise ConfigError(f'{named}: get_config: {_where(e, found)}; fix that line.') from None


def _where(error: Exception, path: pathlib.Path) -> str:
  """'ErrorType: message at line N' of the last line of `path` that the error passed."""
  line = getattr(error, 'lineno', None) if isinstance(error, SyntaxError) else None
  tb = error.__traceback__
  while tb is not None:
    if pathlib.Path(tb.tb_frame.f_code.co_filename) == path:
      line = tb.tb_lineno
    tb = tb.tb_next
  message = error.msg if isinstance(error, SyntaxError) else str(error)
  return f'{type(error).__name__}: {message}' + (f' at line {line}' if line else '')


def overridable(config):
  """`config` with each dict of the table that it leaves out added, empty (not `data`'s, which
  depend on the objective's modality), so that an override can set any key of the table as a
  new key, which `resolve` then checks by name and type. Anything else is returned as it is."""
  if isinstance(config, ml_collections.ConfigDict):
    _add_dicts(config, {**SHARED, **(FINETUNING if is_finetuning(config) else PRETRAINING)})
  return config


def _add_dicts(node: ml_collections.ConfigDict, table: dict) -> None:
  for name, default in table.items():
    if isinstance(default, dict | _Free) and name != 'data':
      if name not in node:
        node[name] = {}
      if isinstance(default, dict) and isinstance(node[name], ml_collections.ConfigDict):
        _add_dicts(node[name], default)


def apply_overrides(config: ml_collections.ConfigDict, overrides: str, key: str) -> None:
  """Sets 'a.b=value c=value' (Python literals, else strings) on `config`, as the command
  line's --config.a.b=value would: a key of a dict the config has, or of one `overridable` adds
  (a new key is checked by `resolve`)."""
  overridable(config)
  for item in overrides.split():
    path, sep, text = item.partition('=')
    if not sep:
      raise ConfigError(f'{key}={overrides!r}: {item!r} is not key=value, e.g. train.steps=100.')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    try:
      node, last = find(config, path, new=True)
    except ConfigError as e:
      raise ConfigError(f'{key}: {e}') from None
    try:
      node[last] = value
    except TypeError as e:
      raise ConfigError(f'{key}: {path}={text} does not fit ({e}).') from None


# =============================================================================================
# Resolving a config
# =============================================================================================
def is_finetuning(config: ml_collections.ConfigDict) -> bool:
  """A config with a `task` adapts a backbone; one without pretrains."""
  return bool(config.get('task'))


def schema(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The keys a run of `config` may set, with their defaults (REQUIRED, FREE or a value)."""
  if is_finetuning(config):
    kind = kind_of(registry.get('tasks', config.task))
    return {
      **SHARED,
      **FINETUNING,
      'task_args': {**FINETUNING['task_args'], **kind.ARGS},
      'finetune': {**FINETUNING['finetune'], **kind.FINETUNE},
      # Seed: the order of the training examples.
      'data': {**{k: REQUIRED for k in kind.DATA_KEYS}, 'seed': 0},
    }
  out = {**SHARED, **PRETRAINING}
  if isinstance(config.get('objective'), str):
    objective = registry.get('objectives', config.objective)
    out['objective_args'] = {**objective.ARGS, **{n: RUN_SPEC for n in objective.FROZEN}}
    if objective.MODALITY != 'text':
      out['data'] = IMAGE_DATA
  if isinstance(config.get('model', {}).get('name'), str):
    family = registry.get('models', config.model.name)
    fields = {f: OPTIONAL for f in family.Config.__dataclass_fields__}
    out['model'] = {**fields, **PRETRAINING['model']}
  return out


def resolve(config: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
  """A copy of `config` with every default filled in, checked against `schema`; resolving a
  resolved config changes nothing."""
  config = ml_collections.ConfigDict(
    config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  )
  _fill(config, schema(config), 'config')
  return config


def _fill(node: ml_collections.ConfigDict, table: dict, where: str) -> None:
  for name in node:
    if name not in table:
      raise ConfigError(unknown_key(where, name, list(table)))
  for name, default in table.items():
    if name in node:
      value = node[name]
    elif default is REQUIRED:
      raise ConfigError(f'{where}.{name} is required; set it in the experiment file.')
    elif default is not OPTIONAL:
      node[name] = {} if isinstance(default, dict | _Free) else default
      value = node[name]
    if isinstance(default, dict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f'{where}.{name}={value!r} must be a dict of: {", ".join(default)}.')
      _fill(value, default, f'{where}.{name}')
    elif name in node and type(default) in _ACCEPTS and not _fits(value, default):
      raise ConfigError(
        f'{where}.{name}={value!r} is a {type(value).__name__}; give a '
        f'{_ACCEPTS[type(default)][0]} like its default, {default!r}.'
      )


# A default of each of these types: (what to give, the types it takes). Others take anything.
_ACCEPTS = {
  bool: ('bool', (bool,)),
  int: ('int', (int,)),
  float: ('number', (int, float)),
  str: ('string', (str,)),
  tuple: ('tuple or list', (tuple, list)),
}


def _fits(value, default) -> bool:
  """Whether `value` may stand where `default` is: values of the default's type (an int for a
  float, a list for a tuple, not a bool for a number)."""
  accepts = _ACCEPTS[type(default)][1]
  return isinstance(value, accepts) and (type(default) is bool or not isinstance(value, bool))


def find(
  config: ml_collections.ConfigDict, path: str, new: bool = False
) -> tuple[ml_collections.ConfigDict, str]:
  """(the dict that holds the key `path` ('a.b.c'), its last name); a key that `config` does
  not set raises a ConfigError naming the closest one, unless `new` and only the last name is
  missing."""
  node, where = config, 'config'
  names = path.split('.')
  for i, name in enumerate(names):
    last_is_new = new and i == len(names) - 1 and isinstance(node, ml_collections.ConfigDict)
    if last_is_new and name not in node:
      return node, name
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      choices = list(node) if isinstance(node, ml_collections.ConfigDict) else []
      raise ConfigError(unknown_key(where, name, choices))
    parent, node, where = node, node[name], f'{where}.{name}'
  return parent, name


def unknown_key(where: str, name: str, choices: list[str]) -> str:
  """The sentence for a key `where.name` that is not one of `choices`."""
  guess = closest(name, choices)
  return (
    f'{where}.{name} is not a key of {where}'
    + (f' (did you mean {guess!r}?)' if guess else '')
    + f'; its keys: {", ".join(choices)}.'
  )


def closest(name: str, choices: list[str]) -> str | None:
  """The choice closest to a misspelled `name`, by spelling or by initials
  (`learning_rate` -> `lr`), or None."""
  initials = lambda s: ''.join(w[0] for w in s.split('_') if w)
  found = difflib.get_close_matches(name, choices, 1, 0.6) or [
    c for c in choices if len(c) > 1 and (initials(name) == c or initials(c) == name)
  ]
  return found[0] if found else None
