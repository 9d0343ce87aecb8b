"""The shape of the code: imports point one way, and the trainers answer to fm.runs."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def imports() -> dict[str, set[str]]:
  """fm module -> the fm modules it imports (at any depth of its code)."""
  modules = {}
  for path in (ROOT / 'fm').rglob('*.py'):
    name = '.'.join(path.relative_to(ROOT).with_suffix('').parts).removesuffix('.__init__')
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        found |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        found |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
    modules[name] = {m for m in found if m.startswith('fm')}
  return {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}


def cycle(graph: dict[str, set[str]]) -> list[str]:
  """One import cycle of `graph`, or []."""
  done, stack = set(), []

  def visit(module):
    if module in stack:
      return stack[stack.index(module) :] + [module]
    if module in done:
      return []
    stack.append(module)
    for dep in sorted(graph[module]):
      if found := visit(dep):
        return found
    stack.pop()
    done.add(module)
    return []

  for module in sorted(graph):
    if found := visit(module):
      return found
  return []


def test_no_import_cycle():
  assert cycle(imports()) == []


def test_the_cycle_finder_finds_cycles():
  assert cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert cycle({'a': {'b'}, 'b': set()}) == []


def test_trainers_import_downward_only():
  """fm.runs sits above both trainers; adaptation builds on pretraining, never the reverse."""
  graph = imports()
  assert 'fm.finetune' not in graph['fm.train'] and 'fm.runs' not in graph['fm.train']
  assert 'fm.runs' not in graph['fm.finetune']
  below = {'fm.train', 'fm.finetune', 'fm.checkpoint', 'fm.sharding', 'fm.registry', 'fm.configs'}
  for module in below:
    assert not graph[module] & {'fm.main', 'fm.runs', 'fm.plan', 'fm.cli'}, module
