"""The model description: ``--model`` (builtin name, local folder, GGUF file, hub id) resolved once into a
``Checkpoint`` that every later stage reads: the local save_pretrained folder, its config, the per-layer plan, special
token ids, tokenizer files and position limit. Nothing downstream re-reads the config for these facts.

Everything is read from that folder exactly as a user's checkpoint would be read. A GGUF file is first dequantized
by transformers' own GGUF loader into a save_pretrained folder in the work directory (the reference is that
dequantized model); its sha256 is kept for the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from exporter import builtin, conversions, memory
from exporter.conversions import TOKENIZER_FILES, is_composite
from exporter.errors import UserError, first_line

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention")
STORED_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}  # torch -> safetensors names


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
    kind: str  # builtin | local | hub | gguf
    folder: Path  # save_pretrained layout
    config: object  # transformers PretrainedConfig
    layers: tuple[LayerSpec, ...]
    special_ids: SpecialIds
    tokenizer_files: tuple[Path, ...]
    position_limit: int | None
    source_files: dict = field(default_factory=dict)  # what the checkpoint was read from, for the manifest
    composite: Path | None = None  # the composite (vision/audio + text) checkpoint the text decoder came from

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

    def composite_description(self) -> dict:
        """What the text decoder was taken from, for the manifest."""
        config = json.loads((self.composite / "config.json").read_text())
        return {"model_type": config.get("model_type"), "architectures": config.get("architectures"),
                "text_decoder": self.model_type}

    def load_reference(self):
        """The eager reference: the checkpoint as transformers defines it, default attention. For a composite
        checkpoint, the composite model's own text-only forward (``composite_text_forward``)."""
        if self.composite is None:
            return self.load_model()
        return conversions.composite_text_forward(self.composite)

    def load_model(self, attn_implementation: str | None = None, dtype=torch.float32,
                   experts_implementation: str | None = None, on_tensor=None):
        """The causal LM in eval mode. ``None`` implementations keep transformers' defaults (the reference).

        Weights stored in another floating-point dtype (a bf16 / fp16 checkpoint loaded as fp32) are read one tensor
        at a time without a memory map (``memory.lazy_state_dict``; same values as transformers' own loading): the
        mapped file would otherwise stay resident next to the converted weights until the end of loading.
        ``on_tensor()`` is called after each tensor read on that path (progress)."""
        folder = self.folder
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise UserError(f"{folder}: no weights (*.safetensors or *.bin)")
        kwargs = {"dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if experts_implementation is not None:
            kwargs["experts_implementation"] = experts_implementation
        stored = set(memory.weight_info(folder).dtypes) if any(folder.glob("*.safetensors")) else set()
        model_class = AutoModelForCausalLM._model_mapping.get(type(self.config), None)
        try:
            if model_class is not None and stored - {STORED_DTYPES.get(dtype)}:
                state, close = memory.lazy_state_dict(folder, on_tensor)
                try:  # a fresh config: from_pretrained records the attention implementation in the one it gets
                    model, info = model_class.from_pretrained(None, config=AutoConfig.from_pretrained(folder),
                                                              state_dict=state, output_loading_info=True, **kwargs)
                finally:
                    close()
            else:
                model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any loading failure is the user's checkpoint: one line
            raise UserError(f"{folder}: could not load the weights ({first_line(exc)})") from None
        missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
        if missing:  # transformers would start those weights from random values: refuse
            raise UserError(f"{folder}: could not load the weights (the checkpoint lacks {len(missing)} weights "
                            f"of its config's model, e.g. {missing[0]})")
        return model.eval()


def resolve(spec: str, workdir: Path, gguf_file: str | None = None) -> Checkpoint:
    """Resolve ``spec`` (``builtin:<name>``, an existing folder, a ``.gguf`` file or a folder holding one, or a hub
    id) into a ``Checkpoint``; UserError (one line) when it cannot be found or read. ``gguf_file`` picks the GGUF
    file of a folder that holds several. A composite checkpoint (a text decoder inside a vision/audio model) resolves
    to its text decoder, written to ``workdir`` (``Checkpoint.composite`` keeps the original for the reference)."""
    folder, kind, sources = _resolve_folder(spec, workdir, gguf_file)
    config = read_config(folder)
    composite = None
    if is_composite(config):
        ids = special_ids(config, folder)
        composite, folder = folder, conversions.text_decoder_checkpoint(folder, config, workdir)
        config = read_config(folder)
    else:
        ids = special_ids(config, folder)
    text_config = config.get_text_config()
    limit = getattr(text_config, "max_position_embeddings", None)
    return Checkpoint(spec=spec, kind=kind, folder=folder, config=config, layers=layer_specs(text_config),
                      special_ids=ids,
                      tokenizer_files=tuple(folder / n for n in TOKENIZER_FILES if (folder / n).is_file()),
                      position_limit=int(limit) if limit else None, source_files=sources, composite=composite)


def precheck(spec: str, gguf_file: str | None = None) -> None:
    """The checks of ``resolve`` that need no conversion, download or weights loading: a bad local ``--model`` is
    refused (UserError) before any work starts."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in builtin.BUILTINS:
            raise UserError(f"unknown builtin model {name!r}; choose one of: {', '.join(builtin.names())}")
        return
    path = Path(spec).expanduser()
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if path.is_file() and path.suffix == ".gguf" or gguf_file is not None or (ggufs and not (path / "config.json").is_file()):
        if gguf_file is not None and not path.is_dir():
            raise UserError(f"--gguf-file {gguf_file}: --model {spec} is not a folder")
        gguf = path if path.is_file() else _pick_gguf(path, ggufs, gguf_file, spec)
        with open(gguf, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise UserError(f"--model {gguf}: not a GGUF file")
        return
    if path.is_dir():
        read_config(path)
        _check_weight_files(path)
        return
    if path.exists():
        raise UserError(f"--model {spec}: expected a folder in save_pretrained layout or a .gguf file")
    if spec.count("/") > 1 or spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        raise UserError(f"--model {spec}: no such folder or file")


def _check_weight_files(folder: Path) -> None:
    """Weights exist, and every safetensors file is as long as its header says (a truncated download is refused
    here, not half-way through loading)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("*.bin")):
        raise UserError(f"{folder}: no weights (*.safetensors or *.bin)")
    for path in files:
        size = path.stat().st_size
        try:
            with open(path, "rb") as handle:
                header_length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(header_length)) if 0 < header_length <= size - 8 else None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict):
            raise UserError(f"{path}: not a valid safetensors file (unreadable header)")
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        if 8 + header_length + end > size:
            raise UserError(f"{path}: truncated ({size} bytes, the header describes {8 + header_length + end})")


