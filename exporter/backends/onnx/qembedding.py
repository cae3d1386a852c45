"""Quantized token embeddings for ONNX (``--qembedding 4w|8w``): the embedding ``Gather`` becomes onnxruntime's
``com.microsoft::GatherBlockQuantized`` over the table quantized like a MatMulNBits weight (asymmetric, uint zero
points, blocks of ``block_size`` along the hidden axis).

- A tied lm_head that is already a MatMulNBits of the same bits and block size *is* that quantized table (its ``B``
  is ``[vocab, blocks, blob]``, one row per token): the Gather reads the lm_head's own initializers (a ``Reshape``
  of ``B`` to ``[vocab, hidden * bits / 8]``), so the file holds the table once, in 4 or 8 bits.
- Otherwise the table is quantized on its own with onnxruntime's ``MatMulNBitsQuantizer`` (on a one-MatMul model
  holding ``W.T``: the same rounding as every other weight) and the float table is dropped.

The model metadata ``quantized_embeddings`` maps each quantized table to the ``nn.Embedding`` modules that read it,
so the matched reference (``read_quantized_embeddings``) uses the dequantized table exactly as the graph does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from exporter.backends.onnx.matmulnbits import (METADATA_KEY, dequantize_matmulnbits, quiet_quantizer, save_model,
                                                weight_key)

EMBEDDINGS_KEY = "quantized_embeddings"


def _quantize_table(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B [V, blocks, blob] uint8, scales [V, blocks], zero points [V, packed])`` for ``table [V, K]``, from
    onnxruntime's ``MatMulNBitsQuantizer`` run on ``MatMul(x, table.T)``."""
    MatMulNBitsQuantizer = quiet_quantizer()
    vocab, hidden = table.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"])], "table",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, vocab])],
        [numpy_helper.from_array(np.ascontiguousarray(table.T), "B")])
    quantizer = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                                     bits=bits, block_size=block_size, is_symmetric=False)
    quantizer.process()
    inits = {i.name: numpy_helper.to_array(i) for i in quantizer.model.model.graph.initializer}
    node = next(n for n in quantizer.model.model.graph.node if n.op_type == "MatMulNBits")
    return inits[node.input[1]], inits[node.input[2]].reshape(vocab, -1), inits[node.input[3]].reshape(vocab, -1)


def quantize_onnx_embeddings(model: nn.Module, path: Path, bits: int, block_size: int) -> dict:
    """Replace each ``Gather`` of ``path`` reading an ``nn.Embedding`` table of ``model`` by GatherBlockQuantized,
    in place (see the module notes). Returns build details; ValueError if no Gather reads an embedding table or
    the hidden size is not a multiple of ``block_size``."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=True)
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    meta = {p.key: p.value for p in proto.metadata_props}
    linears = json.loads(meta.get(METADATA_KEY, "{}"))
    embeddings: dict[tuple, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            embeddings.setdefault(weight_key(module.weight.detach().cpu().numpy()), []).append(name)
    # a MatMulNBits whose Linear is tied to an embedding: {embedding path: its B, scales, zero points}
    shared = {}
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs.get("bits") != bits or attrs.get("block_size") != block_size:
            continue
        entry = linears.get(node.input[1].removesuffix(f"_Q{bits}"))
        if not entry or not isinstance(entry[0], str):  # packed q/k/v or gate/up: never an lm_head
            continue
        tied = {id(model.get_submodule(linear).weight) for linear in entry}
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding) and id(module.weight) in tied:
                shared[name] = list(node.input[1:4])
    mapping, nodes, stale, shared_count = {}, [], set(), 0
    for node in graph.node:
        table_name = node.input[0] if node.op_type == "Gather" else None
        table = initializers.get(table_name)
        paths = embeddings.get(weight_key(numpy_helper.to_array(table))) if table is not None else None
        if not paths or any(a.name == "axis" and a.i != 0 for a in node.attribute):
            nodes.append(node)
            continue
        vocab, hidden = table.dims
        if hidden % block_size:
            raise ValueError(f"embedding hidden size {hidden} is not a multiple of the block size {block_size}")
        source = next((shared[p] for p in paths if p in shared), None)
        if source is None:
            b, scales, zero_points = _quantize_table(numpy_helper.to_array(table), bits, block_size)
            source = [f"{table_name}_Q{bits}", f"{table_name}_scales", f"{table_name}_zero_points"]
            for array, name in zip((b, scales, zero_points), source):
                graph.initializer.append(numpy_helper.from_array(array, name))
        else:
            shared_count += 1
        flat = f"{source[0]}.rows"
        shape = f"{flat}.shape"
        graph.initializer.append(numpy_helper.from_array(np.array([vocab, hidden * bits // 8], np.int64), shape))
        nodes.append(helper.make_node("Reshape", [source[0], shape], [flat], name=f"{node.name}_rows"))
        nodes.append(helper.make_node("GatherBlockQuantized", [flat, node.input[1], *source[1:]], list(node.output),
                                      name=node.name, domain="com.microsoft", gather_axis=0, quantize_axis=1,
                                      block_size=block_size, bits=bits))
        mapping[source[0]] = {"paths": paths, "scales": source[1], "zero_points": source[2], "bits": bits,
                              "block_size": block_size, "hidden": hidden}
        stale.add(table_name)
    if not mapping:
        raise ValueError("no Gather of the exported graph reads an embedding table: nothing to quantize")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name not in stale or init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    entry = proto.metadata_props.add()
    entry.key, entry.value = EMBEDDINGS_KEY, json.dumps(mapping, sort_keys=True)
    save_model(proto, path)
    return {"embedding_bits": bits, "embedding_block_size": block_size, "quantized_embeddings": len(mapping),
            "embedding_shared_with_lm_head": shared_count}


def read_quantized_embeddings(onnx_path: Path) -> dict[str, np.ndarray]:
    """``{embedding module path: dequantized table [V, K] float32}`` for every table the file quantized."""
    proto = onnx.load(str(onnx_path), load_external_data=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    initializers = {init.name: init for init in proto.graph.initializer}
    tables = {}
    for data, entry in json.loads(meta.get(EMBEDDINGS_KEY, "{}")).items():
        b = numpy_helper.to_array(initializers[data])
        vocab = b.shape[0]
        weight_kn = dequantize_matmulnbits(b, numpy_helper.to_array(initializers[entry["scales"]]),
                                           numpy_helper.to_array(initializers[entry["zero_points"]]),
                                           entry["bits"], entry["hidden"], vocab, entry["block_size"])
        for path in entry["paths"]:
            tables[path] = weight_kn.T.copy()
    return tables
