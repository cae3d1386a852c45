"""Run a ``.pte``: a step session in the ExecuTorch runtime, and ExecuTorch's own ``TextLLMRunner`` check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
from executorch.runtime import Runtime

from exporter.backends.executorch.lower import WEIGHTS_TAG

RUNNER_PROMPT = "Once upon a time"


def load_executorch_kernels() -> None:
    """Register the kernels a fast-path / quantized ``.pte`` calls outside XNNPACK in this process's ExecuTorch
    runtime: the LLM custom ops (``llama::custom_sdpa``, ``llama::update_cache``) and the quantized kernels
    (embeddings). Programs that do not use them are unaffected."""
    import executorch.kernels.quantized  # noqa: F401  (imported for its kernel registration)
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def executorch_data_file(pte_path: Path) -> Path | None:
    """The weights file that goes with ``pte_path`` (``model.ptd`` beside ``model.pte``), if the export wrote one."""
    data = Path(pte_path).with_name(f"{WEIGHTS_TAG}.ptd")
    return data if data.is_file() else None


class ExecuTorchSession:
    """A ``.pte`` decoder method ``forward(tokens [1,S], input_pos [S]) -> logits``; the cache lives in the method.
    A ``.ptd`` beside the ``.pte`` is loaded as its weights."""

    def __init__(self, path: Path):
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


def verify_text_runner(pte_path: Path, tokenizer_path: Path, tokenizer, bos_id, expected_greedy,
                       max_new_tokens: int) -> dict:
    """Generate with ExecuTorch's ``TextLLMRunner`` (temperature 0); its decoded pieces must be the expected greedy
    tokens decoded one by one (the runner's Python API returns text pieces, not ids). ``expected_greedy(prompt_ids,
    max_new_tokens)`` gives the expected ids (eager greedy, or for quantized artifacts the artifact's own greedy
    through the verified step function)."""
    load_executorch_kernels()
    prompt_ids = tokenizer(RUNNER_PROMPT)["input_ids"]
    num_bos = 1 if bos_id is not None and prompt_ids and prompt_ids[0] == bos_id else 0
    expected_ids = expected_greedy(prompt_ids, max_new_tokens)
    expected_pieces = [tokenizer.decode([t]) for t in expected_ids]  # the runner emits the eos piece too
    pieces, stats = [], []
    data = executorch_data_file(pte_path)
    runner = TextLLMRunner(str(pte_path), str(tokenizer_path), str(data) if data else None)
    config = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens, echo=False, num_bos=num_bos)
    runner.generate(RUNNER_PROMPT, config, token_callback=pieces.append, stats_callback=stats.append)
    prompt_tokens = stats[-1].num_prompt_tokens if stats else None
    passed = pieces == expected_pieces and prompt_tokens == len(prompt_ids)
    return {"stage": "text_llm_runner", "prompt": RUNNER_PROMPT, "prompt_tokens": prompt_tokens,
            "expected_prompt_tokens": len(prompt_ids), "expected_pieces": expected_pieces, "actual_pieces": pieces,
            "generated_tokens": stats[-1].num_generated_tokens if stats else None, "passed": passed}
