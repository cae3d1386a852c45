"""Export cleanliness of every mask type: strict ``torch.export`` under a dynamic query length, a graph with no
vmap and no data-dependent nodes, and one exported program that reproduces the eager mask for several lengths in
ExecuTorch and in onnxruntime.

Mask modules build their mask as the exported decoders do: transformers' own creators (``create_causal_mask`` &
co.) with ``_attn_implementation="export_safe"`` over a static cache (``KV`` slots, slot i = position i, tensor
``q_offset`` taken from the input positions) or a ring-buffer cache (``W`` ring slots + this forward's keys, per-key
positions as a 1D ``kv_offset``); the additive case calls our builder directly. Inputs are 1D positions ``[S]``
plus, where a case needs them, ``[2, T]`` padding masks / block ids.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from transformers import Gemma3TextConfig, LlamaConfig, Llama4TextConfig, MistralConfig
from transformers import masking_utils as mu
from transformers.cache_utils import Cache
from transformers.models.gemma3.modeling_gemma3 import _bidirectional_window_overlay as gemma3_window_overlay

import attention
import masks
from exporter.checkpoint import LayerSpec
from exporter.cli.masks import SlotCache, SlotLayer
from tests.conftest import vmap_reference

NAME = "export_safe"
REFERENCE = "test_export_vmap_reference"
KV = 12  # cache slots
RING = 5  # ring-buffer slots (= the sliding window of the ring case)
INVALID_POSITION = -(1 << 30)  # a never-written ring slot
BATCH = 2
WINDOW, CHUNK = 3, 4
SEQ = Dim("seq_len", min=1, max=KV)
TOTAL = Dim("total_len", min=1, max=KV)
# (first position, query length): prefill, decode, chunked prefill, full cache, last slot
LENGTHS = [(0, 5), (5, 1), (6, 3), (0, KV), (KV - 1, 1), (2, 7)]
EXAMPLE = (2, 3)  # the trace example: S=3, T=5 (distinct, so nothing specialises on S == T)
SMALL = dict(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=16,
             intermediate_size=8, num_hidden_layers=2)


@pytest.fixture(scope="module", autouse=True)
def registered():
    masks.register(NAME)
    attention.register(NAME)
    mu.AttentionMaskInterface.register(REFERENCE, vmap_reference)


# ---------------------------------------------------------------- inputs


def padding_mask(total: int) -> torch.Tensor:
    """[2, T]: row 0 right-padded by one token (T >= 4), row 1 left-padded by up to two."""
    mask = torch.ones(BATCH, total, dtype=torch.bool)
    if total >= 4:
        mask[0, -1] = False
    mask[1, : min(2, total - 1)] = False
    return mask


def block_ids(total: int) -> torch.Tensor:
    """[2, T] image-token blocks (-1 = text), cut at T like a real prompt."""
    ids = torch.full((BATCH, KV), -1, dtype=torch.long)
    ids[0, 2:5] = 0
    ids[1, 1:4] = 0
    ids[1, 6:8] = 1
    return ids[:, :total].contiguous()


# ---------------------------------------------------------------- mask modules


class RingLayer(SlotLayer):
    """``RING`` ring slots (positions before this forward, slot ``p % RING``) followed by this forward's keys."""

    def __init__(self, positions: torch.Tensor):
        super().__init__(RING + positions.shape[0], positions, sliding=True)

    def key_positions(self) -> torch.Tensor:
        ring = masks.ring_slot_positions(self.positions[0], RING, INVALID_POSITION)
        return torch.cat([ring, self.positions])

    def get_mask_sizes(self, query_length: int):
        """``(RING + S, per-key offsets [RING + S])``: a symbolic length and a 1D ``kv_offset``."""
        length = RING + query_length
        return length, self.key_positions() - torch.arange(length)


def make_cache(kind: str, input_pos: torch.Tensor, layers: int = 2):
    if kind == "ring":
        return Cache(layers=[RingLayer(input_pos) for _ in range(layers)])
    return SlotCache((LayerSpec("sliding_attention", "sliding_attention", WINDOW),) * layers, KV, input_pos)


