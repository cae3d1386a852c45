"""Shared fixtures: one export of the built-in model per test session, reused by every spine test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.quiet import quiet_python_libraries

quiet_python_libraries()


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``export-model`` as a user would (a fresh process), capturing its output."""
    return subprocess.run([sys.executable, "-m", "exporter.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """The built-in tiny Llama written as a local save_pretrained folder (what a user's checkpoint looks like)."""
    from exporter.builtin import materialize

    return materialize("tiny-llama", tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """``export-model --model builtin:tiny-llama --target all`` once; the folder it wrote."""
    output = tmp_path_factory.mktemp("exports") / "tiny-llama"
    result = run_cli("--model", "builtin:tiny-llama", "--target", "all", "--output", output)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def vmap_reference(**kwargs):
    """transformers' ``sdpa_mask`` forced onto its vmap path and never skipping: the reference mask interface."""
    from transformers import masking_utils

    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=True)
    return masking_utils.sdpa_mask(**kwargs)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
