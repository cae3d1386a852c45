"""Weight quantization with torchao (0.18), applied to the eager model before it is wrapped and captured.

The quantized eager model is both what gets exported and the tight verification reference (same quantized weights,
same dynamic activation quantization), so the artifact can be graded against it at near-fp32 tolerance.

Schemes (XNNPACK kernels they lower to):
- ``8da4w``: ``Int8DynamicActivationIntxWeightConfig(int4, PerGroup(group_size))`` on every ``nn.Linear``: int8
  asymmetric per-token dynamic activations, symmetric int4 weights in groups of ``group_size`` (default 32)
  along the input dimension -> XNNPACK ``qd8-f32-qb4w`` GEMM.
- ``8da8w``: ``Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0))``: int8 per-token dynamic activations, int8
  per-channel weights -> XNNPACK ``qd8-f32-qc8w``. The int8 recipe: XNNPACK has no weight-only linear kernels
  (ExecuTorch docs: "Weight-only quantization is not currently supported on XNNPACK"), and groupwise int8 weights
  fail to lower ("Only 4b group quantization is supported").
- ``int8``: ``IntxWeightOnlyConfig(int8, PerAxis(0))``, true weight-only. Refused for XNNPACK: executorch 1.5.1
  partitions it and the artifact silently computes garbage (max abs diff ~2e3 on one 64x96 linear, measured).
- ``none``: no linear quantization.
Embeddings (``embedding``): ``4w`` (int4, groups of 32) or ``8w`` (int8, per row) with ``IntxWeightOnlyConfig``; not
delegated to XNNPACK, they run as ExecuTorch's quantized embedding kernels after ``do_quant_fusion_and_const_prop``.

Weight scales come from ``hqq_scale_only`` (ExecuTorch's own LLM export default: HQQ-refined scales, plain
symmetric rounding at runtime), or ``affine`` (min/max) when asked.
Linears whose input dimension is not a multiple of the group size stay in float and are listed in the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

LINEAR_SCHEMES = ("none", "8da4w", "8da8w", "int8")
EMBEDDING_SCHEMES = (None, "4w", "8w")
DEFAULT_GROUP_SIZE = {"8da4w": 32, "8da8w": 0, "int8": 0, "none": 0}
EMBEDDING_GROUP_SIZE = {"4w": 32, "8w": 0}


@dataclass
class QuantizationSummary:
    """What ``quantize_model`` did, for the manifest and the verification report."""

    scheme: str
    group_size: int
    embedding: str | None
    embedding_group_size: int | None
    algorithm: str
    quantized_linears: int = 0
    skipped_linears: list[str] = field(default_factory=list)
    quantized_embeddings: int = 0
    untied_embeddings: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _granularity(group_size: int):
    from torchao.quantization.granularity import PerAxis, PerGroup

    return PerAxis(0) if group_size == 0 else PerGroup(group_size)


def linear_config(scheme: str, group_size: int, algorithm: str = "hqq_scale_only"):
    """The torchao config for ``scheme`` (see the module docstring)."""
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

    if scheme == "8da4w":
        # XNNPACK stores blockwise (per-group) weight scales as bf16 (node_visitor.get_quant_params); rounding them
        # to bf16 here makes the eager model compute with exactly the scales the artifact holds.
        scale_dtype = torch.bfloat16 if group_size else None
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=_granularity(group_size),
                                                     weight_scale_dtype=scale_dtype,
                                                     intx_choose_qparams_algorithm=algorithm)
    if scheme == "8da8w":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=_granularity(group_size),
                                                     intx_choose_qparams_algorithm=algorithm)
    if scheme == "int8":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=_granularity(group_size),
                                    intx_choose_qparams_algorithm=algorithm)
    raise ValueError(f"unknown linear quantization {scheme!r}; choose one of {', '.join(LINEAR_SCHEMES)}")


def embedding_config(scheme: str, group_size: int, algorithm: str = "hqq_scale_only"):
    from torchao.quantization.quant_api import IntxWeightOnlyConfig

    dtypes = {"4w": torch.int4, "8w": torch.int8}
    if scheme not in dtypes:
        raise ValueError(f"unknown embedding quantization {scheme!r}; choose 4w or 8w")
    return IntxWeightOnlyConfig(weight_dtype=dtypes[scheme], granularity=_granularity(group_size),
                                intx_choose_qparams_algorithm=algorithm)


def quantize_model(model: nn.Module, scheme: str = "8da4w", group_size: int | None = None,
                   embedding: str | None = None, embedding_group_size: int | None = None,
                   algorithm: str = "hqq_scale_only", backend: str | None = "xnnpack") -> QuantizationSummary:
    """Quantize ``model`` in place (embeddings first, then linears) and return a summary.

    ``group_size``: None = the scheme default (32 for 8da4w, per-channel for int8); 0 = per channel.
    A tied input embedding / lm_head pair is untied first when either side is quantized (each side gets its own
    format: the embedding a weight-only table, the lm_head the linear scheme).
    """
    from torchao.quantization.quant_api import quantize_

    if scheme not in LINEAR_SCHEMES:
        raise ValueError(f"unknown linear quantization {scheme!r}; choose one of {', '.join(LINEAR_SCHEMES)}")
    if embedding not in EMBEDDING_SCHEMES:
        raise ValueError(f"unknown embedding quantization {embedding!r}; choose 4w or 8w")
    if scheme == "int8" and backend == "xnnpack":
        raise ValueError("XNNPACK has no weight-only int8 linear (it lowers but computes wrong results); use 8da8w")
    group_size = DEFAULT_GROUP_SIZE[scheme] if group_size is None else group_size
    if scheme == "8da8w" and group_size and backend == "xnnpack":
        raise ValueError("XNNPACK supports int8 weights per channel only (group size 0)")
    if group_size < 0 or (group_size and group_size % 2):
        raise ValueError(f"group size must be 0 (per channel) or a positive even number, got {group_size}")
    if embedding is not None and embedding_group_size is None:
        embedding_group_size = EMBEDDING_GROUP_SIZE[embedding]
    summary = QuantizationSummary(scheme, group_size, embedding, embedding_group_size, algorithm)
    if scheme == "none" and embedding is None:
        return summary
    summary.untied_embeddings = _untie(model)

    if embedding is not None:
        def is_embedding(module, fqn):
            ok = isinstance(module, nn.Embedding) and (
                not embedding_group_size or module.weight.shape[1] % embedding_group_size == 0)
            summary.quantized_embeddings += int(ok)
            return ok

        quantize_(model, embedding_config(embedding, embedding_group_size, algorithm), filter_fn=is_embedding)
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.padding_idx is not None and _is_quantized(module.weight):
                # padding_idx only shapes gradients; as an explicit ``aten.embedding`` argument it stops ExecuTorch's
                # quant fusion from matching ``dequantize_affine + embedding`` (-> "Missing out variants:
                # torchao::dequantize_affine" at to_executorch).
                module.padding_idx = None

    if scheme != "none":
        def is_linear(module, fqn):
            if not isinstance(module, nn.Linear):
                return False
            if group_size and module.in_features % group_size:
                summary.skipped_linears.append(fqn)
                return False
            summary.quantized_linears += 1
            return True

        quantize_(model, linear_config(scheme, group_size, algorithm), filter_fn=is_linear)
    return summary


def _is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, nn.Parameter)


def _untie(model: nn.Module) -> bool:
    """Give ``lm_head`` its own weight tensor when it shares the input embedding's (quantize_ swaps parameters)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    inp, out = get_in(), get_out()
    if inp is None or out is None or out.weight is not inp.weight:
        return False
    out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    return True


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as held in memory (quantized tensors at their packed size)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        inner = getattr(tensor, "__tensor_flatten__", None)
        if inner is not None:
            names, _ = tensor.__tensor_flatten__()
            total += sum(getattr(tensor, n).numel() * getattr(tensor, n).element_size() for n in names)
        else:
            total += tensor.numel() * tensor.element_size()
    return total
