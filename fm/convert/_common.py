"""What the family modules of fm/convert share."""

from fm import ConfigError


def refuse(kind: str, unsupported: dict[str, bool], model: str = 'decoder') -> None:
  """One sentence naming what a checkpoint of `kind` uses that fm's `model` does not compute
  (the keys of `unsupported` whose value is true); nothing when there is none."""
  what = ', '.join(k for k, v in unsupported.items() if v)
  if what:
    raise ConfigError(f"this {kind} checkpoint uses {what}, which fm's {model} does not compute.")


def matches(layout: dict, fields: dict) -> bool:
  """Whether model fields have every value a family's LAYOUT pins."""
  return all(fields[k] == v for k, v in layout.items())
