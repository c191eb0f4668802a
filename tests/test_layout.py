"""The code's layout keeps its promises: no import cycle, the data path never reaches into the control
path or up into the routes, the tests lean on nothing in bench/, and git holds no audio."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from support import REPO

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".aac", ".aiff", ".au"}
# The data path and what it stands on; none of them may import app.control (asrctl's side).
DATA_PATH = ("app.routes", "app.audio", "app.runtime", "app.engines", "app.formats", "app.jobs",
             "app.hardware", "app.config", "app.errors", "app.languages")
# Below the routes: these serve a request but never import the HTTP layer.
BELOW_ROUTES = ("app.audio", "app.runtime", "app.engines", "app.formats", "app.jobs", "app.hardware")


def modules(root: Path, package: str) -> dict[str, Path]:
    found = {}
    for path in (root / package).rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of ours ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known}


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    known = modules(root, "app")
    return {name: imports(path, known) - {name} for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "app" / "a.py").write_text("from app import b\n")
    (tmp_path / "app" / "b.py").write_text("def f():\n    from app.a import thing\n")
    (tmp_path / "app" / "c.py").write_text("import app.a\n")
    assert cycles(import_graph(tmp_path)) == [["app.a", "app.b"]]


def test_the_data_path_never_imports_the_control_path_nor_the_routes():
    wrong = {name: sorted(deps) for name, deps in import_graph().items()
             if under(name, DATA_PATH) and any(under(d, ("app.control", "app.selfcheck")) for d in deps)}
    assert wrong == {}
    upward = {name: sorted(d for d in deps if under(d, ("app.routes",)))
              for name, deps in import_graph().items() if under(name, BELOW_ROUTES)}
    assert {name: deps for name, deps in upward.items() if deps} == {}


def test_the_tests_import_nothing_from_bench():
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "bench" or n.startswith("bench.")]
    assert offenders == []


def test_git_holds_no_audio():
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True).stdout
    assert tracked.strip(), "not a git checkout"
    assert [f for f in tracked.splitlines() if Path(f).suffix.lower() in AUDIO_SUFFIXES] == []


def test_templates_ship_inside_the_package():
    from app.control.render import files

    templates = sorted(p.relative_to(files.TEMPLATES).as_posix() for p in files.TEMPLATES.rglob("*.j2"))
    assert {"nginx/nginx.conf.j2", "supervisor/instance.conf.j2", "systemd/asr-service.service.j2"} <= set(templates)
    assert files.TEMPLATES.is_relative_to(REPO / "app")
