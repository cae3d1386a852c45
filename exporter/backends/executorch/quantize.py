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
- ``none``: no linear quantization.
Embeddings (``embedding``): ``4w`` (int4, groups of 32) or ``8w`` (int8, per row) with ``IntxWeightOnlyConfig``; not
delegated to XNNPACK, they run as ExecuTorch's quantized embedding kernels after ``do_quant_fusion_and_const_prop``.

(torchao's weight-only int8, ``IntxWeightOnlyConfig(int8)``, is not offered: executorch 1.5.1 partitions it and the
artifact silently computes garbage, max abs diff ~2e3 on one 64x96 linear, measured.)

Weight scales come from ``hqq_scale_only`` (ExecuTorch's own LLM export default: HQQ-refined scales, plain
symmetric rounding at runtime). Linears whose input dimension is not a multiple of the group size stay in float and
are listed in the summary. Scheme names and group sizes are validated by the recipe (``exporter.recipes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchao.quantization.granularity import PerAxis, PerGroup
from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_

ALGORITHM = "hqq_scale_only"
EMBEDDING_GROUP_SIZE = {"4w": 32, "8w": 0}
EMBEDDING_DTYPES = {"4w": torch.int4, "8w": torch.int8}


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
    return PerAxis(0) if group_size == 0 else PerGroup(group_size)


def linear_config(scheme: str, group_size: int):
    """The torchao config for linear ``scheme`` (``8da4w`` or ``8da8w``, see the module docstring)."""
    if scheme == "8da4w":
        # XNNPACK stores blockwise (per-group) weight scales as bf16 (node_visitor.get_quant_params); rounding them
        # to bf16 here makes the eager model compute with exactly the scales the artifact holds.
        scale_dtype = torch.bfloat16 if group_size else None
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=_granularity(group_size),
                                                     weight_scale_dtype=scale_dtype,
                                                     intx_choose_qparams_algorithm=ALGORITHM)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=_granularity(group_size),
                                                 intx_choose_qparams_algorithm=ALGORITHM)


def embedding_config(scheme: str, group_size: int):
    """The torchao weight-only config for embedding ``scheme`` (``4w`` / ``8w``)."""
    return IntxWeightOnlyConfig(weight_dtype=EMBEDDING_DTYPES[scheme], granularity=_granularity(group_size),
                                intx_choose_qparams_algorithm=ALGORITHM)


def quantize_model(model: nn.Module, scheme: str, group_size: int, embedding: str | None = None) -> QuantizationSummary:
    """Quantize ``model`` in place (embeddings first, then linears) and return a summary.

    ``scheme``: ``none``, ``8da4w`` or ``8da8w``; ``group_size``: weights per scale, 0 = per channel (validated by
    the recipe). A tied input embedding / lm_head pair is untied first when either side is quantized (each side
    gets its own format: the embedding a weight-only table, the lm_head the linear scheme).
    """
    embedding_group_size = EMBEDDING_GROUP_SIZE[embedding] if embedding is not None else None
    summary = QuantizationSummary(scheme, group_size, embedding, embedding_group_size, ALGORITHM)
    if scheme == "none" and embedding is None:
        return summary
    summary.untied_embeddings = _untie(model)

    if embedding is not None:
        def is_embedding(module, fqn):
            ok = isinstance(module, nn.Embedding) and (
                not embedding_group_size or module.weight.shape[1] % embedding_group_size == 0)
            summary.quantized_embeddings += int(ok)
            return ok

        quantize_(model, embedding_config(embedding, embedding_group_size), filter_fn=is_embedding)
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

        quantize_(model, linear_config(scheme, group_size), filter_fn=is_linear)
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
