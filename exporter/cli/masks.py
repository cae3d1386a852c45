"""``export-model masks``: what each layer type of a model attends to, as a small text grid.

Masks are built the way an exported decoder builds them: transformers' own mask creator for the layer type
(``create_causal_mask``, ``create_sliding_window_causal_mask``, ``create_chunked_causal_mask``...) called with
``_attn_implementation="export_safe"``, i.e. with this project's broadcast mask builder, over a static cache whose
slot ``i`` holds position ``i`` (the query offset is a tensor, as in the exported programs). Each grid is checked
against the same call with transformers' eager implementation; a difference is shown and exits with code 1.

Only the config is read (no weights are loaded). Model-specific overlays that a model's ``forward`` adds itself
(for example Gemma 3's bidirectional image-token blocks) are not part of the per-layer-type creators shown here.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING, create_recurrent_attention_mask

import attention
from exporter import checkpoint
from exporter.checkpoint import LayerSpec
from exporter.cli.common import EXIT_FAILED, EXIT_OK, ArgumentParser, fail
from exporter.errors import UserError, first_line

NAME = attention.EXPORT_SAFE  # the attention implementation the exporter registers
MAX_WIDTH = 128  # key positions per grid (offset + prompt length)
ATTEND, MASKED = "■", "⬚"


class SlotLayer(CacheLayerMixin):
    """A static cache layer of ``length`` slots (slot ``i`` = position ``i``); the query offset is a 0-d tensor."""

    is_compileable = True

    def __init__(self, length: int, positions: torch.Tensor, sliding: bool):
        super().__init__()
        self.length, self.positions, self.is_sliding = length, positions, sliding
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("a SlotLayer only sizes masks")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Every slot is in the mask; slot ``i`` holds position ``i``."""
        return self.length, 0

    def get_seq_length(self):
        """Position of the first query (a tensor, like the exported caches)."""
        return self.positions[0]

    def get_max_length(self) -> int:
        return self.length


class SlotCache(Cache):
    """A transformers ``Cache`` of ``SlotLayer``s, one per decoder layer, for mask creation only."""

    def __init__(self, layers: tuple[LayerSpec, ...], length: int, positions: torch.Tensor):
        super().__init__(layers=[SlotLayer(length, positions, layer.windowed) for layer in layers])


def layer_masks(text_config, layers: tuple[LayerSpec, ...], prompt_len: int, offset: int,
                left_padding: int = 0) -> list[dict]:
    """Per distinct layer type: the creator used, the layers, our mask and transformers' eager mask ``[Q, KV]``.

    A layer type without an attention mask (recurrent layers) or without a transformers creator has ``mask=None``
    and a ``note``.
    """
    attention.register(NAME)
    types = [layer.declared for layer in layers]
    total = offset + prompt_len
    positions = torch.arange(offset, total)
    cache = SlotCache(layers, total, positions)
    attention_mask = None
    if left_padding:
        attention_mask = torch.ones(1, total, dtype=torch.long)
        attention_mask[0, :left_padding] = 0
    kwargs = dict(inputs_embeds=torch.zeros(1, prompt_len, 1), attention_mask=attention_mask, cache=cache,
                  position_ids=positions[None])
    views = []
    for kind in dict.fromkeys(types):
        layers = [i for i, t in enumerate(types) if t == kind]
        creators = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.get(kind)
        if creators is None:
            views.append(dict(kind=kind, layers=layers, creator=None, mask=None, reference=None,
                              note="transformers has no mask creator for this layer type"))
            continue
        items = creators.items() if isinstance(creators, dict) else [(kind, creators)]
        for sub_kind, creator in items:
            label = kind if sub_kind == kind else f"{kind} / {sub_kind}"
            if creator is create_recurrent_attention_mask:
                views.append(dict(kind=label, layers=layers, creator=_name(creator), mask=None, reference=None,
                                  note="recurrent state, no attention mask"))
                continue
            ours = _create(text_config, NAME, creator, kwargs)
            eager = _create(text_config, "eager", creator, kwargs)
            reference = torch.ones_like(ours) if eager is None else eager == 0
            views.append(dict(kind=label, layers=layers, creator=_name(creator), mask=ours[0, 0],
                              reference=reference[0, 0], note=None))
    return views


def _name(creator) -> str:
    return getattr(creator, "__name__", None) or getattr(getattr(creator, "func", None), "__name__", str(creator))


def _create(text_config, implementation: str, creator, kwargs):
    previous = text_config._attn_implementation
    text_config._attn_implementation = implementation
    try:
        return creator(config=text_config, **kwargs)
    except ValueError as exc:  # e.g. a sliding layer type without sliding_window in the config
        raise UserError(f"transformers cannot build the {_name(creator)} mask for this config "
                        f"({first_line(exc, 1000)})") from None
    finally:
        text_config._attn_implementation = previous


def _symbols() -> tuple[str, str]:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        (ATTEND + MASKED).encode(encoding)
        return ATTEND, MASKED
    except (UnicodeEncodeError, LookupError):
        return "#", "."


