"""The package's imports point one way: no cycle, and nothing low imports something high.

Reads the source with `ast` (every import counts, at module level or inside a function:
a lazy import back up is still an arrow the wrong way) and runs nothing of the project.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cfg_guidance"

# The README's package map, top to bottom. A module may import modules of lower layers,
# and modules of its own package (e.g. evaluation.sweep -> evaluation.report).
LAYERS = [
    ["main"],
    ["samples", "evaluation"],
    ["train"],
    ["api"],
    ["toy"],
    ["config"],
    ["generate"],
    ["state"],
    ["data"],
    ["models"],
    ["sampling"],
    ["guidance"],
    ["diffusion"],
    ["runtime"],
    ["images"],
    ["files"],
]


def _modules() -> dict[str, pathlib.Path]:
  """{"cfg_guidance.evaluation.sweep": path, ...}; a package is its __init__.py."""
  mods = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    mods[".".join(parts)] = path
  return mods


def import_edges() -> dict[str, set[str]]:
  """{module: the cfg_guidance modules it imports}."""
  mods = _modules()

  def resolve(name):
    while name and name not in mods:
      name = name.rpartition(".")[0]
    return name or None

  edges = {}
  for name, path in mods.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        found = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        found = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                 for a in node.names]
      else:
        continue
      targets |= {t for t in map(resolve, found) if t and t != name
                  and t.startswith("cfg_guidance")}
    edges[name] = targets
  return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One import cycle [a, b, ..., a], or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(edges):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def _unit(module: str) -> str:
  """cfg_guidance.evaluation.sweep -> "evaluation"; cfg_guidance itself -> ""."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _rank(module: str) -> int:
  ranks = [i for i, layer in enumerate(LAYERS) if _unit(module) in layer]
  assert ranks, f"{module} is in no layer of LAYERS (and of the README's package map)"
  return ranks[0]


def test_no_import_cycle():
  assert find_cycle(import_edges()) is None, find_cycle(import_edges())


def test_imports_point_down_the_layers():
  upward = []
  for module, targets in import_edges().items():
    if module == "cfg_guidance":  # The top-level `load` re-export of api.load.
      assert targets == {"cfg_guidance.api"}, targets
      continue
    for target in targets:
      same_package = _unit(target) == _unit(module)
      if not same_package and _rank(target) <= _rank(module):
        upward.append(f"{module} -> {target}")
  assert not upward, upward


def test_the_layers_are_the_readme_package_map():
  readme = (ROOT / "README.md").read_text()
  tree = readme[readme.index("```\ncfg_guidance/"):]
  tree = tree[:tree.index("\n```")]
  order = [line.split()[0].removesuffix(".py").removesuffix("/").rstrip(",")
           for line in tree.splitlines()[2:] if line.startswith("  ") and line[2] != " "]
  assert order == [unit for layer in LAYERS for unit in layer]
  on_disk = {_unit(m) for m in _modules()} - {""}
  assert on_disk == set(order), on_disk ^ set(order)


@pytest.mark.parametrize("edges,cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}, ["b", "b2", "b"]),
])
def test_find_cycle_on_known_graphs(edges, cycle):
  assert find_cycle(edges) == cycle


def test_every_package_is_a_regular_one():
  # setuptools installs only folders with an __init__.py; a namespace package would
  # import from a checkout and be missing from an installed wheel.
  for folder in [PACKAGE, *(p for p in PACKAGE.rglob("*") if p.is_dir())]:
    if any(folder.glob("*.py")):
      assert (folder / "__init__.py").is_file(), folder
