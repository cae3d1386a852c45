"""Grading an artifact session against an eager reference, stage by stage.

The reference is the checkpoint loaded fresh with transformers' default attention and mask code. Stages:
- ``prefill[L]`` for each prompt (a fresh cache each): artifact logits vs eager logits at every prompt position;
- ``decode[L+N]``: after a prompt of length L, N single-token steps teacher-forced on eager's greedy tokens.
Each stage reports max abs diff, max rel diff (max abs diff / max |reference logit|), top-1 agreement and mean KL
divergence KL(reference || artifact) of the softmax distributions, and passes when every threshold it is given holds
(``Thresholds``: from the recipe's ``[verify]`` against the matched reference, ``[verify.fp32]`` against fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporter.errors import describe
from exporter.verification.reference import Reference

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


def headline(entry: dict) -> tuple[str, str]:
    """(worst max abs diff, worst top-1 agreement) over an artifact's logit stages against its matched reference,
    formatted; "-" if none ran."""
    numeric = [s for s in entry["stages"] if "max_abs_diff" in s and not s["stage"].startswith(FP32_PREFIX)]
    if not numeric:
        return "-", "-"
    return (f"{max(s['max_abs_diff'] for s in numeric):.2e}",
            f"{min(s['top1_agreement'] for s in numeric) * 100:.0f}%")


def error_stage(name: str, exc: Exception) -> dict:
    """A failed stage reporting ``exc`` on one line."""
    return {"stage": name, "error": describe(exc), "passed": False}
