"""The layout rules of docs/backends.md and README's Layout section, checked: no import cycles, no module past
~400 lines, nothing outside a backend names a target, backends import nothing heavy at module level."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from exporter import backends

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 400


def _sources() -> list[Path]:
    return [p for package in ("exporter", "attention", "masks") for p in (ROOT / package).rglob("*.py")]


def test_no_import_cycles():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_cycles.py")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout


def test_no_module_past_the_size_limit():
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_nothing_outside_a_backend_branches_on_a_target_name():
    """A comparison with a target's name (``target == "onnx"``, ``t in ("executorch", ...)``) outside
    ``exporter/backends/`` would be a per-target branch."""
    offenders = []
    for path in _sources():
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("exporter/backends/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c for side in [node.left, *node.comparators] for c in ast.walk(side)
                             if isinstance(c, ast.Constant)]
                if any(c.value in backends.targets() for c in constants):
                    offenders.append(f"{relative}:{node.lineno}")
    assert not offenders, offenders


def test_backend_modules_import_no_runtime_at_module_level():
    """Listing targets and validating recipes must not load ExecuTorch, onnxruntime or torchao."""
    code = ("import sys; from exporter import backends, recipes; [backends.get(t) for t in backends.targets()]; "
            "[recipes.load(n) for n in recipes.available()]; "
            "print([m for m in ('executorch', 'onnxruntime', 'torchao', 'onnx') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