def render_grid(mask: torch.Tensor, offset: int, symbols: tuple[str, str] = (ATTEND, MASKED)) -> list[str]:
    """Rows = query positions (``offset`` ...), columns = key positions (0 ...), header digits stacked."""
    attend, masked = symbols
    queries, keys = mask.shape
    label_width = len(str(offset + queries - 1)) + 2
    digits = len(str(keys - 1))
    lines = []
    for level in range(digits):
        header = " ".join(str(k).rjust(digits)[level] for k in range(keys))
        lines.append(" " * (label_width + 2) + header)
    for row in range(queries):
        cells = " ".join(attend if bool(mask[row, k]) else masked for k in range(keys))
        lines.append(f"q{offset + row}".rjust(label_width) + "  " + cells)
    return lines


def _ranges(layers: list[int]) -> str:
    parts, start = [], None
    for i, layer in enumerate(layers):
        start = layer if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)


def describe(text_config, kind: str) -> str:
    """The config values that shape this layer type's pattern."""
    details = []
    if "sliding" in kind and getattr(text_config, "sliding_window", None) is not None:
        details.append(f"sliding_window={text_config.sliding_window}")
    if "chunked" in kind and getattr(text_config, "attention_chunk_size", None) is not None:
        details.append(f"attention_chunk_size={text_config.attention_chunk_size}")
    if not getattr(text_config, "is_causal", True):
        details.append("is_causal=False")
    return ", ".join(details)


def report(text_config, layers: tuple[LayerSpec, ...], model_label: str, prompt_len: int, offset: int,
           left_padding: int) -> tuple[str, bool]:
    """The printable view and whether every mask matched transformers' eager mask."""
    symbols = _symbols()
    total = offset + prompt_len
    views = layer_masks(text_config, layers, prompt_len, offset, left_padding)
    lines = [f"{model_label}: {len(layers)} layers; masks from transformers' creators "
             f"with attention '{NAME}'",
             f"queries at positions {offset}..{total - 1} (--offset {offset}, --prompt-len {prompt_len}), "
             f"keys at cache slots 0..{total - 1}" + (f", first {left_padding} positions padding" if left_padding
                                                     else ""),
             f"{symbols[0]} attends   {symbols[1]} masked"]
    all_match = True
    for view in views:
        extra = describe(text_config, view["kind"])
        header = f"{view['kind']} (layers {_ranges(view['layers'])})"
        header += f" via {view['creator']}" if view["creator"] else ""
        header += f"; {extra}" if extra else ""
        lines += ["", header]
        if view["mask"] is None:
            lines.append(f"  {view['note']}")
            continue
        lines += render_grid(view["mask"], offset, symbols)
        seen = view["mask"].sum(-1)
        match = torch.equal(view["mask"], view["reference"])
        all_match &= match
        lines.append(f"  keys seen per query: {int(seen.min())}..{int(seen.max())}; "
                     + ("matches transformers' eager mask" if match else "DIFFERS from transformers' eager mask:"))
        if not match:
            lines += render_grid(view["reference"], offset, symbols)
    return "\n".join(lines), all_match


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="export-model masks",
                            description="Print each layer type's attention mask pattern as a text grid.")
    parser.add_argument("--model", required=True,
                        help="hub id, local save_pretrained folder, .gguf file, or builtin:<name>")
    parser.add_argument("--gguf-file", help="the GGUF file to read when the --model folder holds several")
    parser.add_argument("--prompt-len", type=int, default=8, help="number of query tokens (default 8)")
    parser.add_argument("--offset", type=int, default=0, help="tokens already in the cache before them (default 0)")
    parser.add_argument("--left-padding", type=int, default=0,
                        help="how many of the first positions are padding (default 0)")
    return parser


def cmd_masks(argv: list[str]) -> int:
    """``export-model masks --model M [--prompt-len N --offset K --left-padding P]``: 0 ok, 1 mismatch, 2 bad input."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors are already printed as one line
        return int(exc.code or 0)
    try:
        if args.prompt_len < 1:
            raise UserError(f"--prompt-len must be at least 1, got {args.prompt_len}")
        if args.offset < 0:
            raise UserError(f"--offset must be >= 0, got {args.offset}")
        if args.offset + args.prompt_len > MAX_WIDTH:
            raise UserError(f"--offset + --prompt-len must be at most {MAX_WIDTH} (a grid that fits a terminal), "
                            f"got {args.offset + args.prompt_len}")
        if not 0 <= args.left_padding < args.offset + args.prompt_len:
            raise UserError(f"--left-padding must be in [0, {args.offset + args.prompt_len - 1}], "
                            f"got {args.left_padding}")
        with tempfile.TemporaryDirectory(prefix="export-model-masks-") as workdir:
            model = checkpoint.resolve(args.model, Path(workdir), args.gguf_file)
        text, matched = report(model.text_config, model.layers, f"{args.model} ({model.model_type})",
                               args.prompt_len, args.offset, args.left_padding)
    except UserError as exc:
        return fail(str(exc))
    print(text)
    return EXIT_OK if matched else EXIT_FAILED
