"""The library's layout promises, read from the source with `ast` (no import of the code under test).

- No import cycle inside `spellm_ds`, counting function-local imports and the package `__init__` that
  importing a submodule runs first.
- No library module over 500 lines.
- No private name (`_x`) of one module used by another, in the library, tests, benchmarks or examples.
- The trainer's loop reads no environment variable: test hooks plug in as callbacks.
- `pip wheel .` gives a wheel whose only top-level package is `spellm_ds`.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "spellm_ds"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _library() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(LIB.rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The library modules one import statement loads, submodules and their parent packages included."""
    targets: set[str] = set()
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, node.module] if node.module else base)
        else:
            source = node.module or ""
        targets = {source} | {f"{source}.{alias.name}" for alias in node.names}
    loaded = set()
    for target in targets:
        parts = target.split(".")
        loaded |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {name for name in loaded if name in known}


def import_graph() -> dict[str, set[str]]:
    """Module -> the library modules it imports anywhere in its body (lazy imports included)."""
    modules = _library()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _imported(node, name, path.name == "__init__.py", known)
        parts = name.split(".")
        # importing a module runs its packages' __init__ first, so importing them again from it is no edge
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
        graph[name] = edges - ancestors - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_cycle_finder_finds_a_known_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_and_lazy_imports_are_edges():
    tree = ast.parse("def f():\n    from .b import x\n    import spellm_ds.c.d\n")
    known = {"spellm_ds", "spellm_ds.a", "spellm_ds.b", "spellm_ds.c", "spellm_ds.c.d"}
    edges = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            edges |= _imported(node, "spellm_ds.a", False, known)
    assert edges == {"spellm_ds", "spellm_ds.b", "spellm_ds.c", "spellm_ds.c.d"}


def test_no_import_cycle_in_the_library():
    graph = import_graph()
    assert len(graph) > 30
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_library_module_over_500_lines():
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines()) for p in LIB.rglob("*.py")
    }
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def _private_uses(path: Path) -> list[str]:
    """`from spellm_ds... import _x` and `module._x` where `module` is an imported library module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bound: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spellm_ds"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{alias.name}")
                bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("spellm_ds"):
                    bound.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
        ):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_private_use_finder_sees_both_forms(tmp_path):
    probe = REPO / "tests" / "_layout_probe.py"
    probe.write_text("from spellm_ds.a import _x\nimport spellm_ds.b as b\nb._y()\nb.z()\n")
    try:
        assert [f.split(": ")[1] for f in _private_uses(probe)] == ["spellm_ds.a._x", "b._y"]
    finally:
        probe.unlink()


def test_no_private_name_is_used_across_modules():
    found = []
    for folder in ("spellm_ds", "tests", "bench", "examples"):
        for path in sorted((REPO / folder).rglob("*.py")):
            found += _private_uses(path)
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_training_loop_reads_no_environment_variable():
    path = LIB / "train" / "loop.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    reads = [
        node.lineno
        for node in ast.walk(tree)
        if (isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv", "environb"})
        or (isinstance(node, ast.Name) and node.id in {"environ", "getenv"})
    ]
    assert not reads, f"{path.relative_to(REPO)} reads the environment at lines {reads}"


@pytest.mark.timeout(300)
def test_the_wheel_holds_the_library_alone(tmp_path):
    # a copy of the tracked tree, so the build leaves nothing in the checkout
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    src = tmp_path / "src"
    for name in listed.stdout.split():
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run([*cmd, "-w", str(tmp_path)], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("spellm_ds-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        declared = zf.read(top_level).decode().split()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"spellm_ds"}
    assert declared == ["spellm_ds"]
    for package in (
        "charset",
        "cli",
        "config",
        "data",
        "eval",
        "export",
        "inference",
        "model",
        "plan",
        "train",
    ):
        assert f"spellm_ds/{package}/__init__.py" in names
