"""The house's layout: wings by concern, every import pointing down, small files.

Read from the source with `ast` (nothing is imported), so a new upward import,
an import cycle or an oversized file fails here with its name.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The library's wings, lowest first: a wing imports only from wings before it
# (and from itself). models/ is below them all and imports none of them.
WINGS = (
  'models',
  'c3po_jax.common',
  'c3po_jax.tasks',
  'c3po_jax.ckpts',
  'c3po_jax.neighbours',
  'c3po_jax.remix',
  'c3po_jax.run',
  'c3po_jax.ablate',
  'c3po_jax.demo',
  'c3po_jax.testing',
)
# Entry points above every wing.
TOP = ('c3po_jax', 'c3po_jax.main', 'c3po_jax.ablate.__main__')
MAX_LINES = 400


def _modules() -> dict[str, str]:
  """{dotted module name: path} of the library (c3po_jax/, models/)."""
  out = {}
  for top in ('c3po_jax', 'models'):
    for folder, _, names in os.walk(os.path.join(ROOT, top)):
      for name in names:
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
          out[rel.removesuffix('.__init__')] = path
  return out


MODULES = _modules()


def _imports(path: str) -> set[str]:
  """Modules of this project that `path` imports (anywhere in the file)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from pkg import mod` imports pkg.mod when that is a module.
      names = [f'{node.module}.{a.name}' for a in node.names] + [node.module]
    else:
      continue
    for name in names:
      while name and name not in MODULES:
        name = name.rpartition('.')[0]
      if name:
        found.add(name)
  return found


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _wing(module: str) -> int | None:
  for i, wing in reversed(list(enumerate(WINGS))):
    if module == wing or module.startswith(wing + '.'):
      return i
  return None


def test_every_module_is_in_a_wing():
  assert MODULES, 'no library modules found'
  lost = [m for m in MODULES if _wing(m) is None and m not in TOP]
  assert not lost, f'modules outside every wing: {lost}'


def test_imports_point_down():
  up = []
  for module, imported in GRAPH.items():
    if module in TOP:
      continue
    for other in imported:
      if other in TOP or other == 'c3po_jax':
        up.append(f'{module} -> {other} (a package entry point above it)')
      elif other.startswith('benchmarks'):
        up.append(f'{module} -> {other} (the speed benchmarks)')
      elif _wing(other) > _wing(module):
        up.append(f'{module} -> {other} (a later wing)')
  assert not up, 'imports pointing up:\n' + '\n'.join(sorted(up))


def test_no_import_cycles():
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for other in sorted(GRAPH[m]):
      if state.get(other) == 'open':
        cycles.append(' -> '.join(stack[stack.index(other) :] + [other]))
      elif other not in state:
        visit(other)
    stack.pop()
    state[m] = 'done'

  for m in sorted(GRAPH):
    if m not in state:
      visit(m)
  # A package's __init__ importing its own submodules is not a cycle of concern.
  real = [c for c in cycles if not all(p.startswith(c.split(' -> ')[0]) for p in c.split(' -> '))]
  assert not real, 'import cycles:\n' + '\n'.join(real)


@pytest.mark.parametrize('module', sorted(MODULES))
def test_library_files_are_small(module):
  with open(MODULES[module]) as f:
    lines = sum(1 for _ in f)
  assert lines <= MAX_LINES, f'{MODULES[module]} has {lines} lines (at most {MAX_LINES})'


def _functions_naming(name: str) -> set[str]:
  """module.function of every function in models/ whose body names `name`."""
  out = set()
  for m, p in MODULES.items():
    if not m.startswith('models'):
      continue
    for fn in ast.walk(ast.parse(open(p).read())):
      if isinstance(fn, ast.FunctionDef):
        named = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        named |= {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
        if name in named:
          out.add(f'{m}.{fn.name}')
  return out


def _loops_calling(attr: str) -> set[str]:
  """module.function of every function in models/ with a loop that calls `<x>.attr(...)`."""
  out = set()
  for m, p in MODULES.items():
    if not m.startswith('models'):
      continue
    for fn in ast.walk(ast.parse(open(p).read())):
      if not isinstance(fn, ast.FunctionDef):
        continue
      for loop in ast.walk(fn):
        if isinstance(loop, (ast.For, ast.While, ast.comprehension)):
          calls = [n for n in ast.walk(loop) if isinstance(n, ast.Call)]
          if any(isinstance(c.func, ast.Attribute) and c.func.attr == attr for c in calls):
            out.add(f'{m}.{fn.name}')
  return out


def test_one_decoder_layer_loop():
  """Only `transformer.decoder_stack` runs decoder layers; forward, decode and prefix call it."""
  # `Transformer.layer(i)` is how a decoder layer is reached: no other loop reaches one.
  assert _loops_calling('layer') == {'models.transformer.decoder_stack'}
  callers = {f.rsplit('.', 1)[0] for f in _functions_naming('decoder_stack')}
  assert {'models.transformer', 'models.decode', 'models.prefix'} <= callers
