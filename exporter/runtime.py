"""Run exported artifacts: a step API over a fresh KV cache, and greedy generation on top of it.

``open_session(path)`` gives an object with ``reset()`` and ``step(token_ids, start_pos) -> logits [S, V]`` for
a ``.pte`` (ExecuTorch runtime) or ``.onnx`` (onnxruntime) file, so verification and ``run`` treat both alike.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


def load_executorch_kernels() -> None:
    """Register the kernels a fast-path / quantized ``.pte`` calls outside XNNPACK in this process's ExecuTorch
    runtime: the LLM custom ops (``llama::custom_sdpa``, ``llama::update_cache``) and the quantized kernels
    (embeddings). Programs that do not use them are unaffected."""
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def executorch_data_file(pte_path: Path) -> Path | None:
    """The weights file that goes with ``pte_path`` (``model.ptd`` beside ``model.pte``), if the export wrote one."""
    data = Path(pte_path).with_suffix(".ptd")
    return data if data.is_file() else None


class ExecuTorchSession:
    """A ``.pte`` decoder method ``forward(tokens [1,S], input_pos [S]) -> logits``; the cache lives in the method.
    A ``.ptd`` beside the ``.pte`` is loaded as its weights."""

    def __init__(self, path: Path):
        from executorch.runtime import Runtime

        load_executorch_kernels()
        data = executorch_data_file(path)
        self.program = Runtime.get().load_program(Path(path), data_path=str(data) if data else None)
        self.max_seq_len = int(self._constant("get_max_seq_len"))
        self.method = None
        self.reset()

    def _constant(self, name: str):
        return self.program.load_method(name).execute([])[0]

    def reset(self) -> None:
        """Start a new sequence: a freshly loaded method has freshly planned (zeroed) cache buffers."""
        self.method = self.program.load_method("forward")

    def step(self, token_ids: list[int], start_pos: int) -> np.ndarray:
        tokens = torch.tensor([token_ids], dtype=torch.long)
        input_pos = torch.arange(start_pos, start_pos + len(token_ids), dtype=torch.long)
        logits = self.method.execute([tokens, input_pos])[0]
        return logits.reshape(-1, logits.shape[-1])[-len(token_ids):].float().numpy()


class OnnxSession:
    """An ``.onnx`` decoder with its KV cache passed in and out (see ``lower_onnx``), either contract:

    - static (shared buffer): past/present ``[B, KVH, max_seq_len, D]``, this step written at slots ``T-S..T-1``;
    - dynamic (concatenating): past ``[B, KVH, P, D]`` (``P = 0`` at the start), present ``[B, KVH, P+S, D]``.
    Either way the attention mask is ``[1, T]`` ones and each present becomes the next step's past.
    """

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_seq_len = int(self.session.get_modelmeta().custom_metadata_map["max_seq_len"])
        # a symbolic cache length = the concatenating contract
        self.dynamic_cache = any(isinstance(spec.shape[2], str) or spec.shape[2] is None for spec in self.past_inputs)
        self.reset()

    def reset(self) -> None:
        self.past = {}
        for spec in self.past_inputs:
            batch, heads, length, dim = spec.shape
            shape = [1, heads, 0 if self.dynamic_cache else length, dim]
            self.past[spec.name] = np.zeros(shape, dtype=np.float16 if "16" in spec.type else np.float32)

    def step(self, token_ids: list[int], start_pos: int) -> np.ndarray:
        seq_len = len(token_ids)
        total = start_pos + seq_len
        if self.dynamic_cache:
            past_len = next(iter(self.past.values())).shape[2]
            if past_len != start_pos:
                raise ValueError(f"dynamic cache holds {past_len} positions, step starts at {start_pos}")
        feeds = {
            "input_ids": np.array([token_ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(start_pos, total, dtype=np.int64)[None],
            **self.past,
        }
        outputs = self.session.run(None, feeds)
        for name, value in zip(self.output_names[1:], outputs[1:]):
            self.past[name.replace("present.", "past_key_values.")] = value
        return outputs[0][0].astype(np.float32)


def open_session(path: Path):
    """Session for ``path`` by suffix (``.pte`` or ``.onnx``)."""
    path = Path(path)
    if path.suffix == ".pte":
        return ExecuTorchSession(path)
    if path.suffix == ".onnx":
        return OnnxSession(path)
    raise ValueError(f"no runtime for {path.name}")


def greedy_generate(session, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> dict:
    """Greedy decoding on ``session``; returns tokens and prefill / decode timings (tokens per second)."""
    session.reset()
    budget = min(max_new_tokens, session.max_seq_len - len(prompt_ids))
    start = time.perf_counter()
    logits = session.step(prompt_ids, 0)
    prefill_s = time.perf_counter() - start
    generated = [int(np.argmax(logits[-1]))]
    decode_start = time.perf_counter()
    while len(generated) < budget and generated[-1] not in eos_ids:
        logits = session.step([generated[-1]], len(prompt_ids) + len(generated) - 1)
        generated.append(int(np.argmax(logits[-1])))
    decode_s = time.perf_counter() - decode_start
    decode_steps = len(generated) - 1
    return {
        "tokens": generated,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": len(prompt_ids) / prefill_s if prefill_s > 0 else None,
        "decode_tokens_per_s": decode_steps / decode_s if decode_steps and decode_s > 0 else None,
    }
