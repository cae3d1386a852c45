"""Verification: every artifact is compared with the unmodified eager transformers model.

The reference is the checkpoint loaded fresh with transformers' default attention and mask code. Stages:
- ``prefill[L]`` for each prompt (a fresh cache each): artifact logits vs eager logits at every prompt position;
- ``decode[L+N]``: after a prompt of length L, N single-token steps teacher-forced on eager's greedy tokens.
Each stage reports max abs diff, max rel diff (max abs diff / max |reference logit|), top-1 agreement and mean KL
divergence KL(reference || artifact) of the softmax distributions, and passes when every threshold it is given holds
(``Thresholds``: from the recipe's ``[verify]`` against the matched reference, ``[verify.fp32]`` against fp32).
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
FP32_PREFIX = "vs fp32 "  # stage-name prefix of the second side of a quantized artifact's verification


@dataclass(frozen=True)
class Thresholds:
    """Pass conditions for a logit stage; None = not checked."""

    min_top1_agreement: float
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    max_mean_kl: float | None = None

    def passes(self, stage: dict) -> bool:
        return (stage["top1_agreement"] >= self.min_top1_agreement
                and (self.max_abs_diff is None or stage["max_abs_diff"] <= self.max_abs_diff)
                and (self.max_rel_diff is None or stage["max_rel_diff"] <= self.max_rel_diff)
                and (self.max_mean_kl is None or stage["mean_kl"] <= self.max_mean_kl))

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class VerifyPlan:
    """Prompts to check: ``(prompt length, teacher-forced decode steps after it)`` each, on a fresh cache."""

    cases: list[tuple[int, int]]


@dataclass
class CaseReference:
    """Eager token ids and logits for one prompt and its decode steps."""

    prompt: list[int]
    prompt_logits: np.ndarray  # [L, V]
    decode_tokens: list[int]  # eager greedy continuation, fed one at a time after the prompt
    decode_logits: np.ndarray  # [N, V]


@dataclass
class Reference:
    cases: list[CaseReference]
    eos_ids: set[int] = field(default_factory=set)


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


@torch.no_grad()
def build_reference(model, tokenizer, plan: VerifyPlan, eos_ids: set[int]) -> Reference:
    """Run the eager reference ``model`` (default attention, no cache) for every case of ``plan``."""
    vocab_size = model.config.get_text_config().vocab_size
    cases = []
    for length, steps in plan.cases:
        prompt = prompt_token_ids(tokenizer, vocab_size, length)
        prompt_logits = _logits(model, prompt)
        sequence, next_token = list(prompt), int(np.argmax(prompt_logits[-1]))
        for _ in range(steps):
            sequence.append(next_token)
            next_token = int(np.argmax(_logits(model, sequence)[-1]))
        full = _logits(model, sequence) if steps else prompt_logits
        cases.append(CaseReference(prompt, prompt_logits, sequence[length:], full[length:]))
    return Reference(cases=cases, eos_ids=eos_ids)


def _logits(model, ids: list[int]) -> np.ndarray:
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def compare(actual: np.ndarray, expected: np.ndarray) -> dict:
    """Max abs diff, max rel diff (normalised by the largest reference logit), top-1 agreement and mean
    KL(expected || actual) in nats over positions (inf when the artifact produced non-finite logits)."""
    actual64, expected64 = actual.astype(np.float64), expected.astype(np.float64)
    finite = bool(np.isfinite(actual).all())
    max_abs = float(np.abs(actual64 - expected64).max()) if finite else float("inf")
    scale = float(np.abs(expected).max()) or 1.0
    top1 = float((actual.argmax(-1) == expected.argmax(-1)).mean())
    mean_kl = float("inf")
    if finite:
        log_p, log_q = _log_softmax(expected64), _log_softmax(actual64)
        mean_kl = float(max(0.0, (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()))
    return {"positions": int(expected.shape[0]), "max_abs_diff": max_abs, "max_rel_diff": max_abs / scale,
            "top1_agreement": top1, "mean_kl": mean_kl}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def verify_session(session, reference: Reference, thresholds: Thresholds, prefix: str = "") -> dict:
    """Run every case on an artifact session (see ``runtime``) and grade it against ``reference``; stage names get
    ``prefix`` (e.g. ``"vs fp32 "``)."""
    stages = []
    for case in reference.cases:
        session.reset()
        stages.append({"stage": f"{prefix}prefill[{len(case.prompt)}]", **compare(session.step(case.prompt, 0),
                                                                          case.prompt_logits)})
        if case.decode_tokens:
            position, steps = len(case.prompt), []
            for token in case.decode_tokens:
                steps.append(session.step([token], position)[-1])
                position += 1
            stages.append({"stage": f"{prefix}decode[{len(case.prompt)}+{len(steps)}]",
                           **compare(np.stack(steps), case.decode_logits)})
    for stage in stages:
        stage["passed"] = thresholds.passes(stage)
    return {
        "thresholds": thresholds.as_dict(),
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


def verify_text_runner(pte_path, tokenizer_path, tokenizer, bos_id, expected_greedy, max_new_tokens: int) -> dict:
    """Generate with ExecuTorch's ``TextLLMRunner`` (temperature 0); its decoded pieces must be the expected greedy
    tokens decoded one by one (the runner's Python API returns text pieces, not ids). ``expected_greedy(prompt_ids,
    max_new_tokens)`` gives the expected ids (eager greedy, or for quantized artifacts the artifact's own greedy
    through the verified step function)."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from exporter.runtime import executorch_data_file, load_executorch_kernels

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


def headline(entry: dict) -> tuple[str, str]:
    """(worst max abs diff, worst top-1 agreement) over an artifact's logit stages against its matched reference,
    formatted; "-" if none ran."""
    numeric = [s for s in entry["stages"] if "max_abs_diff" in s and not s["stage"].startswith(FP32_PREFIX)]
    if not numeric:
        return "-", "-"
    return (f"{max(s['max_abs_diff'] for s in numeric):.2e}",
            f"{min(s['top1_agreement'] for s in numeric) * 100:.0f}%")
