"""The package's folders are its layers, and one test holds the rules (an `ast` walk, lazy imports counted):

- each subpackage imports only itself and the layers below it: core < views < tracking < registry < search < cli;
- nothing under core/ or views/ imports mlflow, ray or click, and only search/ imports ray;
- no module imports the CLI layer except __main__;
- no import cycle between modules;
- at most MAX_TOP_LEVEL modules beside __init__ and __main__ at the top, none over MAX_LINES lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

from fakes import REPO

PACKAGE = "mnist_tracking"
LAYERS = ("core", "views", "tracking", "registry", "search", "cli")  # each may import those before it
PURE = ("core", "views")
PURE_FORBIDDEN = ("mlflow", "ray", "click")
RAY_HOME = "search"
MAX_TOP_LEVEL = 3
MAX_LINES = 350


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package under `root` (the folder holding the package), by dotted name."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """What a module imports, anywhere in it: other packages by their top name, our modules by their full name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # from mnist_tracking.core import stopping: the module stopping; from mnist_tracking.core.config import X
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(known)
            names |= submodules or {node.module}
    ours = {name for name in names if name.split(".")[0] == PACKAGE}
    return {name for name in ours if name in known} | {name.split(".")[0] for name in names - ours}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


def violations(root: Path) -> list[str]:
    """Every broken rule of the package under `root`, one line each."""
    known = modules(root)
    graph = {module: imports(path, known) for module, path in known.items()}
    found = []
    for module, imported in sorted(graph.items()):
        own = layer(module)
        for name in sorted(imported):
            other = layer(name) if name.startswith(f"{PACKAGE}.") else ""
            if own in PURE and name in PURE_FORBIDDEN:
                found.append(f"{module} ({own}/ is pure) imports {name}")
            if name == "ray" and own != RAY_HOME:
                found.append(f"{module} imports ray outside {RAY_HOME}/")
            if other == "cli" and own != "cli" and module != f"{PACKAGE}.__main__":
                found.append(f"{module} imports the CLI layer ({name})")
            elif own in LAYERS and other in LAYERS and LAYERS.index(other) > LAYERS.index(own):
                found.append(f"{module} ({own}/) imports {name} from a layer above it ({other}/)")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    top = [m for m in known if m.count(".") == 1 and layer(m) == "" and not m.endswith(("__init__", "__main__"))]
    if len(top) > MAX_TOP_LEVEL:
        found.append(f"{len(top)} modules at the top of the package (at most {MAX_TOP_LEVEL}): {', '.join(top)}")
    found += [f"{module} has {n} lines (at most {MAX_LINES})" for module, path in known.items()
              if (n := len(path.read_text().splitlines())) > MAX_LINES]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles between our modules: one path around each strongly connected group (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in graph:
                continue
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(sorted(group) + [sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_package_keeps_every_rule_of_its_folders():
    assert violations(REPO) == []


def write(root: Path, module: str, text: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root).parents:  # every folder a package
        if str(parent) != ".":
            (root / parent / "__init__.py").touch()
    path.write_text(text)


def test_each_rule_fails_when_it_is_broken(tmp_path):
    """The rules on a small package that breaks each of them once: the test above would fail on each."""
    write(tmp_path, f"{PACKAGE}.core.model", "def f():\n    import mlflow\n")  # pure imports mlflow, lazily
    write(tmp_path, f"{PACKAGE}.views.plots", "import click\nfrom mnist_tracking.tracking import runs\n")
    write(tmp_path, f"{PACKAGE}.tracking.runs", "import ray\nfrom mnist_tracking.cli import main\n")
    write(tmp_path, f"{PACKAGE}.cli.main", "from mnist_tracking.cli import exits\n")
    write(tmp_path, f"{PACKAGE}.cli.exits", "def run():\n    from mnist_tracking.cli.main import main\n")
    write(tmp_path, f"{PACKAGE}.__main__", "from mnist_tracking.cli import main\n")
    for name in ("a", "b", "c", "d"):
        write(tmp_path, f"{PACKAGE}.{name}", "\n" * (MAX_LINES + 1) if name == "a" else "")
    found = violations(tmp_path)
    assert found == [
        "mnist_tracking.core.model (core/ is pure) imports mlflow",
        "mnist_tracking.tracking.runs imports the CLI layer (mnist_tracking.cli.main)",
        "mnist_tracking.tracking.runs imports ray outside search/",
        "mnist_tracking.views.plots (views/ is pure) imports click",
        "mnist_tracking.views.plots (views/) imports mnist_tracking.tracking.runs from a layer above it (tracking/)",
        "import cycle: mnist_tracking.cli.exits -> mnist_tracking.cli.main -> mnist_tracking.cli.exits",
        "4 modules at the top of the package (at most 3): mnist_tracking.a, mnist_tracking.b, mnist_tracking.c, "
        "mnist_tracking.d",
        f"mnist_tracking.a has {MAX_LINES + 1} lines (at most {MAX_LINES})",
    ], found
