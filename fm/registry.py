"""Components are looked up by module name: `get('models', 'decoder')` imports fm.models.decoder."""

import importlib
import pkgutil
from types import ModuleType

from fm import ConfigError

KINDS = {'models': 'config.model.name', 'objectives': 'config.objective', 'tasks': 'config.task'}
_PRIVATE = {'layers'}  # Shared building blocks, not selectable components.


def choices(kind: str) -> list[str]:
  package = importlib.import_module(f'fm.{kind}')
  return sorted(
    m.name
    for m in pkgutil.iter_modules(package.__path__)
    if not m.name.startswith('_') and m.name not in _PRIVATE
  )


def get(kind: str, name: str) -> ModuleType:
  """Returns the module fm.<kind>.<name>; an unknown name raises a ConfigError listing the choices."""
  options = choices(kind)
  if name not in options:
    raise ConfigError(f'{KINDS[kind]}={name!r} is unknown; choose one of: {", ".join(options)}.')
  return importlib.import_module(f'fm.{kind}.{name}')
