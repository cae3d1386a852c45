"""The faster XNNPACK lowering (exporter/backends/executorch/lowering_speedups.py) lowers to the same program as the stock path: same
delegates and the same logits, bit for bit, on models that exercise different op mixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attention
from attention import executorch_custom_ops
from exporter.backends.executorch import lowering_speedups
from exporter.backends.executorch.lower import lower_to_pte, runner_metadata
from exporter.backends.executorch.quantize import quantize_model
from exporter.backends.executorch.runtime import ExecuTorchSession
from exporter.backends.executorch.wrapper import BufferCacheDecoder
from exporter.capture import export_buffer_decoder

MAX_LEN = 32


def _lower(source, tmp_path, name: str, fast: bool, monkeypatch, quantize: bool = False) -> tuple[np.ndarray, int]:
    """(logits of a 9-token prefill and 3 decode steps, number of delegate calls) for the model's .pte."""
    model = source.load_model()
    if quantize:
        quantize_model(model, "8da4w", 32, "4w")
    with attention.switched(model, executorch_custom_ops.register()):
        wrapper = BufferCacheDecoder(model, source.layers, MAX_LEN, custom_ops=True).eval()
        program = export_buffer_decoder(wrapper, MAX_LEN)
    monkeypatch.setattr(lowering_speedups, "supported", lambda: fast)
    data = lower_to_pte(program, runner_metadata(source.vocab_size, MAX_LEN, MAX_LEN, [2], 1, use_sdpa_with_kv_cache=True),
                        quantized=quantize)
    path = tmp_path / f"{name}-{'fast' if fast else 'stock'}.pte"
    path.write_bytes(data)
    session = ExecuTorchSession(path)
    ids = (torch.arange(12) * 5 + 3).tolist()
    rows = [session.step(ids[:9], 0)] + [session.step([ids[i]], i) for i in range(9, 12)]
    return np.concatenate(rows), data.count(b"XnnpackBackend")


@pytest.mark.parametrize("name,quantize", [("tiny-llama", False),
                                           pytest.param("tiny-gemma2", False, marks=pytest.mark.slow),  # 63 s
                                           ("tiny-gpt2", False), ("tiny-llama", True)])
def test_fast_lowering_gives_the_stock_program(tmp_path, monkeypatch, builtin_checkpoint, name, quantize):
    """fp32 on three op mixes (tiny-gpt2's addmm needs the full pass list), and 8da4w + 4-bit embedding."""
    assert lowering_speedups.supported()  # the pinned executorch: the fast path is what export-model runs
    source = builtin_checkpoint(name)
    stock, stock_delegates = _lower(source, tmp_path, name, False, monkeypatch, quantize)
    fast, fast_delegates = _lower(source, tmp_path, name, True, monkeypatch, quantize)
    assert fast_delegates == stock_delegates > 0
    np.testing.assert_array_equal(fast, stock)


def test_pass_triggers_name_real_passes():
    """Every pass the trigger table names exists in XNNPACK's default pass list (a renamed pass would otherwise
    always run, which is safe, but the table would silently stop saving time)."""
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    class Program:
        graph_signature = None

    names = {p.__name__ for p in XNNPACKPassManager(Program()).passes}
    assert set(lowering_speedups.PASS_TRIGGERS) <= names
