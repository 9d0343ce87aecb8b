"""Reading what a run left in its workdir (shared by the end-to-end tests)."""
import json
import pathlib


def train_losses(workdir) -> dict[int, float]:
  """Step -> training loss from metrics.jsonl (a line cut short by SIGKILL is skipped)."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return {}
  out = {}
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if 'train/loss' in record:
      out[record['step']] = record['train/loss']
  return out
