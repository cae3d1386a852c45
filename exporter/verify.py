"""Verification: every artifact is compared with the unmodified eager transformers model.

The reference is the checkpoint loaded fresh with transformers' default attention and mask code. Stages:
- ``prefill[L]`` for each prompt (a fresh cache each): artifact logits vs eager logits at every prompt position;
- ``decode[N]``: after the first prompt, N single-token steps teacher-forced on eager's greedy tokens.
Each stage reports max abs diff, max rel diff (max abs diff / max |reference logit|) and top-1 agreement, and
passes when max abs diff <= the recipe's ``max_abs_diff`` and top-1 agreement >= ``min_top1_agreement``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small town by the sea, there lived an "
    "old clockmaker who repaired every clock in the valley."
)
RUNNER_PROMPT = "Once upon a time"


@dataclass
class VerifyPlan:
    """How much to check: prompt lengths (prefill stages; the first one is decoded from) and decode steps."""

    prompt_lengths: list[int]
    decode_steps: int


@dataclass
class Reference:
    """Eager token ids and logits for every stage of a plan."""

    prompts: list[list[int]]
    prompt_logits: list[np.ndarray]  # [L, V] per prompt
    decode_tokens: list[int]  # fed one at a time after prompts[0]
    decode_logits: np.ndarray  # [N, V]
    eos_ids: set[int] = field(default_factory=set)


def default_plan(max_seq_len: int) -> VerifyPlan:
    """Two prompts (one of length 1) and 16 decode steps, shrunk to fit ``max_seq_len``."""
    decode_steps = min(16, max_seq_len - 2)
    first = max(2, min(12, max_seq_len - decode_steps))
    return VerifyPlan(prompt_lengths=[first, 1], decode_steps=decode_steps)


def prompt_token_ids(tokenizer, vocab_size: int, length: int) -> list[int]:
    """``length`` token ids: the tokenized demo text (repeated as needed), or seeded ids without a tokenizer."""
    if tokenizer is not None:
        ids = tokenizer(PROMPT_TEXT)["input_ids"]
        while len(ids) < length:
            ids = ids + tokenizer(" " + PROMPT_TEXT, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids[:length]]
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


@torch.no_grad()
def build_reference(model, tokenizer, plan: VerifyPlan, eos_ids: set[int]) -> Reference:
    """Run the eager reference ``model`` (default attention, no cache) for every stage of ``plan``."""
    vocab_size = model.config.get_text_config().vocab_size
    prompts = [prompt_token_ids(tokenizer, vocab_size, n) for n in plan.prompt_lengths]
    prompt_logits = [_logits(model, ids) for ids in prompts]
    sequence = list(prompts[0])
    next_token = int(np.argmax(prompt_logits[0][-1]))
    for _ in range(plan.decode_steps):
        sequence.append(next_token)
        next_token = int(np.argmax(_logits(model, sequence)[-1]))
    full = _logits(model, sequence)
    first_len = len(prompts[0])
    return Reference(
        prompts=prompts,
        prompt_logits=prompt_logits,
        decode_tokens=sequence[first_len:],
        decode_logits=full[first_len:],
        eos_ids=eos_ids,
    )


def _logits(model, ids: list[int]) -> np.ndarray:
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def compare(actual: np.ndarray, expected: np.ndarray) -> dict:
    """Max abs diff, max rel diff (normalised by the largest reference logit) and top-1 agreement."""
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    finite = bool(np.isfinite(actual).all())
    max_abs = float(diff.max()) if finite else float("inf")
    scale = float(np.abs(expected).max()) or 1.0
    top1 = float((actual.argmax(-1) == expected.argmax(-1)).mean())
    return {"positions": int(expected.shape[0]), "max_abs_diff": max_abs, "max_rel_diff": max_abs / scale,
            "top1_agreement": top1}


def verify_session(session, reference: Reference, max_abs_diff: float, min_top1: float) -> dict:
    """Run every stage on an artifact session (see ``runtime``) and grade it against ``reference``."""
    stages = []
    for index, (ids, expected) in enumerate(zip(reference.prompts, reference.prompt_logits)):
        session.reset()
        stages.append({"stage": f"prefill[{len(ids)}]", **compare(session.step(ids, 0), expected)})
        if index == 0 and reference.decode_tokens:
            steps = []
            position = len(ids)
            for token in reference.decode_tokens:
                steps.append(session.step([token], position)[-1])
                position += 1
            stages.append({"stage": f"decode[{len(steps)}]",
                           **compare(np.stack(steps), reference.decode_logits)})
    for stage in stages:
        stage["passed"] = stage["max_abs_diff"] <= max_abs_diff and stage["top1_agreement"] >= min_top1
    return {
        "thresholds": {"max_abs_diff": max_abs_diff, "min_top1_agreement": min_top1},
        "stages": stages,
        "passed": all(stage["passed"] for stage in stages),
    }


@torch.no_grad()
def eager_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Eager greedy continuation (stops after an eos id), the expectation for runner-level checks."""
    sequence, generated = list(prompt_ids), []
    while len(generated) < max_new_tokens:
        token = int(np.argmax(_logits(model, sequence)[-1]))
        generated.append(token)
        sequence.append(token)
        if token in eos_ids:
            break
    return generated


def verify_text_runner(pte_path, tokenizer_path, model, tokenizer, bos_id, eos_ids, max_new_tokens: int) -> dict:
    """Generate with ExecuTorch's ``TextLLMRunner`` (temperature 0); its decoded pieces must be eager's greedy
    tokens decoded one by one (the runner's Python API returns text pieces, not ids)."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    prompt_ids = tokenizer(RUNNER_PROMPT)["input_ids"]
    num_bos = 1 if bos_id is not None and prompt_ids and prompt_ids[0] == bos_id else 0
    expected_ids = eager_greedy(model, prompt_ids, max_new_tokens, eos_ids)
    expected_pieces = [tokenizer.decode([t]) for t in expected_ids]  # the runner emits the eos piece too
    pieces, stats = [], []
    runner = TextLLMRunner(str(pte_path), str(tokenizer_path))
    config = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens, echo=False, num_bos=num_bos)
    runner.generate(RUNNER_PROMPT, config, token_callback=pieces.append, stats_callback=stats.append)
    prompt_tokens = stats[-1].num_prompt_tokens if stats else None
    passed = pieces == expected_pieces and prompt_tokens == len(prompt_ids)
    return {"stage": "text_llm_runner", "prompt": RUNNER_PROMPT, "prompt_tokens": prompt_tokens,
            "expected_prompt_tokens": len(prompt_ids), "expected_pieces": expected_pieces, "actual_pieces": pieces,
            "generated_tokens": stats[-1].num_generated_tokens if stats else None, "passed": passed}
