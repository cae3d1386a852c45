"""Faster XNNPACK lowering for unquantized programs, for executorch 1.5.1 (measured on the SmolLM2-135M shape, 30
layers, 153 delegates: ``to_edge_transform_and_lower`` 124 s -> 54 s, logits identical; see
``docs/executorch-fastpath.md``). Three changes, each leaving the lowered program the same:

1. ``XnnpackPartitioner.ops_to_not_decompose`` with a per-node check makes ``to_edge_transform_and_lower`` run a
   third full ``run_decompositions``; ``WholeOpXnnpackPartitioner`` keeps only the ops the partitioner accepts at
   every node and drops the check, so the 2-decomposition path runs.
2. ``XnnpackBackend.preprocess`` re-traces each delegate through 17 passes. ``only_passes_with_work()`` drops each
   pass whose trigger ops (read from the passes' sources) the delegate does not contain; such a pass changes
   nothing. ``DimOrderOpsRevertPass`` and ``ConstPropPass`` always run.
3. ``to_backend`` re-sorts the whole top-level graph after cutting out each delegate (O(delegates x nodes)).
   ``one_topological_sort()`` skips those and re-orders the graph once, in place and stably, after all partitions.

2 and 3 patch executorch internals for the duration of one lowering and only for the version they were read from;
any other version lowers the stock way. Quantized programs take 2 and 3, not 1 (6-layer 8da4w: lowering 59 s ->
42 s, logits identical).
"""

from __future__ import annotations

import contextlib

import executorch.backends.xnnpack._passes as xnnpack_passes
import executorch.exir.backend.backend_api as backend_api
import executorch.version

SUPPORTED_EXECUTORCH = "1.5.1"

# pass -> fragments of edge op names without which the pass finds nothing to do (executorch 1.5.1,
# backends/xnnpack/_passes and backends/transforms)
PASS_TRIGGERS = {
    "XNNPACKRemoveCloneOpsTransform": ("clone",),
    "ConvertToUpsampleBilinear2d": ("upsample",),
    "ConvertToLinearPass": ("aten.mm.", "aten.addmm.", "aten.bmm."),
    "PropagateCustomMetaPass": ("quantize", "dequantize"),
    "ConvertToSDPAPass": ("bmm", "softmax", "aten.mm."),
    "FuseBatchNormPass": ("batch_norm",),
    "DecomposeBatchNorm": ("batch_norm",),
    "FuseActivationPass": ("relu", "hardtanh"),
    "DecomposeConcatenate": ("aten.cat.",),
    "RemoveGetItemPass": ("max_pool2d_with_indices", "aten.max.dim"),
    "InsertPadQDQPass": ("constant_pad_nd",),
    "Conv1dUnsqueezePass": ("convolution",),
    "PReLUReshapePass": ("prelu",),
    "ChannelsLastTaggedReshapePass": ("convolution", "upsample", "mean.dim", "max_pool2d", "amax", "max.dim",
                                      "avg_pool2d", "prelu", "quantize", "dequantize"),
    "RemoveRedundantCopyPass": ("_to_copy",),
}


def supported() -> bool:
    """True when the installed executorch is the version these changes were read from."""
    return executorch.version.__version__.split("+")[0] == SUPPORTED_EXECUTORCH


def whole_op_partitioner(base_class, configs):
    """An XNNPACK partitioner (``base_class(configs=configs)``) whose ``ops_to_not_decompose`` names only ops
    accepted at every one of their nodes, with no per-node check (see the module notes)."""

    class WholeOpXnnpackPartitioner(base_class):
        def ops_to_not_decompose(self, ep):
            ops, check = super().ops_to_not_decompose(ep)
            if check is None:
                return ops, None
            nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
            return [op for op in ops if all(check(n) for n in nodes if n.target == op)], None

    return WholeOpXnnpackPartitioner(configs=configs)


@contextlib.contextmanager
def only_passes_with_work():
    """While active, XNNPACK's preprocess runs only the passes whose trigger ops a delegate contains."""
    original = xnnpack_passes.XNNPACKPassManager.__init__

    def init(self, exported_program, passes=None):
        original(self, exported_program, passes)
        if passes:
            return
        targets = [str(n.target) for n in exported_program.graph.nodes if n.op == "call_function"]

        def has_work(pass_) -> bool:
            triggers = PASS_TRIGGERS.get(pass_.__name__)
            return triggers is None or any(trigger in target for target in targets for trigger in triggers)

        self.passes = [p for p in self.passes if has_work(p)]

    xnnpack_passes.XNNPACKPassManager.__init__ = init
    try:
        yield
    finally:
        xnnpack_passes.XNNPACKPassManager.__init__ = original


def _sort_in_place(graph_module) -> None:
    """Stable topological order of ``graph_module``'s nodes, moving nodes (not rebuilding: executorch keeps
    references to them); ``lint`` checks the result."""
    graph = graph_module.graph
    done, order = set(), []
    for start in list(graph.nodes):
        if start in done:
            continue
        stack = [(start, iter(start.all_input_nodes))]
        while stack:
            node, inputs = stack[-1]
            pending = next((i for i in inputs if i not in done), None)
            if pending is None:
                stack.pop()
                done.add(node)
                order.append(node)
            else:
                stack.append((pending, iter(pending.all_input_nodes)))
    previous = graph._root
    for node in order:
        if node._prev is not previous:
            previous.append(node)
        previous = node
    graph.lint()
    graph_module.recompile()


@contextlib.contextmanager
def one_topological_sort():
    """While active, ``to_backend`` cuts out delegates without re-sorting the graph each time and sorts it once
    after all partitions."""
    create, partitions = backend_api.create_submodule_from_nodes, backend_api._create_partitions_in_graph_module

    def create_unsorted(graph_module, node_list, tag, skip_legalize_graph=False):
        return create(graph_module, node_list, tag, skip_legalize_graph=True)

    def partitions_sorted_once(tagged_graph_module, *args, **kwargs):
        result = partitions(tagged_graph_module, *args, **kwargs)
        _sort_in_place(tagged_graph_module)
        return result

    backend_api.create_submodule_from_nodes = create_unsorted
    backend_api._create_partitions_in_graph_module = partitions_sorted_once
    try:
        yield
    finally:
        backend_api.create_submodule_from_nodes = create
        backend_api._create_partitions_in_graph_module = partitions
