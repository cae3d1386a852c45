"""``manifest.json``: what was exported, from what, with which tools, and the hash of every file."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from exporter.errors import UserError

PACKAGES = ("torch", "executorch", "transformers", "torchao", "onnx", "onnxruntime", "onnxscript",
            "onnxruntime-genai", "tokenizers")
TOOL_NAME = "torch-export-hf"


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape an artifact's bytes."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path, exclude: tuple[str, ...] = ("manifest.json",)) -> dict[str, dict]:
    """``{relative name: {sha256, size}}`` for every file in ``folder`` (sorted, manifest itself excluded)."""
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in exclude:
            entries[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return entries


def write_manifest(folder: Path, body: dict) -> dict:
    """Write ``manifest.json`` = ``body`` + tool/package versions + file hashes; returns what was written."""
    try:
        tool_version = metadata.version(TOOL_NAME)
    except metadata.PackageNotFoundError:
        tool_version = None
    manifest = {"tool": {"name": TOOL_NAME, "version": tool_version}, **body,
                "packages": package_versions(), "files": file_entries(folder)}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def check_integrity(folder: Path) -> dict:
    """Read ``folder/manifest.json`` and check every listed file's size and sha256.

    Returns the manifest; raises ``UserError`` naming the first missing or corrupted file (a flipped byte is
    reported as corruption, never as a runtime crash), or a missing/unreadable manifest.
    """
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise UserError(f"{folder}: no such artifact folder")
    if not path.is_file():
        raise UserError(f"{folder}: no manifest.json (not an export-model output folder)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: corrupted manifest ({type(exc).__name__})") from None
    for name, entry in files.items():
        file = folder / name
        if not file.is_file():
            raise UserError(f"{folder}: {name} is missing (listed in manifest.json)")
        if file.stat().st_size != entry.get("size") or sha256_file(file) != entry.get("sha256"):
            raise UserError(f"{folder}: {name} is corrupted (sha256 does not match manifest.json)")
    return manifest
