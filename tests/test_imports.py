"""The package's import graph: no circles, and the library never imports the commands.

Every import counts, the ones inside functions too (a circle hidden in a function is still
a circle: each side needs the other to change). A package's `__init__` importing its own
children is how a package exposes them, not a circle of design.
"""

import ast
import pathlib


from conftest import ROOT

PACKAGE = ROOT / "medjax"
COMMAND_LAYER = ("medjax.cli", "medjax.commands")


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  files = {module_name(p): p for p in PACKAGE.rglob("*.py")}

  def resolve(name: str) -> str | None:
    while name and name not in files:
      name = name.rpartition(".")[0]
    return name or None

  graph = {}
  for module, path in files.items():
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
          base = ".".join(anchor + ([base] if base else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
      else:
        continue
      for name in names:
        target = resolve(name) if name.startswith("medjax") else None
        if target and target != module:
          targets.add(target)
    graph[module] = targets
  for module, targets in graph.items():
    # a package's __init__ exposing its children, and children importing that package
    if files[module].name == "__init__.py":
      targets -= {t for t in targets if t.startswith(module + ".")}
    targets -= {t for t in targets if files[t].name == "__init__.py" and module.startswith(t + ".")}
  return graph


def circles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in graph:
    if v not in index:
      visit(v)
  return found


def test_the_graph_is_read():
  graph = import_graph()
  assert len(graph) > 40
  assert "medjax.data.preprocess" in graph["medjax.infer"]  # a module-level import
  assert "medjax.data.prepare" in graph["medjax.infer"]  # one inside a function


def test_a_circle_would_be_found():
  assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
  assert circles(import_graph()) == []


def test_the_library_never_imports_the_command_layer():
  graph = import_graph()
  layer = lambda m: m.startswith(COMMAND_LAYER)
  offending = sorted((m, t) for m, targets in graph.items() if not layer(m)
                     for t in targets if layer(t))
  assert offending == []
