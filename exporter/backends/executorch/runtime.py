"""Run a ``.pte``: a step session in the ExecuTorch runtime, and ExecuTorch's own ``TextLLMRunner`` check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
from executorch.runtime import Runtime

from exporter.backends.executorch.lower import WEIGHTS_TAG
from exporter.generation import compare_greedy


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
        self.max_seq_len = int(self.constant("get_max_context_len"))  # the cache length
        self.max_chunk = int(self.constant("get_max_seq_len"))  # the longest forward
        self.method = None  # loaded by the first reset() / step(): reading constants loads no weights

    def constant(self, name: str):
        """The value of constant method ``name`` (``get_max_seq_len``, ``get_eos_ids``...)."""
        return self.program.load_method(name).execute([])[0]

    def reset(self) -> None:
        """Start a new sequence: a freshly loaded method has freshly planned (zeroed) cache buffers. The old method
        is released first, so two copies of the delegate's packed weights never coexist."""
        self.method = None
        self.method = self.program.load_method("forward")

    def step(self, token_ids: list[int], start_pos: int) -> np.ndarray:
        """Logits of ``token_ids`` fed at ``start_pos``, in forwards of at most ``max_chunk`` tokens (as
        ``TextLLMRunner`` splits a long prompt)."""
        if self.method is None:
            self.reset()
        rows = []
        for offset in range(0, len(token_ids), self.max_chunk):
            chunk = token_ids[offset:offset + self.max_chunk]
            tokens = torch.tensor([chunk], dtype=torch.long)
            input_pos = torch.arange(start_pos + offset, start_pos + offset + len(chunk), dtype=torch.long)
            logits = self.method.execute([tokens, input_pos])[0]
            rows.append(logits.reshape(-1, logits.shape[-1])[-len(chunk):].float().numpy())
        return np.concatenate(rows)


def _pieces_to_ids(tokenizer, pieces: list[str], expected: list[int]) -> list[int | None]:
    """The runner's decoded pieces as token ids: where a piece is the expected token's own text, that id; else the
    first id whose text is the piece (None if none). The runner's Python API returns text, not ids."""
    texts: dict[str, int] = {}
    ids = []
    for i, piece in enumerate(pieces):
        if i < len(expected) and tokenizer.decode([expected[i]]) == piece:
            ids.append(expected[i])
            continue
        if not texts:
            for token in range(len(tokenizer)):
                texts.setdefault(tokenizer.decode([token]), token)
        ids.append(texts.get(piece))
    return ids


def verify_text_runner(pte_path: Path, tokenizer, bos_id, eos_ids: set[int], expected_greedy, margin,
                       allowed: float, max_new_tokens: int, prompts: list[str], context_length: int) -> dict:
    """Drive ExecuTorch's ``TextLLMRunner`` (temperature 0) the way a chat app does, on one loaded program:
    turn 1 on ``prompts[0]``; turn 2 on ``prompts[1]`` appended without a reset (the runner continues at its
    position; its last generated token was never fed, so the cache holds prompt 1 + all but the last generated
    token); then ``reset()`` and ``prompts[1]`` again as a new sequence on the same program (stale cache slots must
    not leak in).

    Each turn's tokens must equal ``expected_greedy(ids, n, chunks)`` (eager greedy, or for quantized artifacts the
    artifact's own through the verified step function, fed in the runner's chunks: the earlier prompt, its reply
    one token at a time, this prompt); they are compared as ids (the pieces mapped back through
    the tokenizer). Ids beyond the tokenizer's vocabulary (a padded ``vocab_size``) have no text: the runner's
    piece there is not compared, only counted. A difference at a near-tie (reference margin within
    ``2 * allowed``) passes, recorded (``exporter.generation.compare_greedy``).

    ExecuTorch 1.5's runner checks ``eos_ids`` only in its decode loop, never on the token its prefill picks
    (``text_llm_runner.cpp``: the first token is printed, then ``generate`` runs unconditionally). When that first
    token is an eos, the expected tokens therefore go on past it as the runner does, and the turn records
    ``runner_ignores_first_eos`` (an app driving this runner sees the same; the artifact is not at fault)."""
    load_executorch_kernels()
    data = executorch_data_file(pte_path)
    runner = TextLLMRunner(str(pte_path), str(pte_path.parent / "tokenizer.json"), str(data) if data else None)
    turns, history, passed = [], [], True  # history: the chunks the runner has fed so far
    plan = [("turn 1", prompts[0], False, False), ("turn 2 (continued)", prompts[1], True, False),
            ("new sequence after reset", prompts[1].lstrip(), False, True)]
    for name, text, continued, reset in plan:
        if reset:
            runner.reset()
            history = []
        ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        # the runner adds BOS itself (num_bos) where transformers' tokenizer would: a chat template has its own
        bos = int(not continued and bos_id is not None and tokenizer(text)["input_ids"] == [bos_id] + ids)
        ids = [bos_id] * bos + ids
        chunks = history + [ids]
        context = [t for chunk in chunks for t in chunk]
        budget = min(max_new_tokens, context_length - len(context) - 1)
        if budget < 1:
            turns.append({"turn": name, "skipped": "no room left in the cache"})
            continue
        expected = expected_greedy(context, budget, chunks)
        first_eos = expected[0] in eos_ids and budget > 1
        if first_eos:  # the runner feeds that eos and decodes on (see the docstring)
            expected = expected[:1] + expected_greedy(context + expected[:1], budget - 1, chunks + [expected[:1]])
        pieces, stats = [], []
        config = GenerationConfig(temperature=0.0, max_new_tokens=budget, echo=False, num_bos=bos)
        runner.generate(text, config, token_callback=pieces.append, stats_callback=stats.append)
        actual = _pieces_to_ids(tokenizer, pieces, expected)
        vocab = len(tokenizer)  # -1: an id without text (not compared), -2: a piece that is no token's text
        wanted = [t if t < vocab else -1 for t in expected]
        got = [-1 if i < len(wanted) and wanted[i] == -1 else (-2 if a is None else a) for i, a in enumerate(actual)]
        outcome = compare_greedy(wanted, got,
                                 lambda i, w, g: margin(context + expected[:i], w, g) if g >= 0 else float("inf"),
                                 allowed)
        prompt_tokens = stats[-1].num_prompt_tokens if stats else None
        turn_passed = outcome["passed"] and prompt_tokens == len(ids)
        turns.append({"turn": name, "prompt": text, "start_pos": len(context) - len(ids),
                      "prompt_tokens": prompt_tokens, "expected_prompt_tokens": len(ids), "expected": expected,
                      "actual_pieces": pieces, **outcome, "passed": turn_passed,
                      **({"runner_ignores_first_eos": True} if first_eos else {})})
        passed &= turn_passed
        if outcome.get("near_tie"):  # the runner's cache now holds its own (equally valid) tokens: stop here
            turns.append({"turn": "later turns", "skipped": "the previous turn parted from eager at a near-tie"})
            break
        history = chunks + [[t] for t in expected[:-1]]  # what the runner's cache now holds, as it was fed
    return {"stage": "text_llm_runner", "turns": turns, "passed": passed}

