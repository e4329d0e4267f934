"""Module boundaries, checked on the source with ``ast`` (no imports, so it runs in milliseconds):
no module imports another's ``_private`` names, and functions in gpumlp/ fit on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gpumlp", "kernels", "bench", "tests")
MAX_FUNCTION_LINES = 60  # in gpumlp/: signature, docstring and body, decorators not counted


def _sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno}"


def _ours(node: ast.ImportFrom) -> bool:
    """A module of this project (relative, or gpumlp/kernels/bench/tests and the test modules)?
    Third-party private APIs are a different question (a test may need one, e.g. Numba's NRT)."""
    root = (node.module or "").split(".")[0]
    return node.level > 0 or root in PACKAGES or root == "conftest" or root.startswith("test_")


def private_imports(path: Path) -> list[str]:
    """``from x import _name`` of one of our modules anywhere in the file (module level or inside a
    function): 'file:line: from x import _name' each. A private alias of a public name is fine."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and _ours(node):
            module = "." * node.level + (node.module or "")
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{_where(path, node)}: from {module} import {alias.name}")
    return found


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions and methods (nested ones too) longer than ``limit`` lines: 'file:line: name N lines'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{_where(path, node)}: {node.name} {length} lines")
    return found


def test_the_checks_see_the_sources():
    files = _sources(*PACKAGES)
    assert {p.relative_to(ROOT).parts[0] for p in files} == set(PACKAGES)
    assert ROOT / "gpumlp" / "train.py" in files and ROOT / "tests" / "test_architecture.py" in files


def test_no_module_imports_another_modules_private_names():
    found = [hit for path in _sources(*PACKAGES) for hit in private_imports(path)]
    assert not found, "private names imported across modules (make them public or move them):\n" + "\n".join(
        found
    )


def test_no_function_in_gpumlp_is_longer_than_a_screen():
    found = [hit for path in _sources("gpumlp") for hit in long_functions(path)]
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines (split them by meaning):\n" + "\n".join(
        found
    )


@pytest.mark.parametrize(
    "source, hits",
    [
        ("from gpumlp.b import _x, y\n", ["from gpumlp.b import _x"]),
        ("def f():\n    from .m import _y as z\n", ["from .m import _y"]),
        (
            "from conftest import _h\nfrom test_kernel_parity import _d\n",
            ["from conftest import _h", "from test_kernel_parity import _d"],
        ),
        ("from numba.core.runtime import _nrt_python\n", []),
        ("from m import y as _y\nfrom __future__ import annotations\nfrom m import __version__\n", []),
    ],
)
def test_private_imports_are_found_wherever_they_are(tmp_path, source, hits):
    path = tmp_path / "mod.py"
    path.write_text(source)
    assert [hit.split(": ", 1)[1] for hit in private_imports(path)] == hits


def test_long_functions_count_signature_and_docstring_not_decorators(tmp_path):
    sixty = "@decorator\ndef ok(\n    a,\n):\n" + "    x = 1\n" * 57  # 60 lines from `def`
    method = 'class C:\n    def too_long(self):\n        """Doc."""\n' + "        x = 1\n" * 59  # 61
    path = tmp_path / "mod.py"
    path.write_text(sixty + "\n\n" + method)
    assert [hit.split(": ", 1)[1] for hit in long_functions(path)] == ["too_long 61 lines"]
