"""exporter.memory: weight facts from headers, the peak estimate and its one-line refusal, the low-memory load of a
bf16 checkpoint (the same weights as transformers' own fp32 load), and the progress pieces that report memory."""

from __future__ import annotations

import io
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from exporter import checkpoint, memory, recipes
from exporter.builtin import materialize
from exporter.errors import UserError
from exporter.progress import Progress


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory):
    """``name -> Checkpoint`` of built-ins saved in bf16 (as most published checkpoints are)."""
    root = tmp_path_factory.mktemp("bf16")
    found = {}
    for name in ("tiny-llama", "tiny-qwen3-moe", "tiny-gemma3"):
        source = materialize(name, root / f"{name}-fp32")
        folder = root / name
        AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(torch.bfloat16).save_pretrained(folder)
        for tokenizer_file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(source / tokenizer_file, folder / tokenizer_file)
        found[name] = checkpoint.resolve(str(folder), root)
    return found


def test_weight_info_reads_the_headers(bf16_checkpoints):
    source = bf16_checkpoints["tiny-llama"]
    info = memory.weight_info(source.folder)
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32)
    assert info.dtypes == ("BF16",)
    assert info.parameters == sum(p.numel() for p in model.parameters())
    assert info.fp32_bytes == 4 * info.parameters and info.stored_bytes == 2 * info.parameters
    assert info.largest == max(p.numel() for p in model.parameters())
    assert info.tensors == len(model.state_dict())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3-moe", "tiny-gemma3"])
def test_low_memory_load_gives_transformers_fp32_weights(bf16_checkpoints, name):
    """A bf16 checkpoint loaded tensor by tensor (no memory map) holds exactly what transformers' own fp32 load
    holds, parameters and buffers, and computes the same logits; every tensor read is counted."""
    source = bf16_checkpoints[name]
    reads = []
    ours = source.load_model(experts_implementation="batched_mm", on_tensor=lambda: reads.append(1))
    theirs = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32,
                                                  experts_implementation="batched_mm")
    mine = {**dict(ours.named_parameters()), **dict(ours.named_buffers())}
    reference = {**dict(theirs.named_parameters()), **dict(theirs.named_buffers())}
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key
    ids = torch.tensor([[1, 5, 9, 30, 7, 11]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    assert len(reads) == memory.weight_info(source.folder).tensors
    assert ours.config._attn_implementation == theirs.config._attn_implementation


def test_fp32_checkpoint_takes_transformers_own_path(tiny_llama_dir):
    reads = []
    checkpoint.resolve(str(tiny_llama_dir), tiny_llama_dir.parent).load_model(on_tensor=lambda: reads.append(1))
    assert reads == []  # nothing to convert: transformers' loading, unchanged


def test_estimate_follows_the_weights_and_refuses_on_one_line():
    fp32, quantized = recipes.load("xnnpack-fp32"), recipes.load("xnnpack-8da4w")
    small = memory.WeightInfo(parameters=10**8, stored_bytes=2 * 10**8, dtypes=("BF16",), largest=10**7, tensors=9)
    large = memory.WeightInfo(parameters=10**9, stored_bytes=2 * 10**9, dtypes=("BF16",), largest=10**8, tensors=9)
    for chosen in ([fp32], [quantized], [fp32, recipes.load("onnx-fp32")]):
        a = memory.estimate_peak(chosen, small, 32000, 100)
        b = memory.estimate_peak(chosen, large, 32000, 100)
        assert a.peak < b.peak and set(a.phases) == set(b.phases)
        assert a.peak == max(a.phases.values()) and a.phase in a.phases
    assert memory.estimate_peak([quantized], large, 32000, 100).peak < memory.estimate_peak([fp32], large, 32000,
                                                                                          100).peak
    estimate = memory.estimate_peak([fp32], large, 32000, 100)
    memory.check_fits(estimate, estimate.peak, "--model m")  # exactly enough: accepted
    memory.check_fits(estimate, None, "--model m")  # unknown: never refused
    with pytest.raises(UserError) as refused:
        memory.check_fits(estimate, estimate.peak - 1, "--model m")
    message = str(refused.value)
    assert "\n" not in message and "estimated peak memory" in message and "--force-memory" in message


def test_available_memory_override(monkeypatch):
    monkeypatch.setenv(memory.AVAILABLE_ENV, "1.5G")
    assert memory.available_bytes() == int(1.5 * 2**30)
    monkeypatch.setenv(memory.AVAILABLE_ENV, "lots")
    with pytest.raises(UserError, match="not a size"):
        memory.available_bytes()
    monkeypatch.delenv(memory.AVAILABLE_ENV)
    assert memory.available_bytes() > 0


def test_isolation_by_size_and_by_environment(monkeypatch):
    small = memory.WeightInfo(10, 20, ("F32",), 5, 2)
    large = memory.WeightInfo(memory.ISOLATE_ABOVE // 4, 0, ("BF16",), 5, 2)
    monkeypatch.delenv(memory.ISOLATE_ENV, raising=False)
    assert not memory.isolate(small) and memory.isolate(large)
    monkeypatch.setenv(memory.ISOLATE_ENV, "1")
    assert memory.isolate(small)
    monkeypatch.setenv(memory.ISOLATE_ENV, "0")
    assert not memory.isolate(large)


def test_progress_counts_through_a_probe_and_folds_inner_peaks():
    progress = Progress(stream=io.StringIO(), quiet=True)
    counted = [0]
    with progress.track("quantize", lambda: (counted[0], 4)):
        with progress.stage("quantize", "weights") as stage:
            assert stage.counts() == (0, None)  # nothing counted yet: no count shown
            counted[0] = 3
            assert stage.counts() == (3, 4) and "3/4" in stage.status() and "memory" in stage.status()
    with progress.stage("other", "no probe") as stage:
        assert stage.counts() == (0, None)
    with progress.stage("outer", "holds more") as outer:
        with progress.stage("inner", "allocates"):
            block = bytearray(256 * 2**20)  # touched: resident
            block[::4096] = b"x" * len(block[::4096])
        del block
        assert outer.counts() == (0, None)
    peaks = {stage: peak for stage, _, _, peak in progress.timings}
    assert peaks["outer"] >= peaks["inner"]  # the inner stage reset the high-water mark; its peak is folded in
