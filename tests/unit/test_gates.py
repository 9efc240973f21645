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
    r = _run(str(BIN / "mypy"), "libs", "services", "gateway", "pggateway")
    assert r.returncode == 0, r.stdout + r.stderr
