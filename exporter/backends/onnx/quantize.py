"""Weight-only quantization of the exported ONNX decoder with onnxruntime's own ``MatMulNBitsQuantizer``, and the
eager reference that computes like the artifact.

- ``quantize_onnx(model, path, bits, block_size)``: every ``MatMul`` whose constant ``B`` is the transposed weight of
  an ``nn.Linear`` of ``model`` becomes a ``com.microsoft::MatMulNBits`` (asymmetric, uint zero points,
  ``block_size`` rows per block, ``accuracy_level`` 4: int8 activations, quantized by the kernel per row in blocks of
  ``block_size`` with scale ``max|a| / 127``). Measured on this machine (ORT 1.32, x86, 2 threads, 8 chained
  576x576 MatMuls, one token): fp32 778 us; 4-bit 915 us with accuracy_level unset (fp32 compute), 368 us with 4;
  8-bit 15 ms unset (the weight is dequantized on every call), 272 us with 4. Level 4 is what makes int4/int8 fast. Before quantizing, each such ``B`` is
  renamed ``<module path>.weight.T`` (matched by value: ``B == W.T`` exactly, the transpose torch.onnx folded), and
  the model metadata ``matmulnbits_linears`` records ``{B name: [module paths]}``; MatMuls with a constant that is
  no Linear weight are left in float.
- ``onnx_reference_model(recipe, model, onnx_path)``: the fresh fp32 eager model with each quantized Linear's weight
  replaced by the weight dequantized from the file's ``MatMulNBits`` initializers (``(q - zero_point) * scale`` per
  block) and, for ``accuracy_level`` 4, its input rounded the way the kernel quantizes activations (a forward
  pre-hook), so eager and artifact multiply by the same numbers (measured: 2e-6 max abs diff on one MatMulNBits,
  vs 2.6e-2 without the activation rounding); for float16 recipes, float16-rounded weights.
  The activation rounding is MLAS's x86 int8 path; a CPU where onnxruntime runs level 4 differently would show up
  as a failed tight check, not as a silently wrong reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import NodeProto, TensorProto, helper, numpy_helper
from torch import nn

from exporter.backends.onnx.matmulnbits import (METADATA_KEY, dequantize_matmulnbits, quiet_quantizer, save_model,
                                                weight_key)
from exporter.backends.onnx.qembedding import read_quantized_embeddings

BITS = {"int4": 4, "int8": 8}
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (the fast CPU path), see the module notes


def linear_weight_index(model: nn.Module) -> dict[tuple, list[str]]:
    """``{key of W.T: [module paths]}`` for every ``nn.Linear`` of ``model`` (identical weights share a key)."""
    index: dict[tuple, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight_t = module.weight.detach().t().contiguous().cpu().numpy()
            index.setdefault(weight_key(weight_t), []).append(name)
    return index


def quantize_onnx(model: nn.Module, path: Path, bits: int, block_size: int) -> dict:
    """Replace the Linear MatMuls of the ONNX file ``path`` (exported from ``model``) by MatMulNBits, in place.

    Returns build details: how many MatMuls were quantized and which constant MatMuls were left in float.
    """
    MatMulNBitsQuantizer = quiet_quantizer()

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=True)
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    index = linear_weight_index(model)
    _untie_transposed_weights(graph, initializers, index)
    renames: dict[str, str] = {}
    mapping: dict[str, list[str]] = {}
    kept_float: list[str] = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        b_name = node.input[1]
        if b_name in renames:
            continue
        b = numpy_helper.to_array(initializers[b_name])
        paths = index.get(weight_key(b)) if b.ndim == 2 else None
        if not paths:
            kept_float.append(node.name)
            continue
        new_name = f"{paths[0]}.weight.T"
        renames[b_name] = new_name
        mapping[new_name] = paths
    if not mapping:
        raise ValueError("no MatMul of the exported graph multiplies by a Linear weight: nothing to quantize")
    for b_name, new_name in renames.items():
        initializers[b_name].name = new_name
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    initializers = {init.name: init for init in graph.initializer}
    mapping = _pack_siblings(graph, initializers, mapping)
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=False,
                                     accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=kept_float,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    proto = quantizer.model.model
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(mapping, sort_keys=True)
    quantized = sum(1 for n in proto.graph.node if n.op_type == "MatMulNBits")
    if quantized != len(mapping):
        raise RuntimeError(f"MatMulNBitsQuantizer replaced {quantized} of {len(mapping)} Linear MatMuls")
    save_model(proto, path)
    packed = sum(1 for parts in mapping.values() if not isinstance(parts[0], str))
    return {"matmulnbits": quantized, "packed_matmulnbits": packed, "bits": bits, "block_size": block_size,
            "accuracy_level": ACCURACY_LEVEL, "kept_float_matmuls": kept_float}


def _pack_siblings(graph, initializers: dict, mapping: dict) -> dict:
    """Merge the Linear MatMuls reading one input (q/k/v; gate/up) into one MatMul on their weights concatenated
    along N, followed by a Split: one MatMulNBits kernel instead of several. MatMulNBits quantizes each output column
    on its own (blocks run along K), so the packed weight quantizes to exactly the separate ones.

    Returns the mapping with each packed weight's entry as ``[[module paths, columns], ...]`` in column order (an
    unpacked entry stays a list of module paths)."""
    nodes = list(graph.node)
    uses: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    siblings: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        if node.op_type == "MatMul" and node.input[1] in mapping and uses[node.input[1]] == 1:
            siblings.setdefault(node.input[0], []).append(i)
    mapping = dict(mapping)
    replaced: dict[int, list] = {}  # first sibling's index -> [MatMul, Split]; the other siblings' -> []
    for source, group in siblings.items():
        weights = [numpy_helper.to_array(initializers[nodes[i].input[1]]) for i in group]
        if len(group) < 2 or len({(w.shape[0], w.dtype) for w in weights}) != 1:
            continue
        name = "+".join(nodes[i].input[1].removesuffix(".weight.T") for i in group) + ".weight.T"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), name))
        sizes = numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), name + ".split")
        graph.initializer.append(sizes)
        first = nodes[group[0]]
        packed = helper.make_node("MatMul", [source, name], [name + ".out"], name=f"{first.name}_packed")
        split = helper.make_node("Split", [name + ".out", sizes.name], [nodes[i].output[0] for i in group],
                                 name=f"{first.name}_split", axis=-1)
        mapping[name] = [[mapping.pop(nodes[i].input[1]), int(w.shape[1])] for i, w in zip(group, weights)]
        replaced[group[0]] = [packed, split]
        replaced.update({i: [] for i in group[1:]})
    if replaced:
        stale = {nodes[i].input[1] for i in replaced}
        kept_nodes = [_copy(new, NodeProto) for i, node in enumerate(nodes) for new in replaced.get(i, [node])]
        kept_inits = [_copy(init, TensorProto) for init in graph.initializer if init.name not in stale]
        del graph.node[:]
        graph.node.extend(kept_nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)
    return mapping


def _copy(message, kind):
    duplicate = kind()
    duplicate.CopyFrom(message)
    return duplicate


def _untie_transposed_weights(graph, initializers: dict, index: dict) -> None:
    """Give each ``MatMul(x, Transpose(W))`` whose ``W.T`` is a Linear weight of the model (``index``) its own
    ``W.T`` initializer, in place.

    A tied lm_head is exported that way: the table feeds the embedding ``Gather`` and, transposed, the lm_head
    ``MatMul``, so the quantizer (constant ``B`` only) would leave the largest MatMul in float. The Gather keeps the
    float table; the new ``B`` is quantized like any Linear weight (its float copy does not stay in the file)."""
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in initializers:
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        perm = [a.ints for a in transpose.attribute if a.name == "perm"]
        weight = numpy_helper.to_array(initializers[transpose.input[0]])
        if weight.ndim != 2 or (perm and list(perm[0]) != [1, 0]) or weight_key(weight.T) not in index:
            continue
        name = f"{transpose.input[0]}.untied_transpose"
        if name not in initializers:
            tensor = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
            graph.initializer.append(tensor)
            initializers[name] = graph.initializer[-1]
        node.input[1] = name
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.output[0] not in used]:
        graph.node.remove(node)


def read_quantized_linears(onnx_path: Path) -> dict[str, tuple[np.ndarray, int | None]]:
    """``{module path: (dequantized weight [out, in] float32, activation block or None)}`` for every MatMulNBits of
    the ONNX file (activation block: ``block_size`` when ``accuracy_level`` is 4, the kernel then rounds its input to
    int8 per block); raises if a MatMulNBits cannot be mapped to Linear modules (no ``matmulnbits_linears`` entry
    for its weight)."""
    proto = onnx.load(str(onnx_path), load_external_data=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    mapping = json.loads(meta.get(METADATA_KEY, "{}"))
    initializers = {init.name: init for init in proto.graph.initializer}
    weights: dict[str, tuple[np.ndarray, int | None]] = {}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits, k, n, block = int(attrs.get("bits", 4)), int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
        b_name = node.input[1]
        base = b_name[: -len(f"_Q{bits}")] if b_name.endswith(f"_Q{bits}") else b_name
        if base not in mapping:
            raise ValueError(f"MatMulNBits {node.name or b_name}: weight {b_name!r} maps to no Linear module "
                             f"(no {METADATA_KEY} entry in {Path(onnx_path).name})")
        missing = [name for name in node.input[1:4] if name and name not in initializers]
        if missing:
            raise ValueError(f"MatMulNBits {node.name}: inputs {missing} are not initializers")
        zero_points = (numpy_helper.to_array(initializers[node.input[3]])
                       if len(node.input) > 3 and node.input[3] else None)
        weight_kn = dequantize_matmulnbits(numpy_helper.to_array(initializers[b_name]),
                                           numpy_helper.to_array(initializers[node.input[2]]), zero_points,
                                           bits, k, n, block)
        activation_block = block if int(attrs.get("accuracy_level", 0)) == 4 else None
        entry = mapping[base]
        parts = [(entry, n)] if isinstance(entry[0], str) else entry  # packed: [[paths, columns], ...]
        start = 0
        for paths, columns in parts:
            for path in paths:
                weights[path] = (weight_kn[:, start:start + columns].T.copy(), activation_block)
            start += columns
        if start != n:
            raise ValueError(f"MatMulNBits {node.name or b_name}: {METADATA_KEY} covers {start} of its {n} columns")
    return weights


def int8_block_round(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` rounded like MatMulNBits' ``accuracy_level`` 4 input: per row, blocks of ``block`` along the last dim,
    symmetric int8 with scale ``max|a| / 127`` (round half to even), back in ``x``'s dtype."""
    k = x.shape[-1]
    pad = (-k) % block
    xf = torch.nn.functional.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], -1, block)
    scale = xf.abs().amax(-1, keepdim=True) / 127.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    rounded = torch.round(xf / safe) * scale
    return rounded.reshape(*x.shape[:-1], -1)[..., :k].to(x.dtype)


