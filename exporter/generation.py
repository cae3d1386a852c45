"""The one greedy loop, over any ``Session`` (``exporter.backends.base.Session``): an artifact in its runtime, or
the eager model itself (``EagerSession``), so expected and actual tokens come from the same code."""

from __future__ import annotations

import time

import numpy as np
import torch


class EagerSession:
    """A ``Session`` over an eager transformers model: every step recomputes the whole sequence without a cache
    (the reference numerics: nothing cached, nothing exported)."""

    max_seq_len = 1 << 30

    def __init__(self, model):
        self.model = model
        self.sequence: list[int] = []

    def reset(self) -> None:
        self.sequence = []

    @torch.no_grad()
    def step(self, token_ids: list[int], start_pos: int) -> np.ndarray:
        if start_pos != len(self.sequence):
            raise ValueError(f"eager session holds {len(self.sequence)} tokens, step starts at {start_pos}")
        self.sequence += list(token_ids)
        return eager_logits(self.model, self.sequence)[-len(token_ids):]


def eager_logits(model, ids: list[int]) -> np.ndarray:
    """``[len(ids), V]`` float32 logits of one no-cache forward of ``model`` over ``ids``."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def greedy_generate(session, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int],
                    chunks: list[list[int]] | None = None) -> dict:
    """Greedy decoding on ``session`` from a fresh sequence, stopping after an eos id (kept) or ``max_new_tokens``
    (capped by the cache); returns the tokens and prefill / decode speed (tokens per second).

    ``chunks``: the prompt as the forwards a runtime fed it (a conversation: turn 1's prompt, its reply one token
    at a time, the next prompt), concatenating to ``prompt_ids``; default one forward. Rounding of an artifact
    whose kernels quantize activations depends on how its input was chunked, so replaying a runner's chunks gives
    that runner's exact tokens."""
    chunks = [list(prompt_ids)] if chunks is None else chunks
    if [t for chunk in chunks for t in chunk] != list(prompt_ids):
        raise ValueError("chunks do not concatenate to the prompt")
    session.reset()
    budget = min(max_new_tokens, session.max_seq_len - len(prompt_ids))
    start = time.perf_counter()
    position = 0
    for chunk in chunks:
        logits = session.step(chunk, position)
        position += len(chunk)
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


def eager_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Eager greedy continuation (stops after an eos id): the expectation for runner-level checks."""
    return greedy_generate(EagerSession(model), list(prompt_ids), max_new_tokens, eos_ids)["tokens"]


def compare_greedy(expected: list[int], actual: list[int], margin, allowed: float) -> dict:
    """Compare two greedy continuations of the same prefix. Equal: passed. At the first difference, the reference
    margin between the two tokens there (``margin(i, expected_token, actual_token)``, logits) decides: within
    ``2 * allowed`` (the logit error verification allowed: either token is a correct greedy pick) the continuations
    may legitimately part, and the check passes with the divergence recorded; beyond it, it fails. Lengths must
    agree up to the first difference (both stop at the same eos)."""
    for i, (want, got) in enumerate(zip(expected, actual)):
        if want != got:
            gap = float(margin(i, want, got))
            tie = gap <= 2 * allowed
            return {"matches": False, "diverged_at": i, "margin": gap, "near_tie": tie, "passed": tie}
    same_length = len(expected) == len(actual)
    return {"matches": same_length, "passed": same_length}


def eager_margin(model):
    """``margin(prefix_ids, a, b)``: |logit a - logit b| of ``model``'s next-token logits after ``prefix_ids``."""
    def margin(prefix: list[int], a: int, b: int) -> float:
        row = eager_logits(model, list(prefix))[-1]
        return abs(float(row[a]) - float(row[b]))

    return margin
