"""ExecuTorch's kernel for the gated delta rule (Qwen3.5 / Qwen3-Next linear attention): the LLM custom op
``llama::gated_delta_rule``, used instead of the scan form of ``exporter.state_kernels`` on the custom-op recipes.

Facts (executorch 1.5.1, ``extension/llm/custom_ops/custom_ops.py`` and the installed kernels):
``llama::gated_delta_rule(Tensor query, Tensor key, Tensor value, Tensor decay, Tensor beta, Tensor initial_state)
-> (Tensor out, Tensor final_state)``, all float32, head-major ``[B, H, T, D]`` with one head count for q, k, v
(grouped heads are repeated first), q L2-normalised and scaled by ``Dk^-0.5``, k L2-normalised, ``decay = exp(g)``
``[B, H, T]``, ``beta [B, H, T]``, ``initial_state [B, H, Dk, Dv]``; any ``T >= 1`` (chunked for long inputs, the
plain recurrence for short ones, inside the kernel). It has an ATen CPU kernel, so the eager probe runs it too.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from attention.executorch_custom_ops import load_custom_ops
from exporter import state_kernels
from exporter.state_kernels import gated_delta_rule_inputs

DESCRIPTION = ("ExecuTorch custom op llama::gated_delta_rule (chunked gated delta rule for multi-token forwards, "
               "the recurrence for single tokens, inside the kernel); one graph for 1..max tokens")


def executorch_gated_delta_rule(query, key, value, g, beta, initial_state, use_qk_l2norm: bool):
    """transformers' gated-delta-rule contract (``query``/``key [B, S, Hk, Dk]``, ``value [B, S, Hv, Dv]``,
    ``g``/``beta [B, S, Hv]``, fp32 ``initial_state [B, Hv, Dk, Dv]``) on ``llama::gated_delta_rule``; returns
    ``(out [B, S, Hv, Dv]`` in ``query``'s dtype, fp32 final state)."""
    dtype = query.dtype
    query, key, value, g, beta = gated_delta_rule_inputs(query, key, value, g, beta, use_qk_l2norm)
    out, final = torch.ops.llama.gated_delta_rule(query, key, value, g.exp(), beta,
                                                  initial_state.to(torch.float32).contiguous())
    return out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format), final


@contextmanager
def executorch_state_kernels():
    """While active, state layers use ExecuTorch's custom-op kernels (``executorch_gated_delta_rule``)."""
    load_custom_ops()
    with state_kernels.gated_delta_rule_implementation(executorch_gated_delta_rule, DESCRIPTION):
        yield
