"""Shared fixtures: built-in checkpoints written once per session, one export of the built-in model reused by the
end-to-end tests, and the CLI run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from exporter.quiet import quiet_python_libraries

quiet_python_libraries()  # before transformers / torch are imported, as the CLI does

from exporter import checkpoint  # noqa: E402
from exporter.builtin import materialize  # noqa: E402

# CI and local runs see the same property-test examples (derandomized); HYPOTHESIS_PROFILE=explore searches anew.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``export-model`` as a user would (a fresh process), capturing its output."""
    return subprocess.run([sys.executable, "-m", "exporter.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def builtin_checkpoint(tmp_path_factory):
    """``get(name, **config_overrides) -> Checkpoint``: the built-in written as a local save_pretrained folder
    (what a user's checkpoint looks like), once per session per name and overrides."""
    root = tmp_path_factory.mktemp("builtins")
    resolved: dict[tuple, checkpoint.Checkpoint] = {}

    def get(name: str, **overrides) -> checkpoint.Checkpoint:
        key = (name, *sorted(overrides.items()))
        if key not in resolved:
            folder = materialize(name, root / f"{name}-{len(resolved)}", **overrides)
            resolved[key] = checkpoint.resolve(str(folder), root)
        return resolved[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(builtin_checkpoint) -> Path:
    """The built-in tiny Llama's save_pretrained folder."""
    return builtin_checkpoint("tiny-llama").folder


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
