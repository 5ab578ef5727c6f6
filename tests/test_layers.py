"""The layers of lmcache_jax, as docs/architecture.md lists them, bottom first.

Every import of a module of ``lmcache_jax`` (module-level or inside a
function) must point down the list or stay in its own package, and none may
reach ``policies`` or ``experiments``. Every subpackage and top-level module
must have its place: a line ``N. `package` — ...`` of the list's first
block, where a top-level module is placed by the line naming its path
(`` `lmcache_jax/fetch.py` ``); a layer may be a top-level module itself
(``N. `api` — ... `lmcache_jax/api.py` ...``).
"""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent
LIB = ROOT / "lmcache_jax"
DOC = ROOT / "docs" / "architecture.md"
OUTSIDE = ("policies", "experiments")
ITEM = re.compile(r"^(\d+)\. `(\w+)`(.*)$")


def layers() -> tuple[dict[str, int], dict[str, str]]:
  """({package: rank from 1 at the bottom}, {top-level module: package})
  from the first numbered block of docs/architecture.md."""
  lines = DOC.read_text().splitlines()
  first = next((i for i, line in enumerate(lines) if ITEM.match(line)), None)
  assert first is not None, f"{DOC}: no numbered list of layers"
  rank, modules = {}, {}
  for line in lines[first:]:
    match = ITEM.match(line)
    if not match:
      break
    number, package, rest = int(match[1]), match[2], match[3]
    assert number == len(rank) + 1, (
        f"{DOC}: layer {package!r} is numbered {number}, expected "
        f"{len(rank) + 1}")
    assert package not in rank, f"{DOC}: layer {package!r} listed twice"
    rank[package] = number
    for path in re.findall(r"`lmcache_jax/(\w+)\.py`", rest):
      modules[path] = package
  return rank, modules


def units() -> tuple[set[str], set[str]]:
  """(subpackages, top-level modules) of lmcache_jax on disk."""
  packages = {p.parent.name for p in LIB.glob("*/__init__.py")}
  modules = {p.stem for p in LIB.glob("*.py") if p.stem != "__init__"}
  return packages, modules


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path):
  """(line, statement, names) of every import in ``path``, at any depth:
  the dotted names it imports (for ``from a import b``, ``a.b``: b may be
  a module), relative imports resolved."""
  package = module_name(path).split(".")
  if path.name != "__init__.py":
    package = package[:-1]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      yield (node.lineno, ast.unparse(node),
             [alias.name for alias in node.names])
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package[:len(package) - node.level + 1]
        base = ".".join(up + ([node.module] if node.module else []))
      yield (node.lineno, ast.unparse(node),
             [f"{base}.{alias.name}" for alias in node.names])


def owner(name: str, modules: dict[str, str]) -> str | None:
  """The layer of ``lmcache_jax.<unit>...``: a subpackage's own name, a
  top-level module's listed package; None outside lmcache_jax's units."""
  parts = name.split(".")
  if parts[0] != "lmcache_jax" or len(parts) < 2:
    return None
  return modules.get(parts[1], parts[1])


def test_every_package_and_module_has_a_layer():
  rank, placed = layers()
  packages, modules = units()
  problems = [f"subpackage lmcache_jax/{name}/ is missing from the list"
              for name in sorted(packages - set(rank))]
  problems += [f"top-level module lmcache_jax/{name}.py is in no layer (name "
               f"`lmcache_jax/{name}.py` on its layer's line)"
               for name in sorted(modules - set(placed))]
  problems += [f"layer `{name}` is no package or top-level module of "
               f"lmcache_jax" for name in sorted(set(rank) - packages - modules)]
  assert not problems, f"{DOC}, the list of layers:\n" + "\n".join(problems)


def test_imports_point_down_the_layers():
  rank, placed = layers()
  problems = []
  for path in sorted(LIB.rglob("*.py")):
    here = owner(module_name(path), placed)
    for line, statement, names in imports(path):
      there = max({owner(name, placed) for name in names} & set(rank),
                  key=rank.get, default=None)
      if here in rank and there and rank[there] > rank[here]:
        problems.append(
            f"{path.relative_to(ROOT)}:{line} `{statement}`: `{here}` (layer "
            f"{rank[here]}) may not import `{there}` (layer {rank[there]})")
  assert not problems, "imports running up the layers:\n" + "\n".join(
      problems)


def test_the_library_never_imports_policies_or_experiments():
  problems = [
      f"{path.relative_to(ROOT)}:{line} `{statement}`"
      for path in sorted(LIB.rglob("*.py"))
      for line, statement, names in imports(path)
      if any(name.split(".")[0] in OUTSIDE for name in names)]
  assert not problems, (
      "lmcache_jax imports policies/ or experiments/ (policies are objects "
      "handed in; the name → object wiring lives in experiments/):\n"
      + "\n".join(problems))
