"""What verification runs: cases that drive an artifact the way runtimes and apps do.

A case is a sequence of turns on one session: a prompt (fed in chunks of at most the program's prefill chunk, as
``TextLLMRunner`` splits a long prompt), greedy tokens fed back one at a time (teacher-forced on eager's), then
optionally a further multi-token message at a nonzero position (a chat's next turn) and more decode steps. Cases
start on a fresh session, except the second sequence, which starts at position 0 on the same loaded program right
after the longest case (stale cache slots, ring buffers wrapped, must not leak into it). With sliding-window or
chunked layers every case is sized to cross the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small town by the sea, there lived an "
    "old clockmaker who repaired every clock in the valley."
)
USER_TEXT = (
    " Tell me more about the clockmaker, his workshop and the strange clock that nobody in the valley could ever "
    "repair."
)
# Prompts for the runtimes' own generation loops (TextLLMRunner takes the first; ORT GenAI all of them).
RUNNER_PROMPTS = ("Once upon a time", "The old clockmaker repaired every clock in the valley")
# A chat model's first turn: a question an instruct model answers briefly, so its reply reaches its eos.
CHAT_QUESTION = "What is the capital of France? Answer in one short sentence."


@dataclass(frozen=True)
class Turn:
    """One turn of a case: ``length`` input tokens (the case's prompt, or a further user message), then
    ``decode`` greedy tokens fed one at a time."""

    length: int
    decode: int = 0


@dataclass(frozen=True)
class Case:
    """A sequence of turns on one session. ``name`` prefixes the stage names ("" for the plain prompts);
    ``fresh=False`` continues on the previous case's loaded program without resetting it."""

    name: str
    turns: tuple[Turn, ...]
    fresh: bool = True

    @property
    def length(self) -> int:
        return sum(turn.length + turn.decode for turn in self.turns)


@dataclass
class VerifyPlan:
    """The cases, and the prefill chunk multi-token inputs are split into."""

    cases: list[Case]
    prefill_chunk: int

    def steps(self, case: Case) -> list[tuple[int, int, str]]:
        """``(start_pos, token count, kind)`` of every forward of ``case``: ``input`` chunks and ``decode`` steps."""
        steps, position = [], 0
        for turn in case.turns:
            for start in range(0, turn.length, self.prefill_chunk):
                count = min(self.prefill_chunk, turn.length - start)
                steps.append((position + start, count, "input"))
            position += turn.length
            steps += [(position + i, 1, "decode") for i in range(turn.decode)]
            position += turn.decode
        return steps


def prefill_chunk(max_seq_len: int) -> int:
    """The longest forward of an exported program (ExecuTorch ``get_max_seq_len``): longer prompts are split into
    chunks of this many tokens. Half the cache up to 256 tokens: long enough for fast prefill, short enough that
    activation memory (planned for the longest forward) stays small next to the cache."""
    return max(1, min(256, max_seq_len // 2))


def default_plan(max_seq_len: int, window: int | None = None) -> VerifyPlan:
    """The cases for a cache of ``max_seq_len`` slots (``window``: the smallest sliding window / attention chunk).

    Plain prompts: a 12-token prompt decoded 16 steps (with a window: a prompt of ``window + 4`` and one of
    ``min(5, window)``, each decoded 32 steps, well past the window) and a 1-token prompt. Then a multi-turn chat
    (prompt, 3 steps, a user message crossing the window, 8 steps), a prompt longer than the prefill chunk when the
    cache has room for one (split as the runner splits it), and a second, shorter sequence on the same program.
    Everything is shrunk to fit ``max_seq_len``.
    """
    chunk = prefill_chunk(max_seq_len)
    cases = []
    if window is not None and window + 5 <= max_seq_len:
        steps = min(32, max_seq_len - window - 4)
        cases += [Case("", (Turn(window + 4, steps),)), Case("", (Turn(min(5, window), steps),))]
    else:
        steps = min(16, max_seq_len - 2)
        cases.append(Case("", (Turn(max(2, min(12, max_seq_len - steps)), steps),)))
    cases.append(Case("", (Turn(1),)))
    user = (window + 3) if window is not None else 9
    turn = (Turn(min(7, max_seq_len // 4), 3), Turn(user, 8))
    if sum(t.length + t.decode for t in turn) <= max_seq_len:
        cases.append(Case("multi-turn", turn))
    long_prompt = chunk + chunk // 2 + 1
    if long_prompt + 4 <= max_seq_len:
        cases.append(Case("chunked prompt", (Turn(long_prompt, 4),)))
    longest = max(range(len(cases)), key=lambda i: cases[i].length)
    cases.insert(longest + 1, Case("second sequence", (Turn(min(5, max_seq_len // 2), min(8, max_seq_len // 2)),),
                                   fresh=False))
    return VerifyPlan(cases=cases, prefill_chunk=chunk)


def prompt_token_ids(tokenizer, vocab_size: int, length: int, text: str = PROMPT_TEXT,
                     add_special_tokens: bool = True) -> list[int]:
    """``length`` token ids: ``text`` tokenized (repeated as needed), or seeded ids without a tokenizer."""
    if tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        while len(ids) < length:
            ids = ids + tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids[:length]]
    generator = torch.Generator().manual_seed(length + (0 if text == PROMPT_TEXT else 7919))
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def turn_token_ids(tokenizer, vocab_size: int, index: int, length: int) -> list[int]:
    """Input ids of a case's turn ``index``: the prompt text for the first turn, the user text for later ones."""
    if index == 0:
        return prompt_token_ids(tokenizer, vocab_size, length)
    return prompt_token_ids(tokenizer, vocab_size, length, USER_TEXT, add_special_tokens=False)


def runner_texts(tokenizer) -> list[str]:
    """The texts a runtime's generation check feeds: ``RUNNER_PROMPTS``; with a chat template, the first one is
    ``CHAT_QUESTION`` as a chat turn (an instruct model answers and stops at its eos, which checks stopping)."""
    first, second = RUNNER_PROMPTS
    if getattr(tokenizer, "chat_template", None):
        first = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}],
                                              add_generation_prompt=True, tokenize=False)
    return [first, " " + second]


def runner_prompt_ids(tokenizer, vocab_size: int) -> list[list[int]]:
    """Prompt ids for the runtimes' generation checks: ``RUNNER_PROMPTS`` through the transformers tokenizer (as the
    reference sees them), or seeded ids without a tokenizer."""
    if tokenizer is not None:
        return [[int(t) for t in tokenizer(text)["input_ids"]] for text in RUNNER_PROMPTS]
    return [prompt_token_ids(None, vocab_size, n) for n in (4, 11)]
