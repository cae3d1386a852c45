"""Lower a captured decoder to an ExecuTorch ``.pte`` with the XNNPACK backend and LLM-runner metadata."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
from executorch.backends.xnnpack.partition.config.generic_node_configs import GeluConfig
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
from executorch.exir.passes import MemoryPlanningPass
from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
from torch.export import ExportedProgram

from exporter.backends.executorch import lowering_speedups


def runner_metadata(vocab_size: int, max_chunk: int, max_context: int, eos_ids: list[int], bos_id: int | None,
                    use_sdpa_with_kv_cache: bool = False) -> dict:
    """Constant methods ExecuTorch's ``TextLLMRunner`` reads (see shared notes on runtime contracts):
    ``get_max_seq_len`` is the longest forward (the runner splits longer prompts), ``get_max_context_len`` the KV
    cache length."""
    metadata = {
        "get_max_seq_len": max_chunk,
        "get_max_context_len": max_context,
        "get_vocab_size": int(vocab_size),
        "get_eos_ids": list(eos_ids),
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": use_sdpa_with_kv_cache,
    }
    if bos_id is not None:
        metadata["get_bos_id"] = int(bos_id)
    return metadata


def xnnpack_partitioner(whole_ops: bool = False):
    """XNNPACK partitioner that leaves tanh-approximate GELU to the portable kernel (``whole_ops``: the faster
    ``lowering_speedups.whole_op_partitioner`` form).

    XNNPACK's GELU node is the exact (erf) form and the 1.5.1 delegate ignores ``approximate``, so a delegated
    ``gelu(approximate="tanh")`` (``gelu_pytorch_tanh``: Gemma, StarCoder2) is off by up to 4.7e-4 (fixed upstream
    by pytorch/executorch#22851, not in 1.5.1). Exact GELU stays delegated.
    """
    class ExactGeluConfig(GeluConfig):
        def check_constraints(self, node, ep) -> bool:
            approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            return approximate == "none" and super().check_constraints(node, ep)

    configs = [ExactGeluConfig if c is GeluConfig else c for c in ALL_PARTITIONER_CONFIGS]
    if whole_ops:
        return lowering_speedups.whole_op_partitioner(XnnpackPartitioner, configs)
    return XnnpackPartitioner(configs=configs)


WEIGHTS_TAG = "model"  # external weights go to ``model.ptd`` beside ``model.pte``


def _tag_weights_external(program: ExportedProgram) -> None:
    """Mark every parameter and constant buffer of ``program`` for the external data file, for the delegates too
    (``delegate_constant_tag``): ExecuTorch's named data store then keeps identical bytes once, so a tied lm_head
    (delegated to XNNPACK) and the embedding table (run by the portable Gather) share one copy."""
    signature = program.graph_signature
    mutated = set(signature.buffers_to_mutate.values())
    constant = {name for name, target in signature.inputs_to_buffers.items() if target not in mutated}
    constant |= set(signature.inputs_to_parameters)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in constant:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = WEIGHTS_TAG


def lower_to_pte(program: ExportedProgram, metadata: dict, quantized: bool = False,
                 weights_dir: Path | None = None) -> bytes:
    """XNNPACK-partitioned ExecuTorch program bytes; the KV cache stays as mutable buffers in the program.

    ``quantized``: fuse torchao's dequantize + op patterns that XNNPACK did not take (quantized embeddings) into
    ExecuTorch's quantized kernels (``do_quant_fusion_and_const_prop``).
    ``weights_dir``: write the weights to ``weights_dir / "model.ptd"`` instead of into the program, each distinct
    tensor once (the program then needs that file to load: ``Runtime.load_program(..., data_path=)``,
    ``TextLLMRunner(..., data_path=)``).
    """
    if weights_dir is not None:
        _tag_weights_external(program)
    fast = lowering_speedups.supported()
    with contextlib.ExitStack() as stack:
        if fast:  # same program, less work: see exporter/lowering_speedups.py
            stack.enter_context(lowering_speedups.only_passes_with_work())
            stack.enter_context(lowering_speedups.one_topological_sort())
        stack.enter_context(torch.no_grad())
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        edge = to_edge_transform_and_lower(
            program,
            partitioner=[xnnpack_partitioner(whole_ops=fast and not quantized)],
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
            constant_methods=metadata,
        )
        executorch_program = edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                do_quant_fusion_and_const_prop=quantized,
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
                external_constants=(lambda node: WEIGHTS_TAG) if weights_dir is not None else False,
            )
        )
        if weights_dir is not None:
            executorch_program.write_tensor_data_to_file(str(weights_dir))
    return executorch_program.buffer


