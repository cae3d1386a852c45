"""Export-friendly forms of the sequence kernels of state (recurrent) layers: the same math as transformers' torch
kernels, written so that one captured graph serves every sequence length (1 .. the longest forward) with no Python
loop over a dynamic length and no data-dependent control flow. ``exporter.patches`` puts the adapters (same
signatures as transformers' functions) into the modeling modules while capturing.

- Gated delta rule (Qwen3.5, Qwen3-Next; transformers ``torch_chunk_gated_delta_rule``): the chunked (WY) form with
  chunks of ``chunk_size`` (64, transformers' default). The unit-lower-triangular solve is a product of
  ``log2(chunk)`` matrix squarings (the matrix is nilpotent: ``(I + A)^-1 = prod_j (I + (-A)^(2^j))``), and the
  chunk-to-chunk recurrence of the state is ``torch.ops.higher_order.scan`` over the chunk dimension (ONNX
  ``Scan``, an ExecuTorch ``scan``). A backend may substitute its own kernel (``gated_delta_rule_implementation``:
  ExecuTorch's ``llama::gated_delta_rule``).
- Mamba-2 SSD (mamba2, granitemoehybrid, falcon_h1, bamba, nemotron_h, zamba2; transformers ``mamba2_chunk_scan``):
  the same intra-chunk quadratic form; the chunk-to-chunk state (transformers: a segment sum over chunks, an
  einsum between two dynamic chunk dims, which XNNPACK's reshape cannot take) is a scan over chunks like above.

Shape algebra that makes the graphs length-generic: the chunk count is one floor division
``n = (S + 2c - 1) // c`` (one chunk more than needed, so ``n >= 2`` and the scan never specialises a single
chunk); padding is an ``index_copy`` into zeros of ``n * c`` rows and unpadding an ``index_select`` (``F.pad`` and
slicing would need proofs about ``n * c - S`` that the symbolic solver cannot make). Padded tokens carry zero
input and zero log-decay, so they leave the state unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch._higher_order_ops.scan import scan

GATED_DELTA_RULE = "gated_delta_rule"
SSD = "mamba2_ssd"
DESCRIPTIONS = {
    GATED_DELTA_RULE: "chunked gated delta rule (WY form, chunks of {chunk}; triangular inverse by nilpotent "
                      "squaring; state carried chunk to chunk by a scan over chunks); one graph for 1..max tokens, "
                      "decode runs the same path",
    SSD: "Mamba-2 SSD chunked form (chunks of {chunk}; intra-chunk quadratic form, state carried chunk to chunk "
         "by a scan over chunks); one graph for 1..max tokens, decode runs the same path",
}
# (function, description) replacing the scan-based gated delta rule (a backend's custom op), or None
_gated_delta_rule_override: ContextVar[tuple[Callable, str] | None] = ContextVar("gated_delta_rule", default=None)
_recorded: ContextVar[dict | None] = ContextVar("state_kernels_recorded", default=None)


@contextmanager
def gated_delta_rule_implementation(function: Callable, description: str):
    """While active, the gated-delta-rule adapter calls ``function(query, key, value, g, beta, initial_state,
    use_qk_l2norm)`` (transformers' ``[B, S, H, D]`` layouts, fp32 ``initial_state [B, Hv, Dk, Dv]``; returns
    ``(out [B, S, Hv, Dv], final_state)``) instead of the scan form; ``description`` goes into the records."""
    token = _gated_delta_rule_override.set((function, description))
    try:
        yield
    finally:
        _gated_delta_rule_override.reset(token)


@contextmanager
def recording():
    """Collect ``{kernel: how it computes}`` for every adapter called while active (what a capture used)."""
    records: dict = {}
    token = _recorded.set(records)
    try:
        yield records
    finally:
        _recorded.reset(token)


def _record(kernel: str, description: str) -> None:
    records = _recorded.get()
    if records is not None:
        records[kernel] = description


def num_chunks(length, chunk: int):
    """``ceil(length / chunk) + 1`` as one floor division (>= 2; see the module notes)."""
    return (length + 2 * chunk - 1) // chunk


def to_chunks(x: torch.Tensor, dim: int, n, chunk: int) -> torch.Tensor:
    """``x`` zero-padded along ``dim`` to ``n * chunk`` entries and that dim split into ``(n, chunk)``."""
    shape = list(x.shape)
    shape[dim] = n * chunk
    padded = x.new_zeros(shape).index_copy(dim, torch.arange(x.shape[dim], device=x.device), x)
    return padded.unflatten(dim, (n, chunk))


def from_chunks(y: torch.Tensor, dim: int, length) -> torch.Tensor:
    """Dims ``dim, dim + 1`` of ``y`` merged, keeping the first ``length`` entries."""
    return y.flatten(dim, dim + 1).index_select(dim, torch.arange(length, device=y.device))


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """``(I + a)^-1`` for strictly lower-triangular ``a [..., c, c]``: ``prod_j (I + (-a)^(2^j))`` (``a`` is
    nilpotent, ``a^c = 0``), ``ceil(log2 c)`` factors; no triangular solve, no loop over rows."""
    chunk = a.shape[-1]
    eye = torch.eye(chunk, dtype=a.dtype, device=a.device)
    power = -a
    inverse = eye + power
    for _ in range((chunk - 1).bit_length() - 1):
        power = power @ power
        inverse = inverse @ (eye + power)
    return inverse


def scan_chunks(step, init: torch.Tensor, xs: tuple[torch.Tensor, ...]):
    """``(final carry, stacked outputs)`` of ``step(carry, x) -> (carry, out)`` over the leading dim of ``xs``:
    ``torch.ops.higher_order.scan`` while exporting (one node for any chunk count), a plain loop in eager runs
    (the same arithmetic; eager scan would compile itself first)."""
    init = init.contiguous()
    xs = tuple(x.contiguous() for x in xs)
    if torch.compiler.is_exporting():
        return scan(step, init, xs)
    carry, outs = init, []
    for i in range(xs[0].shape[0]):
        carry, out = step(carry, tuple(x[i] for x in xs))
        outs.append(out)
    return carry, torch.stack(outs)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)  # transformers' / FLA's l2norm


def gated_delta_rule_inputs(query, key, value, g, beta, use_qk_l2norm: bool):
    """transformers' kernel preamble: q/k repeated to the value heads, ``[B, H, S, D]`` fp32, q/k L2-normalised
    (``use_qk_l2norm``), q scaled by ``Dk^-0.5``; returns ``(q, k, v, g, beta)`` head-major."""
    heads_k, heads_v = key.shape[2], value.shape[2]
    if heads_k != heads_v:
        query = query.repeat_interleave(heads_v // heads_k, dim=2)
        key = key.repeat_interleave(heads_v // heads_k, dim=2)
    query, key, value, beta, g = [x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                                  for x in (query, key, value, beta, g)]
    if use_qk_l2norm:
        query, key = _l2norm(query), _l2norm(key)
    return query * query.shape[-1] ** -0.5, key, value, g, beta


def gated_delta_rule_scan(query, key, value, g, beta, initial_state, chunk_size: int = 64,
                          use_qk_l2norm: bool = True):
    """transformers ``torch_chunk_gated_delta_rule`` for any length: ``query``/``key [B, S, Hk, Dk]``,
    ``value [B, S, Hv, Dv]``, ``g``/``beta [B, S, Hv]``, fp32 ``initial_state [B, Hv, Dk, Dv]``; returns
    ``(out [B, S, Hv, Dv]`` in ``query``'s dtype, fp32 final state)."""
    dtype, length = query.dtype, query.shape[1]
    query, key, value, g, beta = gated_delta_rule_inputs(query, key, value, g, beta, use_qk_l2norm)
    chunk = chunk_size
    n = num_chunks(length, chunk)
    v_beta, k_beta = value * beta.unsqueeze(-1), key * beta.unsqueeze(-1)
    query, key, k_beta, v_beta = (to_chunks(x, 2, n, chunk) for x in (query, key, k_beta, v_beta))
    cum = to_chunks(g, 2, n, chunk).cumsum(-1)  # padded tokens: g = 0, beta = 0 -> the state passes unchanged
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).triu(1)
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
    solve = unit_lower_inverse(((k_beta @ key.transpose(-1, -2)) * decay).tril(-1))
    new_values = solve @ v_beta
    k_cumdecay = solve @ (k_beta * cum.exp().unsqueeze(-1))
    intra = (query @ key.transpose(-1, -2)) * decay
    q_decayed = query * cum.exp().unsqueeze(-1)
    k_decayed = key * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]

    def step(state, xs):
        values, kc, qd, kd, attn, cd = xs
        v_new = values - kc @ state
        out = qd @ state + attn @ v_new
        return state * cd + kd.transpose(-1, -2) @ v_new, out

    xs = tuple(t.movedim(2, 0) for t in (new_values, k_cumdecay, q_decayed, k_decayed, intra, chunk_decay))
    final, out = scan_chunks(step, initial_state.to(torch.float32), xs)
    out = from_chunks(out.movedim(0, 2), 2, length)
    return out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format), final


