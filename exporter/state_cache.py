"""Fixed-shape state of convolution / SSM / linear-attention layers, for exported programs (beside the KV cache of
``exporter.cache``).

Per state layer, what transformers' ``LinearAttentionLayer`` holds for it (``cache_utils.py``):
- ``conv [B, C, K-1]``: the last ``K-1`` inputs of the layer's causal depthwise convolution (kernel ``K``).
  transformers keeps ``K`` columns, one more than the convolution ever reads; ``K-1`` is also what ONNX Runtime GenAI
  and ExecuTorch's LFM2 use.
- ``recurrent``: the SSM state (Mamba-2 ``[B, H, P, N]``) or delta-rule state (Gated DeltaNet ``[B, Hv, Dk, Dv]``),
  float32 whatever the model dtype (transformers' kernels compute it in float32); absent for LFM2's short conv.

The rule for positions (the one a program's ``input_pos`` / ``T - S`` gives): a forward whose first position is 0
starts a new sequence, and every state reads as zeros (``torch.where``, no branch); any other forward continues
from the state as it is. So a new sequence needs no reset call, and a prompt fed in chunks at increasing start
positions carries the state from chunk to chunk.

A ``StateLayer`` works functionally: it is handed the state tensors of this forward, the mixers' updates replace
them, and the caller writes the final tensors back (into mutable buffers for ExecuTorch, as graph outputs for ONNX).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import LinearAttentionLayer


@dataclass(frozen=True)
class StatePlan:
    """Shapes and dtypes of one layer's state tensors (batch first)."""

    conv_shape: tuple[int, ...]  # [B, C, K-1]
    conv_dtype: torch.dtype
    recurrent_shape: tuple[int, ...] | None = None
    recurrent_dtype: torch.dtype | None = None

    @property
    def kernel_size(self) -> int:
        return self.conv_shape[-1] + 1

    def tensors(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Zero ``(conv, recurrent or None)`` for a fresh sequence (``batch_size`` replaces the planned batch)."""
        def zeros(shape, dtype):
            shape = shape if batch_size is None else (batch_size, *shape[1:])
            return torch.zeros(shape, dtype=dtype)

        recurrent = None if self.recurrent_shape is None else zeros(self.recurrent_shape, self.recurrent_dtype)
        return zeros(self.conv_shape, self.conv_dtype), recurrent

    def describe(self, conv_name: str, recurrent_name: str) -> dict:
        """``{tensor name: [shape, dtype]}`` for the manifest, under the names a target gives the tensors."""
        out = {conv_name: [list(self.conv_shape), _dtype_name(self.conv_dtype)]}
        if self.recurrent_shape is not None:
            out[recurrent_name] = [list(self.recurrent_shape), _dtype_name(self.recurrent_dtype)]
        return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


INPUT_POS_RULE = ("a forward whose first position is 0 starts a new sequence: every state reads as zeros; any other "
                  "forward continues from the state as it is (a prompt longer than one forward comes in chunks at "
                  "increasing start positions and the state carries across them)")
CONV_PREFILL = ("causal depthwise conv1d over [state (K-1 columns), this forward's inputs]; the last K-1 inputs "
                "become the state")


def state_details(plan, kernels: dict, names) -> dict:
    """Build details for plans with state layers (``{}`` otherwise): each state layer's tensors (``names(i) ->
    (conv name, recurrent name)``: the target's names), the ``input_pos`` rule, and how prefill is computed
    (``kernels``: ``exporter.state_kernels.recording`` of the capture)."""
    layers = {str(i): {"type": layer.type, **layer.state.describe(*names(i))}
              for i, layer in enumerate(plan) if layer.state is not None}
    if not layers:
        return {}
    return {"state": {"layers": layers, "input_pos": INPUT_POS_RULE,
                      "prefill": {"conv": CONV_PREFILL, **kernels}}}


def state_plan(layer, batch_size: int) -> StatePlan:
    """The ``StatePlan`` of an eagerly filled transformers ``LinearAttentionLayer`` (after one forward)."""
    if layer.number_of_states != 1:
        raise NotImplementedError(f"{layer.number_of_states} conv/recurrent states in one layer")
    conv = layer.conv_states[0]
    if conv is None or conv.shape[-1] < 2:
        raise NotImplementedError("a state layer without a causal convolution of kernel >= 2")
    recurrent = layer.recurrent_states[0]
    return StatePlan((batch_size, *conv.shape[1:-1], conv.shape[-1] - 1), conv.dtype,
                     None if recurrent is None else (batch_size, *recurrent.shape[1:]),
                     None if recurrent is None else recurrent.dtype)


class StateLayer(LinearAttentionLayer):
    """A transformers linear-attention cache layer over given state tensors (``conv [B, C, K-1]``, optional
    ``recurrent``); always "has previous state", so the mixers take their continue-from-state path for any length.
    ``start_sequence`` zeroes the state for a forward at position 0."""

    def __init__(self, conv: torch.Tensor, recurrent: torch.Tensor | None):
        self.attach_state(conv, recurrent)

    def attach_state(self, conv: torch.Tensor, recurrent: torch.Tensor | None) -> None:
        """Hold ``conv`` / ``recurrent`` as this forward's state (also used by layers holding KV beside it)."""
        LinearAttentionLayer.__init__(self, number_of_states=1)
        self.conv_states[0], self.is_conv_states_initialized[0] = conv, True
        self.conv_kernel_size[0] = conv.shape[-1] + 1
        if recurrent is not None:
            self.recurrent_states[0], self.is_recurrent_states_initialized[0] = recurrent, True
        self.has_previous_state[0] = True

    def start_sequence(self, new_sequence: torch.Tensor) -> None:
        """``new_sequence``: 0-d bool (this forward starts at position 0): the state then reads as zeros."""
        for states in (self.conv_states, self.recurrent_states):
            if states[0] is not None:
                states[0] = torch.where(new_sequence, torch.zeros((), dtype=states[0].dtype), states[0])

    def lazy_initialization(self, *args, **kwargs) -> None:  # the tensors are given up front
        return None

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        """Return ``[state (K-1), new inputs (S)]`` along the last dim (what the mixer's convolution reads) and keep
        its last ``K-1`` columns as the state."""
        past = self.conv_states[state_idx]
        full = torch.cat([past.to(conv_states.dtype), conv_states], dim=-1)
        self.conv_states[state_idx] = full[..., full.shape[-1] - past.shape[-1]:].to(past.dtype)
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        """Keep ``recurrent_states`` (this forward's final state) as the state, in the planned dtype."""
        past = self.recurrent_states[state_idx]
        self.recurrent_states[state_idx] = recurrent_states.to(past.dtype if past is not None else torch.float32)
        return self.recurrent_states[state_idx]

    def state_tensors(self) -> list[torch.Tensor]:
        """``[conv]`` or ``[conv, recurrent]`` as currently held."""
        return [t for t in (self.conv_states[0], self.recurrent_states[0]) if t is not None]