def _int8_activation_hook(block: int):
    def hook(module, args):
        return (int8_block_round(args[0], block), *args[1:])

    return hook


def onnx_reference_model(recipe, model: nn.Module, onnx_path) -> nn.Module:
    """``model`` (fresh fp32 eager transformers model) changed in place to compute like the artifact at
    ``onnx_path`` for ``recipe``; returned. fp32 recipes: unchanged. float16: weights rounded to float16, compute
    in float32 (see below). int4 / int8: each
    quantized Linear's weight replaced by the weight dequantized from the file (ValueError if one cannot be
    mapped to a Linear of ``model`` or its shape differs)."""
    if recipe.quantization in BITS:
        weights = read_quantized_linears(Path(onnx_path))
        if not weights:
            raise ValueError(f"{Path(onnx_path).name} has no MatMulNBits node for {recipe.name}")
        for path, (weight, activation_block) in weights.items():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"quantized weight for {path!r}: the model has no such module") from None
            if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != weight.shape:
                raise ValueError(f"quantized weight for {path!r} has shape {weight.shape}, the module "
                                 f"{type(module).__name__} {tuple(getattr(module, 'weight', torch.empty(0)).shape)}")
            # a new Parameter: a weight tied to the embedding stays float for the Gather, as in the graph
            module.weight = nn.Parameter(torch.from_numpy(weight).to(module.weight.dtype), requires_grad=False)
            if activation_block:
                module.register_forward_pre_hook(_int8_activation_hook(activation_block))
    if recipe.embedding_quantization != "none":
        for path, table in read_quantized_embeddings(Path(onnx_path)).items():
            module = model.get_submodule(path)
            if tuple(module.weight.shape) != table.shape:
                raise ValueError(f"quantized embedding for {path!r} has shape {table.shape}, the module "
                                 f"{tuple(module.weight.shape)}")
            module.weight = nn.Parameter(torch.from_numpy(table).to(module.weight.dtype), requires_grad=False)
    if recipe.dtype == "float16":
        # float16 weights, float32 compute: onnxruntime's CPU provider runs most float16 nodes through inserted
        # casts to float32, so this tracks the artifact more closely than float16 eager (measured on tiny-llama:
        # max abs diff 2.0e-3 vs 3.9e-3 for model.half() and 3.0e-3 for fp32 eager)
        model.half().float()
    return model.eval()