def chunk_gated_delta_rule(query, key, value, g, beta, chunk_size: int = 64, initial_state=None,
                           output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False, **kwargs):
    """Drop-in for transformers' ``torch_chunk_gated_delta_rule`` (same arguments and results) that exports for a
    dynamic length: the backend's kernel if one is set (``gated_delta_rule_implementation``), else
    ``gated_delta_rule_scan``."""
    if initial_state is None:
        initial_state = torch.zeros(key.shape[0], value.shape[2], key.shape[3], value.shape[3],
                                    dtype=torch.float32, device=key.device)
    override = _gated_delta_rule_override.get()
    if override is not None:
        function, description = override
        out, final = function(query, key, value, g, beta, initial_state, use_qk_l2norm_in_kernel)
    else:
        description = DESCRIPTIONS[GATED_DELTA_RULE].format(chunk=chunk_size)
        out, final = gated_delta_rule_scan(query, key, value, g, beta, initial_state, chunk_size,
                                           use_qk_l2norm_in_kernel)
    _record(GATED_DELTA_RULE, description)
    return out, (final if output_final_state else None)


def _segment_sum(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``segment_sum``: ``out[..., i, j] = sum(x[..., j+1 .. i])`` below the diagonal, -inf above."""
    chunk = x.size(-1)
    x = x[..., None].expand(*x.size(), chunk)
    x = x.masked_fill(~torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=x.device), -1), 0)
    x = torch.cumsum(x, dim=-2)
    return x.masked_fill(~torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=x.device), 0), -torch.inf)


def ssd_chunk_scan(x, dt, A, B, C, chunk_size: int, D=None, dt_bias=None, initial_state=None,
                   dt_softplus: bool = False, dt_limit=(0.0, float("inf"))):
    """transformers ``mamba2_chunk_scan`` for any length: ``x [b, S, h, p]``, ``dt [b, S, h]``, ``A [h]``,
    ``B``/``C [b, S, g, n]``; returns ``(y [b, S, h, p]`` fp32, final state ``[b, h, p, n]``)."""
    batch, length, heads, head_dim = x.shape
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])
    x = x.float()
    groups = B.shape[2]
    B = B.float().repeat_interleave(heads // groups, dim=2, output_size=heads)
    C = C.float().repeat_interleave(heads // groups, dim=2, output_size=heads)
    residual = D[..., None] * x if D is not None else None
    x = x * dt[..., None].float()
    A = A.to(x.dtype) * dt.float()
    chunk = chunk_size
    n = num_chunks(length, chunk)
    x, B, C = (to_chunks(t, 1, n, chunk) for t in (x, B, C))  # padded tokens: x = 0, A*dt = 0
    A = to_chunks(A, 1, n, chunk).permute(0, 3, 1, 2)  # [b, h, n, c]
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(_segment_sum(A))
    G = torch.einsum("bclhn,bcshn->bclsh", C, B)
    Y_diag = torch.einsum("bclsh,bcshp->bclhp", G * L.permute(0, 2, 3, 4, 1), x)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bclhp->bchpn", B * decay_states.permute(0, 2, 3, 1)[..., None], x)
    if initial_state is None:
        initial_state = torch.zeros_like(states[:, 0])

    def step(state, xs):  # the state at each chunk's start: decayed over the chunk, plus the chunk's own
        chunk_states, chunk_decay = xs
        return state * chunk_decay[..., None, None] + chunk_states, state.clone()

    chunk_decay = torch.exp(A_cumsum[:, :, :, -1])  # [b, h, n]
    final, starts = scan_chunks(step, initial_state.to(states.dtype), (states.movedim(1, 0), chunk_decay.movedim(2, 0)))
    states = starts.movedim(0, 1)  # [b, n, h, p, N]
    Y_off = torch.einsum("bclhn,bchpn->bclhp", C, states) * torch.exp(A_cumsum).permute(0, 2, 3, 1)[..., None]
    y = from_chunks(Y_diag + Y_off, 1, length)
    if residual is not None:
        y = y + residual
    return y, final


def mamba2_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                      dt_softplus: bool = False, dt_limit=(0.0, float("inf")), return_final_states: bool = False,
                      **kwargs):
    """Drop-in for transformers' ``mamba2_chunk_scan`` (same arguments and results) that exports for a dynamic
    length (``ssd_chunk_scan``)."""
    y, final = ssd_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D, dt_bias, initial_states, dt_softplus,
                              dt_limit)
    _record(SSD, DESCRIPTIONS[SSD].format(chunk=chunk_size))
    return (y, final) if return_final_states else y