class CreatorMask(nn.Module):
    """One layer's mask from a transformers creator over a static (``KV`` slots) or ring cache."""

    def __init__(self, config, creator, overlay: str | None = None, reference: bool = False, cache: str = "slots"):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.config._attn_implementation = REFERENCE if reference else NAME
        self.creator, self.overlay, self.reference, self.cache = creator, overlay, reference, cache

    def forward(self, input_pos, attention_mask=None, block_sequence_ids=None):
        cache = make_cache(self.cache, input_pos)
        kwargs = {}
        if self.overlay == "gemma3_blocks":  # Gemma 3 sliding layers with images: AND(window, OR(causal, blocks))
            total = block_sequence_ids.shape[-1]  # transformers' own overlay on ids padded with -1
            blocks = mu.blockwise_overlay(F.pad(block_sequence_ids, (0, KV - total), value=-1))
            kwargs.update(or_mask_function=blocks, and_mask_function=mu.sliding_window_overlay(WINDOW))
        elif self.overlay == "gemma3_bidirectional":  # use_bidirectional_attention on sliding layers
            kwargs["or_mask_function"] = gemma3_window_overlay(WINDOW)
        embeds = torch.zeros(BATCH, input_pos.shape[0], 1)
        if self.creator in (mu.create_bidirectional_mask, mu.create_bidirectional_sliding_window_mask):
            return self.creator(config=self.config, inputs_embeds=embeds, attention_mask=attention_mask, cache=cache,
                                **kwargs)
        return self.creator(config=self.config, inputs_embeds=embeds, attention_mask=attention_mask, cache=cache,
                            position_ids=input_pos[None].expand(BATCH, -1), **kwargs)


class AdditiveChunkedMask(nn.Module):
    """Eager-style float mask: chunked causal with left padding (counted as create_chunked_causal_mask does)."""

    def forward(self, input_pos, attention_mask):
        left_padding = (attention_mask.cumsum(dim=-1) == torch.zeros_like(attention_mask)).sum(dim=-1)
        chunked = mu.chunked_causal_mask_function(CHUNK, left_padding)
        return masks.additive_mask(BATCH, input_pos.shape[0], KV, q_offset=input_pos[0], mask_function=chunked,
                                   attention_mask=attention_mask, dtype=torch.float32)


# ---------------------------------------------------------------- cases


class RingReference(nn.Module):
    """transformers' mask over absolute positions (static slots, vmap reference) read at each ring key's position;
    never-written slots masked."""

    def __init__(self, config, creator):
        super().__init__()
        self.absolute = CreatorMask(config, creator, reference=True)

    def forward(self, input_pos, attention_mask):
        key_positions = RingLayer(input_pos).key_positions()
        absolute = self.absolute(input_pos, attention_mask)
        return absolute[..., key_positions.clamp(min=0)] & (key_positions >= 0)


def additive_reference(input_pos, attention_mask):
    left = (attention_mask.cumsum(dim=-1) == torch.zeros_like(attention_mask)).sum(dim=-1)
    return mu.eager_mask(batch_size=BATCH, q_length=input_pos.shape[0], kv_length=KV, q_offset=input_pos[0],
                         mask_function=mu.chunked_causal_mask_function(CHUNK, left), attention_mask=attention_mask,
                         dtype=torch.float32, use_vmap=True)


@dataclass
class Case:
    module: nn.Module
    reference: object  # callable(*inputs) -> transformers' mask for the same inputs
    inputs: str  # which inputs the module takes: "p" positions, "m" padding mask, "b" block ids

    def make_inputs(self, start: int, seq: int) -> tuple:
        total = start + seq
        make = {"p": lambda: torch.arange(start, total), "m": lambda: padding_mask(total),
                "b": lambda: block_ids(total)}
        return tuple(make[key]() for key in self.inputs)

    def dynamic_shapes(self) -> tuple:
        shapes = {"p": {0: SEQ}, "m": {1: TOTAL}, "b": {1: TOTAL}}
        return tuple(shapes[key] for key in self.inputs)


def creator_case(config, creator, inputs, overlay=None) -> Case:
    return Case(CreatorMask(config, creator, overlay), CreatorMask(config, creator, overlay, reference=True), inputs)


def build_cases() -> dict[str, Case]:
    llama = LlamaConfig(**SMALL)
    gemma3 = Gemma3TextConfig(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], **SMALL)
    llama4 = Llama4TextConfig(attention_chunk_size=CHUNK, layer_types=["chunked_attention", "full_attention"], **SMALL)
    mistral = MistralConfig(sliding_window=RING, **SMALL)
    return {
        "causal": creator_case(llama, mu.create_causal_mask, "p"),
        "sliding_window_causal": creator_case(gemma3, mu.create_sliding_window_causal_mask, "p"),
        "chunked_causal_left_padding": creator_case(llama4, mu.create_chunked_causal_mask, "pm"),
        "bidirectional": creator_case(llama, mu.create_bidirectional_mask, "pm"),
        "bidirectional_sliding_window": creator_case(gemma3, mu.create_bidirectional_sliding_window_mask, "pm"),
        "padding": creator_case(llama, mu.create_causal_mask, "pm"),
        "overlay_gemma3_image_blocks": creator_case(gemma3, mu.create_causal_mask, "pmb", "gemma3_blocks"),
        "overlay_gemma3_bidirectional_window": creator_case(gemma3, mu.create_sliding_window_causal_mask, "pm",
                                                            "gemma3_bidirectional"),
        "ring_buffer_sliding_window": Case(
            CreatorMask(mistral, mu.create_sliding_window_causal_mask, cache="ring"),
            RingReference(mistral, mu.create_sliding_window_causal_mask), "pm"),
        "additive_chunked": Case(AdditiveChunkedMask(), additive_reference, "pm"),
    }


