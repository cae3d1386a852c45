"""Verify a folder of artifacts against the eager transformers model: used by the export job and by
``export-model verify``. References are loaded fresh with transformers' default attention and mask code.

Every artifact runs every case of the plan once in its own runtime (``exporter.verification.plan``). Exact (fp32,
unquantized) recipes are graded against a float64 forward of the checkpoint, with eager fp32's own error as the
noise floor. Quantized / reduced-precision recipes are graded twice on the same run: against the matched eager
reference (the same eager model quantized / cast like the artifact, teacher-forced on the same tokens) with the
recipe's tight ``[verify]`` thresholds, and against fp32 eager with ``[verify.fp32]`` (stage names prefixed
``vs fp32``). Then each backend checks the artifact's metadata against the checkpoint and runs its runtime's own
generation loop.

Memory: at most one model-sized thing besides the reference logits at a time. The fp32 reference model computes the
reference logits case by case and is freed before any artifact is opened; each artifact's session runs the cases and
is freed before the matched reference (quantized recipes) is built and before the metadata check and the runtime's
own generation loop load the artifact again; an exact recipe's generation check gets the fp32 reference loaded
afresh (the same weights), and drops it after. Each phase is a progress stage with its own count and peak memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from exporter import backends, memory
from exporter.checkpoint import Checkpoint
from exporter.errors import first_line
from exporter.progress import Progress
from exporter.quiet import native_output_captured
from exporter.verification.compare import FP32_PREFIX, Thresholds, error_stage, grade, pooled_stage, run_case
from exporter.verification.plan import VerifyPlan, default_plan
from exporter.verification.reference import Reference, build_reference


@dataclass
class VerifyContext:
    """What every artifact's verification shares: the checkpoint, its tokenizer, the plan, the fp32 reference."""

    checkpoint: Checkpoint
    max_seq_len: int
    tokenizer: object | None
    generate_tokens: int
    plan: VerifyPlan
    fp32_reference: Reference

    @property
    def eos(self) -> set[int]:
        return set(self.checkpoint.special_ids.eos)

    def allowed_error(self, stages: list[dict]) -> float:
        """The largest logit error the graded stages allowed (a near-tie below it may flip a greedy token)."""
        return max((s.get("allowed_error", 0.0) for s in stages), default=0.0)


def load_tokenizer(folder: Path, progress: Progress):
    """The transformers tokenizer of ``folder``, or None (reported) when there is none or it cannot load."""
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        progress.note("no tokenizer files: verification uses seeded token ids, runner checks are skipped")
        return None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - a tokenizer that cannot load must not stop the export; reported
        progress.note(f"tokenizer could not be loaded ({first_line(exc, 120)}); runner checks skipped")
        return None


