"""The code gates run with the suite: lint, format and types (STYLE.md §8)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_ruff_lint_is_clean():
    """`ruff check` finds nothing (every disabled rule carries its reason in pyproject.toml)."""
    r = _run(str(BIN / "ruff"), "check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_clean():
    """The code is formatted as `ruff format` would."""
    r = _run(str(BIN / "ruff"), "format", "--check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_is_clean():
    """mypy passes on our code (generated stubs are typed by mypy-protobuf)."""
    r = _run(str(BIN / "mypy"), "libs", "services", "gateway", "pggateway", "ops")
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_import_cycle_inside_pggateway():
    """The PG Gateway's modules import each other without a cycle (TYPE_CHECKING imports count:
    a cycle hidden there is still two modules that cannot be understood one at a time)."""
    import ast

    pkg = ROOT / "pggateway"
    graph: dict[str, set[str]] = {}
    for path in pkg.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "pggateway":
                    deps.update(a.name for a in node.names)
                elif node.module.startswith("pggateway."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pggateway."))
        graph[path.stem] = deps - {path.stem}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return [*trail, nxt]
                if nxt not in trail:
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert cycles == [], cycles
