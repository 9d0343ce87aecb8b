"""fm: pretrain foundation models with a self-supervised objective, then adapt them."""


class ConfigError(ValueError):
  """A bad experiment config or command-line flag; the message names the key and the fix.

  `fm.main` prints it as one line and exits non-zero, without a traceback.
  """
