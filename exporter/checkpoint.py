"""The model description: ``--model`` (builtin name, local folder, hub id) resolved once into a ``Checkpoint`` that
every later stage reads: the local save_pretrained folder, its config, the per-layer plan, special token ids,
tokenizer files and position limit. Nothing downstream re-reads the config for these facts.

Everything is read from that folder exactly as a user's checkpoint would be read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from exporter import builtin
from exporter.errors import UserError, first_line
from exporter.support import is_supported, supported_list

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention")


class SpecialIds(NamedTuple):
    """Special token ids of a checkpoint (unpacks as ``bos, eos, pad``)."""

    bos: int | None
    eos: list[int]
    pad: int | None


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer of the plan: its cache type as transformers' cache code derives it (``full_attention``,
    ``sliding_attention``, ``chunked_attention``, ``dummy``...), the type the config declares (for mask views), and
    its window (sliding window or attention chunk, keys including the query's own), if any."""

    type: str
    declared: str
    window: int | None

    @property
    def windowed(self) -> bool:
        return self.type in WINDOWED_LAYER_TYPES


def layer_specs(text_config) -> tuple[LayerSpec, ...]:
    """The per-layer plan of a text config (the one place layer types and windows are derived)."""
    types, kwargs = get_layer_types_and_kwargs(text_config)
    declared = list(getattr(text_config, "layer_types", None) or types)
    return tuple(LayerSpec(kind, shown, extra.get("sliding_window"))
                 for kind, shown, extra in zip(types, declared, kwargs))


@dataclass(frozen=True)
class Checkpoint:
    """A resolved ``--model``: where it is, what it is, and the facts every stage needs."""

    spec: str  # what the user passed
    kind: str  # builtin | local | hub
    folder: Path  # save_pretrained layout
    config: object  # transformers PretrainedConfig
    layers: tuple[LayerSpec, ...]
    special_ids: SpecialIds
    tokenizer_files: tuple[Path, ...]
    position_limit: int | None

    @property
    def text_config(self):
        return self.config.get_text_config()

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    @property
    def smallest_window(self) -> int | None:
        """The smallest sliding window / attention chunk of the layers, or None if every layer is global."""
        windows = [layer.window for layer in self.layers if layer.window]
        return min(windows) if windows else None

    def load_model(self, attn_implementation: str | None = None, dtype=torch.float32,
                   experts_implementation: str | None = None):
        """The causal LM in eval mode. ``None`` implementations keep transformers' defaults (the reference)."""
        folder = self.folder
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise UserError(f"{folder}: no weights (*.safetensors or *.bin)")
        kwargs = {"dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if experts_implementation is not None:
            kwargs["experts_implementation"] = experts_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any loading failure is the user's checkpoint: one line
            raise UserError(f"{folder}: could not load the weights ({first_line(exc)})") from None
        return model.eval()


def resolve(spec: str, workdir: Path) -> Checkpoint:
    """Resolve ``spec`` (``builtin:<name>``, an existing folder, or a hub id) into a ``Checkpoint``; UserError (one
    line) when it cannot be found or read."""
    folder, kind = _resolve_folder(spec, workdir)
    config = read_config(folder)
    text_config = config.get_text_config()
    limit = getattr(text_config, "max_position_embeddings", None)
    return Checkpoint(spec=spec, kind=kind, folder=folder, config=config, layers=layer_specs(text_config),
                      special_ids=special_ids(config, folder),
                      tokenizer_files=tuple(folder / n for n in TOKENIZER_FILES if (folder / n).is_file()),
                      position_limit=int(limit) if limit else None)


def _resolve_folder(spec: str, workdir: Path) -> tuple[Path, str]:
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
    # imported here: only a hub id needs huggingface_hub's network stack
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, auth: all one-line errors for the user
        raise UserError(f"--model {repo_id}: could not download from the Hugging Face Hub ({first_line(exc)})") \
            from None


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
    model_type = raw["model_type"]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(
            f"{config_path}: model_type {model_type!r} is not a causal language model known to transformers"
        )
    if not is_supported(model_type):
        raise UserError(f"{config_path}: model_type {model_type!r} is not supported yet; supported: {supported_list()}")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any parse failure of the user's config: one line
        raise UserError(f"{config_path}: transformers cannot read it ({first_line(exc)})") from None


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
