"""What verification runs: the prompts (as text and as token ids) and the cases (prompt length, decode steps)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small town by the sea, there lived an "
    "old clockmaker who repaired every clock in the valley."
)
# Prompts for the runtimes' own generation loops (TextLLMRunner takes the first; ORT GenAI all of them).
RUNNER_PROMPTS = ("Once upon a time", "The old clockmaker repaired every clock in the valley")


@dataclass
class VerifyPlan:
    """Prompts to check: ``(prompt length, teacher-forced decode steps after it)`` each, on a fresh cache."""

    cases: list[tuple[int, int]]


def default_plan(max_seq_len: int, window: int | None = None) -> VerifyPlan:
    """A 12-token prompt with 16 decode steps and a 1-token prompt, shrunk to fit ``max_seq_len``.

    With windowed (sliding / chunked) layers of size ``window``: a prompt longer than the window, a prompt shorter
    than it, each decoded 32 steps (well past the window), and the 1-token prompt.
    """
    if window is not None:
        long_prompt = window + 4
        steps = min(32, max_seq_len - long_prompt)
        if steps >= 1:
            return VerifyPlan(cases=[(long_prompt, steps), (min(5, window), steps), (1, 0)])
    steps = min(16, max_seq_len - 2)
    first = max(2, min(12, max_seq_len - steps))
    return VerifyPlan(cases=[(first, steps), (1, 0)])


def prompt_token_ids(tokenizer, vocab_size: int, length: int) -> list[int]:
    """``length`` token ids: the tokenized demo text (repeated as needed), or seeded ids without a tokenizer."""
    if tokenizer is not None:
        ids = tokenizer(PROMPT_TEXT)["input_ids"]
        while len(ids) < length:
            ids = ids + tokenizer(" " + PROMPT_TEXT, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids[:length]]
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def runner_prompt_ids(tokenizer, vocab_size: int) -> list[list[int]]:
    """Prompt ids for the runtimes' generation checks: ``RUNNER_PROMPTS`` through the transformers tokenizer (as the
    reference sees them), or seeded ids without a tokenizer."""
    if tokenizer is not None:
        return [[int(t) for t in tokenizer(text)["input_ids"]] for text in RUNNER_PROMPTS]
    return [prompt_token_ids(None, vocab_size, n) for n in (4, 11)]
