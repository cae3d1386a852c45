"""Resolve ``--model`` (builtin name, local folder, hub id) to a local save_pretrained folder, and load it.

Everything downstream reads the model from that folder, exactly as a user's checkpoint would be read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from exporter import builtin
from exporter.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


def resolve_model_dir(spec: str, workdir: Path) -> tuple[Path, str]:
    """Return (local folder, source kind) for ``spec``: ``builtin:<name>``, an existing folder, or a hub id."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in builtin.BUILTINS:
            raise UserError(f"unknown builtin model {name!r}; choose one of: {', '.join(builtin.names())}")
        return builtin.materialize(name, workdir / "builtin" / name), "builtin"
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {spec}: expected a folder in save_pretrained layout, got a file")
        return path.resolve(), "local"
    if spec.count("/") > 1 or spec.startswith((".", "/", "~")):
        raise UserError(f"--model {spec}: no such folder")
    return _download(spec), "hub"


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, auth: all one-line errors for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model {repo_id}: could not download from the Hugging Face Hub ({reason})") from None


def read_config(model_dir: Path):
    """The checkpoint's transformers config; a one-line UserError if missing, malformed or of an unknown type."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{model_dir}: no config.json (expected a save_pretrained folder)")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise UserError(f"{config_path}: no model_type field")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = raw["model_type"]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(
            f"{config_path}: model_type {model_type!r} is not a causal language model known to transformers"
        )
    from exporter.support import is_supported, supported_list

    if not is_supported(model_type):
        raise UserError(f"{config_path}: model_type {model_type!r} is not supported yet; supported: {supported_list()}")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise UserError(f"{config_path}: transformers cannot read it ({_first_line(exc)})") from None


def load_model(model_dir: Path, attn_implementation: str | None = None, dtype=torch.float32,
               experts_implementation: str | None = None):
    """Load the causal LM in eval mode. ``None`` implementations keep transformers' defaults (the reference)."""
    from transformers import AutoModelForCausalLM

    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise UserError(f"{model_dir}: no weights (*.safetensors or *.bin)")
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except Exception as exc:
        raise UserError(f"{model_dir}: could not load the weights ({_first_line(exc)})") from None
    return model.eval()


def tokenizer_files(model_dir: Path) -> list[Path]:
    """Tokenizer files present in the folder (tokenizer.json first)."""
    return [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class SpecialIds(NamedTuple):
    """Special token ids of a checkpoint (unpacks as ``bos, eos, pad``)."""

    bos: int | None
    eos: list[int]
    pad: int | None


def special_ids(config, model_dir: Path) -> SpecialIds:
    """(bos id, eos ids, pad id) from the config and generation config."""
    text = config.get_text_config()
    eos: list[int] = []
    sources = [getattr(text, "eos_token_id", None), getattr(config, "eos_token_id", None)]
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        try:
            sources.append(json.loads(gen_path.read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, AttributeError):
            pass
    for value in sources:
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in eos:
                eos.append(token)
    bos = getattr(text, "bos_token_id", None) or getattr(config, "bos_token_id", None)
    pad = getattr(text, "pad_token_id", None)
    return SpecialIds(bos, eos, pad)


def smallest_window(config) -> int | None:
    """The smallest sliding window / attention chunk of the model's layers, or None if every layer is global."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    _, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config())
    windows = [kwargs["sliding_window"] for kwargs in layer_kwargs if kwargs.get("sliding_window")]
    return min(windows) if windows else None