def verify_folder(folder: Path, artifacts: dict[str, str], recipes, checkpoint: Checkpoint, max_seq_len: int,
                  progress: Progress) -> dict:
    """Check every artifact in ``folder`` (``artifacts``: target -> file name) and return the report."""
    plan = default_plan(max_seq_len, checkpoint.smallest_window)
    float64 = any(r.exact for r in recipes)
    what = f"eager reference, {len(plan.cases)} cases (fp32{' and float64' if float64 else ''})"
    with progress.stage("verify", what, total=len(plan.cases)) as stage:
        stage.advance(0, "loading the fp32 reference")
        fp32_model = checkpoint.load_reference()
        tokenizer = load_tokenizer(checkpoint.folder, progress)
        reference = _reference(fp32_model, tokenizer, plan, stage, float64=float64)
        report = {"reference": "transformers eager, default attention implementation "
                               f"({fp32_model.config._attn_implementation}); exact recipes against a float64 "
                               "forward of the same weights"
                               + ("; the composite model's own text-only forward" if checkpoint.composite else ""),
                  "plan": {"prefill_chunk": plan.prefill_chunk,
                           "cases": [{"name": case.name or "prompt", "fresh": case.fresh,
                                      "turns": [{"tokens": t.length, "decode_steps": t.decode} for t in case.turns]}
                                     for case in plan.cases]},
                  "artifacts": {}}
        fp32_model = None  # the artifacts' sessions must not share the memory with it
        memory.release_memory()
    context = VerifyContext(checkpoint, max_seq_len, tokenizer, min(32, max_seq_len // 2), plan, reference)
    for recipe in recipes:
        name = artifacts[recipe.target]
        backend = backends.get(recipe.target)
        steps = len(plan.cases) * (1 if recipe.exact else 2) + 2  # its cases (+ the matched reference's), checks
        with progress.stage("verify", f"{name} ({recipe.name}) in {backend.runtime}", total=steps) as stage:
            with native_output_captured():
                entry = _verify_artifact(recipe, folder / name, context, stage)
            progress.note(f"{name}: {'passed' if entry['passed'] else 'FAILED'}")
        report["artifacts"][name] = entry
        memory.release_memory()
    report["passed"] = all(a["passed"] for a in report["artifacts"].values())
    return report


def _reference(model, tokenizer, plan: VerifyPlan, counter, float64: bool = False,
               tokens: list[list[int]] | None = None) -> Reference:
    """``build_reference`` one case at a time (the same computation), counting the cases on stage ``counter``."""
    cases = []
    for index, case in enumerate(plan.cases):
        counter.advance(0, f"reference case {index + 1}: {case.name or 'prompt'}, {case.length} tokens")
        one = VerifyPlan(cases=[case], prefill_chunk=plan.prefill_chunk)
        cases += build_reference(model, tokenizer, one, float64=float64,
                                 tokens=None if tokens is None else [tokens[index]]).cases
        counter.advance()
    return Reference(plan=plan, cases=cases)


def _verify_artifact(recipe, path: Path, ctx: VerifyContext, counter) -> dict:
    backend = backends.get(recipe.target)
    matched_model, stages = None, []
    entry = {"recipe": recipe.name, "reference": "float64 eager (noise floor: fp32 eager)" if recipe.exact else
             f"eager quantized/cast like the artifact ({recipe.quantization}, {recipe.dtype}, embedding "
             f"{recipe.embedding_quantization}), and fp32 eager"}
    try:
        counter.advance(0, "loading the artifact")
        session = backend.open_session(path)
        logits = []
        for index, case in enumerate(ctx.fp32_reference.cases):
            counter.advance(0, f"case {index + 1}: {case.case.name or 'prompt'}, {len(case.tokens)} tokens")
            logits.append(run_case(session, ctx.fp32_reference, case))
            counter.advance()
        session = None  # freed before anything else loads a model or the artifact again
        memory.release_memory()
        tight = Thresholds(recipe.min_top1_agreement, recipe.max_abs_diff, recipe.max_rel_diff,
                           max_error_ratio=recipe.max_error_ratio, floor_ulps=recipe.floor_ulps)
        entry["thresholds"] = tight.as_dict()
        if recipe.exact:
            stages = grade(logits, ctx.fp32_reference, tight)
        else:
            counter.advance(0, "matched reference")
            matched_model = backend.matched_reference(recipe, ctx.checkpoint.load_model(), path)
            matched = _reference(matched_model, ctx.tokenizer, ctx.plan, counter,
                                 tokens=[case.tokens for case in ctx.fp32_reference.cases])
            # per stage: the max rel / abs diff; top-1 pooled over every position (``pooled_stage``)
            per_stage = Thresholds(0.0, recipe.max_abs_diff, recipe.max_rel_diff)
            stages = grade(logits, matched, per_stage)
            stages = stages + [pooled_stage(stages, "top1", recipe.min_top1_agreement)]
            stages += _fp32_side(recipe, logits, ctx, entry)
    except Exception as exc:  # noqa: BLE001 - a runtime that cannot run the artifact is a failed verification
        stages.append(error_stage("logits", exc))
    session = logits = None
    memory.release_memory()
    counter.advance(0, "metadata")
    stages.append(_guarded("metadata", lambda: backend.metadata_check(path, ctx.checkpoint, ctx.max_seq_len)))
    counter.advance()
    if ctx.tokenizer is None or not (path.parent / "tokenizer.json").is_file():
        stages.append({"stage": "runtime_generate", "skipped": "no tokenizer.json", "passed": True})
    else:
        counter.advance(0, f"{backend.runtime} generation")
        context = {"allowed_error": ctx.allowed_error(stages)}
        reference_model = matched_model if matched_model is not None else ctx.checkpoint.load_reference()
        matched_model = None
        stages.append(backend.generation_check(recipe, path, reference_model, ctx, **context))
    counter.advance()
    entry["stages"] = stages
    entry["passed"] = all(stage["passed"] for stage in stages)
    return entry


def _guarded(name: str, check) -> dict:
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - a check that cannot run is a failed stage, reported
        return error_stage(name, exc)


def _fp32_side(recipe, logits, ctx: VerifyContext, entry: dict) -> list[dict]:
    """Grade a quantized / reduced-precision artifact against fp32 eager: mean KL and top-1 agreement pooled over
    every checked position (``pooled_stage``); each stage's own figures are reported beside it, not graded (a
    1-position stage of a trained model's 4-bit artifact ranges over KL 0.05..3, measured on SmolLM2-135M)."""
    stages = grade(logits, ctx.fp32_reference, Thresholds(0.0), prefix=FP32_PREFIX)
    for stage in stages:
        stage["graded"] = "pooled"
    entry["fp32_thresholds"] = {"min_top1_agreement (all positions)": recipe.fp32_min_top1_agreement,
                                "max_mean_kl (all positions)": recipe.fp32_max_mean_kl}
    stages.append(pooled_stage(stages, f"{FP32_PREFIX}pooled", recipe.fp32_min_top1_agreement,
                               recipe.fp32_max_mean_kl))
    return stages