CASES = build_cases()


# ---------------------------------------------------------------- graph inspection

FORBIDDEN = ("vmap", "batch_dim", "lazy_load_decompositions", "_local_scalar_dense", "aten.item", "assert_scalar",
             "assert_async", "sym_constrain_range", "higher_order", "nonzero", "masked_select", "aten.unique")


def graph_problems(program) -> list[str]:
    """vmap / data-dependent nodes in the exported graph, before and after decomposition to core ATen."""
    problems = []
    for stage, graph_module in (("export", program.graph_module),
                                ("decomposed", program.run_decompositions().graph_module)):
        for node in graph_module.graph.nodes:
            if node.op != "call_function":
                continue
            label = f"{node.target} {getattr(node.target, '__name__', '')}"
            if any(bad in label for bad in FORBIDDEN):
                problems.append(f"{stage}: {node.format_node()}")
            if free_unbacked_symbols(node.meta.get("val")):
                problems.append(f"{stage}: data-dependent value in {node.format_node()}")
    unbacked = [str(s) for s in program.range_constraints if free_unbacked_symbols(s)]
    if unbacked:
        problems.append(f"unbacked symbols in range constraints: {unbacked}")
    return problems


def strict_export(module, example, dynamic_shapes):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=True)


def test_graph_check_catches_vmap_and_item():
    """The checker is not vacuous: transformers' vmap path and an ``.item()`` offset are both flagged."""

    class VmapMask(nn.Module):
        def forward(self, input_pos):
            return mu.sdpa_mask(1, input_pos.shape[0], KV, q_offset=input_pos[0], allow_is_causal_skip=False,
                                use_vmap=True)

    class ItemMask(nn.Module):
        def forward(self, input_pos):
            return masks.bool_mask(1, input_pos.shape[0], KV, q_offset=input_pos[0].item())

    for module, marker in ((VmapMask(), "batch_dim"), (ItemMask(), "item")):
        problems = graph_problems(strict_export(module, (torch.arange(2, 5),), ({0: SEQ},)))
        assert any(marker in p for p in problems), problems


# ---------------------------------------------------------------- runtimes


def executorch_method(program):
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from executorch.runtime import Runtime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edge = to_edge_transform_and_lower(program, compile_config=EdgeCompileConfig(_check_ir_validity=False))
        buffer = edge.to_executorch(
            ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass())).buffer
    loaded = Runtime.get().load_program(buffer)
    return loaded, loaded.load_method("forward")  # the method needs its program kept alive


def onnx_session(program):
    import onnxruntime

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", list(CASES))
def test_mask_exports_cleanly_and_runs_everywhere(name):
    case = CASES[name]
    program = strict_export(case.module, case.make_inputs(*EXAMPLE), case.dynamic_shapes())
    assert graph_problems(program) == []
    positions = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "input_pos")
    assert isinstance(positions.meta["val"].shape[0], torch.SymInt), "the query length was specialised"

    et_program, method = executorch_method(program)
    session = onnx_session(program)
    onnx_names = [i.name for i in session.get_inputs()]
    assert len(onnx_names) == len(case.inputs)

    for start, seq in LENGTHS:
        inputs = case.make_inputs(start, seq)
        with torch.no_grad():
            eager = case.module(*inputs)
            reference = case.reference(*inputs)
            exported = program.module()(*inputs)
        assert eager.shape[:3] == (BATCH, 1, seq)
        assert torch.equal(eager, reference), f"{name}: eager mask differs from transformers at {start, seq}"
        assert torch.equal(exported, eager), f"{name}: exported program differs at {start, seq}"
        et_out = method.execute(list(inputs))[0]
        assert et_out.dtype == eager.dtype and torch.equal(et_out, eager), f"{name}: ExecuTorch at {start, seq}"
        ort_out = session.run(None, {n: t.numpy() for n, t in zip(onnx_names, inputs)})[0]
        assert ort_out.dtype == eager.numpy().dtype and np.array_equal(ort_out, eager.numpy()), \
            f"{name}: onnxruntime at {start, seq}"