def _resolve_folder(spec: str, workdir: Path, gguf_file: str | None) -> tuple[Path, str, dict]:
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in builtin.BUILTINS:
            raise UserError(f"unknown builtin model {name!r}; choose one of: {', '.join(builtin.names())}")
        return builtin.materialize(name, workdir / "builtin" / name), "builtin", {}
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        if gguf_file is not None:
            raise UserError(f"--gguf-file {gguf_file}: --model {spec} is already a GGUF file")
        return _gguf(path.resolve())
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if gguf_file is not None or (ggufs and not (path / "config.json").is_file()):
            return _gguf(_pick_gguf(path, ggufs, gguf_file, spec))
        return path.resolve(), "local", {}
    if gguf_file is not None:
        raise UserError(f"--gguf-file {gguf_file}: --model {spec} is not a folder")
    if path.exists():
        raise UserError(f"--model {spec}: expected a folder in save_pretrained layout or a .gguf file")
    if spec.count("/") > 1 or spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        raise UserError(f"--model {spec}: no such folder or file")
    return _download(spec), "hub", {}


def _gguf(path: Path) -> tuple[Path, str, dict]:
    folder, entry = conversions.gguf_checkpoint(path)
    return folder, "gguf", entry


def _pick_gguf(folder: Path, ggufs: list[Path], name: str | None, spec: str) -> Path:
    if name is not None:
        chosen = folder / name
        if not chosen.is_file():
            raise UserError(f"--gguf-file {name}: no such file in {spec}"
                            + (f" (it holds {', '.join(p.name for p in ggufs)})" if ggufs else ""))
        return chosen.resolve()
    if len(ggufs) > 1:
        raise UserError(f"--model {spec} holds {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs)}); "
                        "pick one with --gguf-file NAME")
    return ggufs[0].resolve()


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
    text_type = (raw.get("text_config") or {}).get("model_type") if isinstance(raw.get("text_config"), dict) else None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and text_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(
            f"{config_path}: model_type {model_type!r} is not a causal language model known to transformers"
        )
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
