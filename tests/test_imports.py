"""The import graph of the package: no cycles between modules, and the device side imports only what it may.

Every `import` counts, at module level or inside a function (an import inside a function hides a cycle, it
does not remove it); only imports under `if TYPE_CHECKING:` are left out, since they never run.
"""
from __future__ import annotations

import ast
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _packages() -> dict[str, Path]:
    """pockprop subpackage -> its folder, as pyproject.toml maps them."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / path for name, path in conf["package-dir"].items()}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in _packages().items():
        for f in sorted(folder.glob("*.py")):
            out[pkg if f.name == "__init__.py" else f"{pkg}.{f.stem}"] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module `path` imports (a `from X import name` counts X.name if it is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for child in node.body for n in ast.walk(child)}
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges = {}
    for name, path in mods.items():
        targets = set()
        for imp in _imports(path, name, path.name == "__init__.py"):
            # `import a.b.c` runs a, a.b and a.b.c: each is an edge
            parts = imp.split(".")
            targets.update(".".join(parts[:k]) for k in range(1, len(parts) + 1) if ".".join(parts[:k]) in mods)
        edges[name] = targets - {name}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path, or None (iterative DFS with colours)."""
    colour: dict[str, int] = {}
    for start in sorted(edges):
        if colour.get(start):
            continue
        stack = [(start, iter(sorted(edges[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            for child in children:
                if colour.get(child, 0) == 1:
                    return path[path.index(child):] + [child]
                if not colour.get(child):
                    colour[child] = 1
                    path.append(child)
                    stack.append((child, iter(sorted(edges.get(child, ())))))
                    break
            else:
                colour[node] = 2
                path.pop()
                stack.pop()
    return None


def _own(module: str) -> bool:
    return module == "pockprop" or module.startswith("pockprop.")


def test_every_package_folder_is_mapped() -> None:
    mapped = {p.resolve() for p in _packages().values()}
    folders = {f.parent.resolve() for f in ROOT.glob("*/__init__.py")} - {(ROOT / "tests").resolve()}
    unmapped = folders - mapped - {(ROOT / "experiments").resolve()}
    assert not unmapped, f"folders with Python code that pyproject.toml does not map into pockprop: {unmapped}"


def test_no_import_cycles_between_modules() -> None:
    edges = {m: {t for t in ts if _own(t)} for m, ts in _graph().items()}
    # a package's __init__ importing its own submodules is how a package exposes them, not a cycle of logic
    for m in edges:
        edges[m] = {t for t in edges[m] if not (t.startswith(m + ".") and _modules()[m].name == "__init__.py")}
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_device_side_imports_only_numpy_onnxruntime_and_itself() -> None:
    """runtime/ and artifact/ (what the device install runs) import the stdlib, numpy, onnxruntime, optional
    extras where they are used, and only these parts of pockprop."""
    allowed_own = ("pockprop.runtime", "pockprop.artifact", "pockprop.errors", "pockprop.args")
    allowed_third = {"numpy", "onnxruntime", "PIL", "tokenizers", "flwr", "tqdm", "matplotlib"}  # extras: images, text, plot
    mods = _modules()
    bad = []
    for name, path in mods.items():
        if not name.startswith(("pockprop.runtime", "pockprop.artifact")):
            continue
        for imp in _imports(path, name, path.name == "__init__.py"):
            top = imp.split(".")[0]
            if _own(imp):
                if imp != "pockprop" and not imp.startswith(allowed_own):
                    bad.append(f"{name} imports {imp}")
            elif top not in sys.stdlib_module_names and top not in allowed_third and top != "__future__":
                bad.append(f"{name} imports {imp}")
    assert not bad, bad


def test_compiler_reaches_the_zoo_only_through_the_loader() -> None:
    edges = _graph()
    importers = sorted(m for m, ts in edges.items() if any(t.startswith("pockprop.models") for t in ts)
                       and not m.startswith("pockprop.models"))
    assert importers in ([], ["pockprop.tracing.loader"]), importers
