"""Components are looked up by module name: `get('models', 'decoder')` imports fm.models.decoder.

Each kind's package writes the contract of its modules in its `__init__.py` (fm/models,
fm/objectives, fm/tasks): a Protocol naming everything a module provides, and the defaults of
the optional names. `get` checks the required names (a module missing one is refused in one
sentence) and returns the module as a namespace with the defaults filled in, so callers read
every hook directly instead of probing for it.
"""

import functools
import importlib
import pkgutil
import types
from typing import Any, Generic, Protocol

from fm import ConfigError

KINDS = {'models': 'config.model.name', 'objectives': 'config.objective', 'tasks': 'config.task'}


def choices(kind: str) -> list[str]:
  package = importlib.import_module(f'fm.{kind}')
  return sorted(
    m.name
    for m in pkgutil.iter_modules(package.__path__)
    if not m.name.startswith('_') and m.name not in package.PRIVATE
  )


def members(protocol: type) -> list[str]:
  """The names a Protocol class (and the Protocols it extends) declares: annotated attributes
  and methods."""
  names = []
  for cls in reversed(protocol.__mro__):
    if cls is not protocol and cls in (object, Protocol, Generic):
      continue
    names += list(vars(cls).get('__annotations__', {}))
    names += [n for n, v in vars(cls).items() if callable(v) and not n.startswith('_')]
  return [n for n in dict.fromkeys(names) if not n.startswith('_')]


@functools.cache
def get(kind: str, name: str) -> Any:
  """The module fm.<kind>.<name> with its package's defaults filled in; an unknown name raises
  a ConfigError listing the choices, a module that breaks its contract one naming what is
  missing."""
  options = choices(kind)
  if name not in options:
    raise ConfigError(f'{KINDS[kind]}={name!r} is unknown; choose one of: {", ".join(options)}.')
  module = importlib.import_module(f'fm.{kind}.{name}')
  protocol, defaults = importlib.import_module(f'fm.{kind}').contract(module)
  missing = [n for n in members(protocol) if n not in vars(module) and n not in defaults]
  if missing:
    raise ConfigError(
      f'{module.__name__} does not define {", ".join(missing)}, which the {protocol.__name__} '
      f'contract in {protocol.__module__} requires; add {"it" if len(missing) == 1 else "them"} '
      f'to {module.__file__}.'
    )
  return types.SimpleNamespace(**{**defaults, **vars(module)})
