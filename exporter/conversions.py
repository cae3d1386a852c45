"""Checkpoints that are not a plain causal-LM folder, converted into one (in a work or cache folder) so that
everything downstream reads a save_pretrained folder as usual:

- a GGUF file, dequantized by transformers' own GGUF loader; the result is cached per GGUF sha256 under
  ``$TORCH_EXPORT_HF_CACHE/gguf`` (default ``~/.cache/torch-export-hf``), so a second export skips the conversion;
- a composite checkpoint (vision/audio + text decoder), whose text decoder is written out with its weights read
  from the composite as published; its reference is the composite model's own text-only forward.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from exporter.errors import UserError, first_line
from exporter.manifest import sha256_file

# files of a checkpoint folder beside config and weights that an export copies
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


def cache_dir() -> Path:
    """Where converted checkpoints are kept between runs."""
    return Path(os.environ.get("TORCH_EXPORT_HF_CACHE", "~/.cache/torch-export-hf")).expanduser()


def gguf_checkpoint(path: Path) -> tuple[Path, dict]:
    """The dequantized save_pretrained folder of GGUF ``path`` (config, safetensors, tokenizer from the GGUF's own
    vocabulary, generation config), converted once and cached by sha256; and the GGUF's file entry."""
    digest = sha256_file(path)
    folder = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"
    entry = {path.name: {"sha256": digest, "size": path.stat().st_size}}
    if (folder / "config.json").is_file():
        return folder, entry
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as exc:  # noqa: BLE001 - an unreadable / unsupported GGUF is the user's input: one line
            raise UserError(f"--model {path}: transformers cannot load this GGUF file ({first_line(exc)})") from None
        model.hf_quantizer = None  # the weights are plain float now; save them as such
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        del model
        os.replace(staging, folder)  # complete, or not there at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder, entry


def is_composite(config) -> bool:
    """A config whose text decoder is a sub-config (vision/audio + ``text_config``)."""
    return config.get_text_config() is not config


def _composite_model(folder: Path):
    """The composite model of ``folder`` in eval mode, in the class its config names."""
    import transformers  # the composite's class by name

    config = AutoConfig.from_pretrained(folder)
    names = [n for n in getattr(config, "architectures", None) or [] if hasattr(transformers, n)]
    cls = getattr(transformers, names[0]) if names else transformers.AutoModelForImageTextToText
    try:
        return cls.from_pretrained(folder, dtype=torch.float32).eval()
    except Exception as exc:  # noqa: BLE001 - the user's checkpoint: one line
        raise UserError(f"{folder}: could not load the composite model ({first_line(exc)})") from None


def _text_decoder(composite):
    """The composite model's own causal LM over its text decoder: the model itself when its forward runs on text
    alone, else its language model when that is a causal LM (transformers 5.24's Llama 4 wrapper fails on a
    text-only forward)."""
    probe = torch.zeros(1, 2, dtype=torch.long)
    try:
        with torch.no_grad():
            composite(input_ids=probe)
        return composite
    except Exception:  # noqa: BLE001 - the wrapper cannot run text alone: use its language model
        decoder = composite.get_decoder()
        if hasattr(decoder, "lm_head"):
            return decoder
        raise


class _TextOnly(torch.nn.Module):
    """A composite model seen as a text causal LM (``model(input_ids=...).logits``) for the reference."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)


def composite_text_forward(folder: Path):
    """The reference for a composite checkpoint: its own model (or language model), text only, default
    attention."""
    return _TextOnly(_text_decoder(_composite_model(folder))).eval()


def text_decoder_checkpoint(folder: Path, config, workdir: Path) -> Path:
    """Write the text decoder of the composite checkpoint ``folder`` as a causal-LM save_pretrained folder (its
    decoder and lm_head weights read from the composite as published, under the language model's prefix), with
    the tokenizer and generation config; returns the folder."""
    target = workdir / "text-decoder"
    target.mkdir(parents=True, exist_ok=True)
    composite = _composite_model(folder)
    decoder, head = composite.get_decoder(), composite.get_output_embeddings()
    if hasattr(decoder, "lm_head"):  # the language model is a causal LM already (Llama 4)
        text_model = decoder
    else:
        text_config = config.get_text_config()
        text_config.tie_word_embeddings = head.weight is decoder.get_input_embeddings().weight
        text_model = AutoModelForCausalLM.from_config(text_config, dtype=torch.float32)
        text_model.model.load_state_dict(decoder.state_dict())
        text_model.lm_head.load_state_dict(head.state_dict())
    text_model.save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            (target / name).write_bytes((folder / name).read_bytes())
    return target
