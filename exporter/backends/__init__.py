"""Export targets by name, each a sub-package behind ``backends.base.Backend``, imported on first use — the seam of
transformers' ``exporters/auto.py``: adding a target (OpenVINO, Core ML...) is a sub-package, one line in
``BACKENDS`` and its recipe files (see ``docs/backends.md``)."""

from __future__ import annotations

import importlib
from pathlib import Path

from exporter.backends.base import Backend, Session

# target -> "module:class", imported when first asked for
BACKENDS: dict[str, str] = {
    "executorch": "exporter.backends.executorch:ExecuTorchBackend",
    "onnx": "exporter.backends.onnx:OnnxBackend",
}

_INSTANCES: dict[str, Backend] = {}

__all__ = ["BACKENDS", "Backend", "Session", "for_artifact", "get", "open_session", "targets"]


def targets() -> tuple[str, ...]:
    """Every registered target name, in registration order (``--target all`` builds them in this order)."""
    return tuple(BACKENDS)


def get(target: str) -> Backend:
    """The backend registered as ``target`` (KeyError for an unknown name: callers validate names first)."""
    backend = _INSTANCES.get(target)
    if backend is None:
        module_name, class_name = BACKENDS[target].split(":")
        backend = _INSTANCES[target] = getattr(importlib.import_module(module_name), class_name)()
    return backend


def for_artifact(path: Path) -> Backend:
    """The backend whose artifact file ``path`` is (by file name)."""
    for target in BACKENDS:
        backend = get(target)
        if Path(path).name == backend.artifact:
            return backend
    raise ValueError(f"no runtime for {Path(path).name}")


def open_session(path: Path, threads: int | None = None) -> Session:
    """A ``Session`` over the artifact at ``path``, in its own runtime."""
    return for_artifact(path).open_session(Path(path), threads)
