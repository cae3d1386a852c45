"""Grading an artifact session against eager references, stage by stage.

Each case of the plan runs once on the artifact's session (every forward as ``plan.steps`` says); its logits are
cut into stages: ``prefill[L]`` (a prompt, or its first chunk), ``chunk[S+N]`` (N input tokens at start position
S > 0: a prompt's later chunk or a chat's next message), ``decode[S+N]`` (N single-token steps from position S).
Stage names carry the case's name (``multi-turn chunk[10+11]``).

Criteria (``Thresholds``, from the recipe's ``[verify]`` / ``[verify.fp32]``):
- exact recipes, against the float64 forward of the same weights: the artifact's max |logit error| must be within
  ``max_error_ratio`` times eager fp32's own max error on the same positions, plus ``floor_ulps`` ulps of the
  stage's largest logit; and its top-1 must equal float64's at every position whose top-2 margin exceeds twice
  that allowance (where no error within the allowance could flip it);
- quantized / reduced-precision recipes, against the matched reference: max abs / max rel diff (relative to the
  largest reference logit) and top-1 agreement; against fp32 eager (``vs fp32`` stages): mean KL(fp32 || artifact)
  per stage and top-1 agreement pooled over all positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporter.errors import describe
from exporter.verification.reference import CaseReference, Reference

FP32_PREFIX = "vs fp32 "  # stage-name prefix of the second side of a quantized artifact's verification


@dataclass(frozen=True)
class Thresholds:
    """Pass conditions for a logit stage; None = not checked."""

    min_top1_agreement: float
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    max_mean_kl: float | None = None
    max_error_ratio: float | None = None  # vs float64, in units of eager fp32's own error (exact recipes)
    floor_ulps: float | None = None  # added to the ratio's allowance, in ulps of the stage's largest logit

    def passes(self, stage: dict) -> bool:
        if self.max_error_ratio is not None:
            return (stage["error_vs_float64"] <= stage["allowed_error"]
                    and stage["top1_agreement_margin_safe"] >= self.min_top1_agreement)
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


def compare_to_float64(actual: np.ndarray, eager32: np.ndarray, eager64: np.ndarray, thresholds: Thresholds) -> dict:
    """The artifact's error against the float64 forward next to eager fp32's own (the noise floor), the allowance
    ``max_error_ratio * noise + floor_ulps * ulp(scale)``, and top-1 on all and on margin-safe positions."""
    actual64 = actual.astype(np.float64)
    finite = bool(np.isfinite(actual).all())
    error = float(np.abs(actual64 - eager64).max()) if finite else float("inf")
    noise = float(np.abs(eager32.astype(np.float64) - eager64).max())
    scale = float(np.abs(eager64).max())
    ulp = float(np.spacing(np.float32(scale)))
    allowed = thresholds.max_error_ratio * noise + (thresholds.floor_ulps or 0.0) * ulp
    top2 = np.sort(eager64, axis=-1)[:, -2:]
    safe = (top2[:, 1] - top2[:, 0]) > 2 * allowed
    agree = actual.argmax(-1) == eager64.argmax(-1)
    return {"positions": int(eager64.shape[0]), "error_vs_float64": error, "eager_fp32_error_vs_float64": noise,
            "error_ratio": error / noise if noise > 0 else float("inf") if error > 0 else 0.0,
            "logit_scale": scale, "allowed_error": allowed,
            "max_abs_diff": float(np.abs(actual64 - eager32).max()) if finite else float("inf"),
            "top1_agreement": float(agree.mean()), "margin_safe_positions": int(safe.sum()),
            "top1_agreement_margin_safe": float(agree[safe].mean()) if safe.any() else 1.0}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def run_case(session, reference: Reference, case: CaseReference) -> np.ndarray:
    """Feed ``case`` to ``session`` as the plan says (a fresh sequence unless the case continues the previous
    program); the logits of every position ``[T, V]``."""
    if case.case.fresh:
        session.reset()
    rows = [session.step(case.tokens[start:start + count], start)
            for start, count, _ in reference.plan.steps(case.case)]
    return np.concatenate(rows)


def stage_slices(reference: Reference, case: CaseReference) -> list[tuple[dict, slice]]:
    """``(stage fields, positions)`` of ``case``: one stage per input chunk, one per run of decode steps."""
    prefix = f"{case.case.name} " if case.case.name else ""
    stages = []
    for start, count, kind in reference.plan.steps(case.case):
        if kind == "decode" and stages and stages[-1][0]["kind"] == "decode" \
                and stages[-1][1].stop == start:
            fields, positions = stages[-1]
            stages[-1] = (fields, slice(positions.start, start + 1))
            continue
        stages.append(({"kind": kind, "start_pos": start}, slice(start, start + count)))
    named = []
    for fields, positions in stages:
        start, tokens = positions.start, positions.stop - positions.start
        if fields["kind"] == "decode":
            name = f"decode[{start}+{tokens}]"
        elif start == 0:
            name = f"prefill[{tokens}]"
        else:
            name = f"chunk[{start}+{tokens}]"
        named.append(({"stage": prefix + name, "start_pos": start, "tokens": tokens}, positions))
    return named


def grade(logits: list[np.ndarray], reference: Reference, thresholds: Thresholds, prefix: str = "") -> list[dict]:
    """Stages of every case (``logits``: the artifact's, per case) graded against ``reference``: against its
    float64 logits when ``thresholds`` has ``max_error_ratio``, else against its fp32 logits."""
    stages = []
    for actual, case in zip(logits, reference.cases):
        for fields, positions in stage_slices(reference, case):
            if thresholds.max_error_ratio is not None:
                metrics = compare_to_float64(actual[positions], case.logits[positions], case.logits64[positions],
                                             thresholds)
            else:
                metrics = compare(actual[positions], case.logits[positions])
            stage = {**fields, "stage": prefix + fields["stage"], **metrics}
            stage["passed"] = thresholds.passes(stage)
            stages.append(stage)
    return stages


def headline(entry: dict) -> tuple[str, str]:
    """(worst error, worst top-1 agreement) over an artifact's logit stages against its own reference
    (``x<ratio>`` of eager fp32's error vs float64 for exact recipes, max abs diff otherwise), formatted."""
    numeric = [s for s in entry["stages"] if "top1_agreement" in s and not s["stage"].startswith(FP32_PREFIX)
               and "positions" in s and ("max_abs_diff" in s)]
    if not numeric:
        return "-", "-"
    top1 = f"{min(s['top1_agreement'] for s in numeric) * 100:.0f}%"
    if all("error_ratio" in s for s in numeric):
        return f"x{max(s['error_ratio'] for s in numeric):.2f} noise", top1
    return f"{max(s['max_abs_diff'] for s in numeric):.2e}", top1


def error_stage(name: str, exc: Exception) -> dict:
    """A failed stage reporting ``exc`` on one line."""
    return {"stage": name, "error": describe(exc), "passed": False}


def pooled_stage(stages: list[dict], name: str, min_top1: float, max_mean_kl: float | None = None) -> dict:
    """One stage over every position of ``stages``: top-1 agreement and mean KL weighted by positions, graded
    against ``min_top1`` / ``max_mean_kl``. Reduced-precision artifacts are graded pooled: on a trained model a
    1..8-position stage flips on a single near-tie (measured on SmolLM2-135M: per-stage top-1 down to 0.625 with
    0.954 pooled over 458 positions), so a per-stage top-1 says little; the pooled value is a measurement."""
    positions = sum(s["positions"] for s in stages)
    top1 = sum(s["top1_agreement"] * s["positions"] for s in stages) / positions
    stage = {"stage": f"{name}[all {positions} positions]", "positions": positions, "top1_agreement": top1}
    passed = top1 >= min_top1
    if max_mean_kl is not None:
        stage["mean_kl"] = sum(s["mean_kl"] * s["positions"] for s in stages) / positions
        passed = passed and stage["mean_kl"] <= max_mean_kl
    stage["passed"] = passed
    return stage
