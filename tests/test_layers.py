"""The package's import structure: every module imports only modules listed above it in
`bigkd/__init__.py`'s docstring (inside a package: no import circle), so the data flow
config -> plan -> build -> loop holds in the imports and training never imports what reads its
outputs. Imports inside functions count too. Read from the source: nothing is imported."""
import ast
import pathlib
import re

import bigkd

ROOT = pathlib.Path(bigkd.__file__).parent


def module_name(path: pathlib.Path) -> str:
  parts = ['bigkd', *path.relative_to(ROOT).with_suffix('').parts]
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict:
  """{module: set of bigkd modules it imports} of every module under bigkd/."""
  paths = {module_name(p): p for p in ROOT.rglob('*.py')}
  graph = {}
  for name, path in paths.items():
    package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1]
                          + ([base] if base else []))
        deps.update(f'{base}.{a.name}' if f'{base}.{a.name}' in paths else base
                    for a in node.names)
    graph[name] = {d for d in deps if d in paths and d != name}
  return graph


def listed_order() -> list:
  """The docstring's entries, top to bottom: 'config' for config.py, 'data' for data/."""
  return re.findall(r'^  (\w+)(?:\.py|/)\s', bigkd.__doc__, re.M)


def entry(module: str) -> str:
  return module.split('.')[1] if module != 'bigkd' else ''


def test_every_module_is_listed():
  missing = {entry(m) for m in import_graph() if m != 'bigkd'} - set(listed_order())
  assert not missing, f'not in bigkd/__init__.py\'s list: {sorted(missing)}'


def test_modules_import_only_what_is_listed_above_them():
  rank = {name: i for i, name in enumerate(listed_order())}
  upward = sorted(f'{m} imports {d}' for m, deps in import_graph().items() if m != 'bigkd'
                  for d in deps if entry(d) != entry(m) and rank[entry(d)] > rank[entry(m)])
  assert not upward, upward


def test_no_import_circle():
  graph = import_graph()
  state = {}

  def visit(module, path):
    if state.get(module) == 'done':
      return
    assert state.get(module) != 'open', ' -> '.join(path + [module])
    state[module] = 'open'
    for dep in sorted(graph[module]):
      visit(dep, path + [module])
    state[module] = 'done'

  for module in sorted(graph):
    visit(module, [])
