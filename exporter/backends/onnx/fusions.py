"""Fuse an exported ONNX decoder into onnxruntime's own ops (recipe ``ort_fusions = "cpu"``).

The rewrite is transformers' own ``fuse_for_onnxruntime`` (``transformers.exporters.onnxruntime_fusions``, built on
onnxscript's ORT fusions), the pass behind ``OnnxConfig(ort_fusions=...)``: RMSNorm + residual add ->
``SkipSimplifiedLayerNormalization``, rotary -> ``RotaryEmbedding``, sibling MatMuls reading one input (q/k/v, gate/up)
-> one packed MatMul and a Split, the lm_head transpose -> ``FusedMatMul``; then the reshape round trips the fused
ops leave around rotary and attention are dropped (``drop_reshape_round_trips``). Each rewrite computes what it replaces;
the verification that follows the build compares the fused graph with the eager model like any other artifact.

It runs after weight quantization: the MatMulNBits pass matches each MatMul to its ``nn.Linear`` by weight value,
which a packed q/k/v weight no longer is (quantized MatMuls are not packed; norms and rotary still fuse).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime


def fuse_onnx_file(path: Path, provider: str) -> dict:
    """Rewrite ``path`` (+ ``path.data``) in place with ``fuse_for_onnxruntime(model, provider)``.

    Returns build details: node counts before/after and how many nodes of each onnxruntime-only op the graph now
    has. The file is replaced only after the fused graph was written completely.
    """
    # onnxruntime's quantizer configures the root logger at INFO; the rewriters log every match (with stacks) there
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    path = Path(path)
    model = ir.load(str(path))
    nodes_before = sum(1 for _ in model.graph.all_nodes())
    fuse_for_onnxruntime(model, provider)
    reshapes = drop_reshape_round_trips(model)
    ops = Counter(n.op_type for n in model.graph.all_nodes() if n.domain == "com.microsoft")
    nodes_after = sum(1 for _ in model.graph.all_nodes())
    fused_dir = path.parent / ".fused"
    fused_dir.mkdir(exist_ok=True)
    try:
        ir.save(model, str(fused_dir / path.name), external_data=path.name + ".data")
        del model
        for name in (path.name, path.name + ".data"):
            os.replace(fused_dir / name, path.parent / name)
    finally:
        shutil.rmtree(fused_dir, ignore_errors=True)
    return {"ort_fusions": provider, "nodes_before_fusion": nodes_before, "nodes": nodes_after,
            "reshapes_dropped": reshapes, "contrib_ops": dict(sorted(ops.items()))}


def _known_equal(a, b) -> bool:
    """Two ``onnx_ir`` shapes that are known to be equal: same rank, each dim the same int or the same named
    symbol (the exporter names equal dynamic sizes alike)."""
    if a is None or b is None or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        x, y = getattr(x, "value", x), getattr(y, "value", y)
        if x is None or y is None or x != y:
            return False
    return True


def drop_reshape_round_trips(model) -> int:
    """Bypass every ``Reshape`` whose output has the known shape of its input or of the input of a ``Reshape`` chain
    feeding it (``[B,S,H*D] -> [B,S,H,D] -> [B,S,H*D]``, left around rotary and attention by the fusions): the
    data are the same elements in the same order, so the source value is used directly. Returns how many."""
    dropped = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        source = node.inputs[0]
        while source is not None:
            if _known_equal(source.shape, out.shape) and source.dtype == out.dtype:
                out.replace_all_uses_with(source)
                dropped += 1
                break
            producer = source.producer()
            source = producer.inputs[0] if producer is not None and producer.op_type == "Reshape" else None
    RemoveUnusedNodesPass()(model)
    return dropped
