"""Verify a folder of artifacts against the eager transformers model: used by the export job and by
``export-model verify``. References are loaded fresh with transformers' default attention and mask code.

Exact (fp32, unquantized) recipes are graded against the fp32 eager model. Quantized / reduced-precision recipes
are graded twice (see ``exporter.verification.reference``): against the matched eager reference with the recipe's
tight ``[verify]`` thresholds, and against fp32 eager with ``[verify.fp32]`` (top-1 agreement, mean KL; stage names
prefixed ``vs fp32``). Then each backend's own generation check (its runtime's generation loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from exporter import backends
from exporter.checkpoint import Checkpoint
from exporter.errors import first_line
from exporter.progress import Progress
from exporter.quiet import native_output_captured
from exporter.verification.compare import FP32_PREFIX, Thresholds, error_stage, verify_session
from exporter.verification.plan import VerifyPlan, default_plan
from exporter.verification.reference import Reference, build_reference


@dataclass
class VerifyContext:
    """What every artifact's verification shares: the checkpoint, its tokenizer, the plan, the fp32 reference."""

    checkpoint: Checkpoint
    tokenizer: object | None
    generate_tokens: int
    plan: VerifyPlan
    fp32_model: object
    fp32_reference: Reference

    @property
    def eos(self) -> set[int]:
        return set(self.checkpoint.special_ids.eos)


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
    """Check every artifact in ``folder`` (``artifacts``: target -> file name) and return the report.

    Logit stages run in each artifact's runtime; then the runtime's own generation loop (ExecuTorch's
    ``TextLLMRunner`` for a ``.pte``, ONNX Runtime GenAI for an ONNX folder).
    """
    with progress.stage("verify", "against eager transformers (default attention)"):
        fp32_model = checkpoint.load_model()
        tokenizer = load_tokenizer(checkpoint.folder, progress)
        plan = default_plan(max_seq_len, checkpoint.smallest_window)
        report = {"reference": "transformers eager, default attention implementation "
                               f"({fp32_model.config._attn_implementation})",
                  "plan": [{"prompt_length": length, "decode_steps": steps} for length, steps in plan.cases],
                  "artifacts": {}}
        context = VerifyContext(checkpoint, tokenizer, min(16, max_seq_len // 2), plan, fp32_model,
                                build_reference(fp32_model, tokenizer, plan))
        for recipe in recipes:
            name = artifacts[recipe.target]
            with native_output_captured():
                entry = _verify_artifact(recipe, folder / name, context)
            report["artifacts"][name] = entry
            progress.note(f"{name}: {'passed' if entry['passed'] else 'FAILED'}")
        report["passed"] = all(a["passed"] for a in report["artifacts"].values())
    return report


def _verify_artifact(recipe, path: Path, ctx: VerifyContext) -> dict:
    backend = backends.get(recipe.target)
    matched_model, stages = ctx.fp32_model, []
    entry = {"recipe": recipe.name, "reference": "fp32 eager" if recipe.exact else
             f"eager quantized/cast like the artifact ({recipe.quantization}, {recipe.dtype}, embedding "
             f"{recipe.embedding_quantization}), and fp32 eager"}
    try:
        session = backend.open_session(path)
        if recipe.exact:
            matched_reference = ctx.fp32_reference
        else:
            matched_model = backend.matched_reference(recipe, ctx.checkpoint.load_model(), path)
            matched_reference = build_reference(matched_model, ctx.tokenizer, ctx.plan)
        tight = Thresholds(recipe.min_top1_agreement, recipe.max_abs_diff, recipe.max_rel_diff)
        graded = verify_session(session, matched_reference, tight)
        entry["thresholds"], stages = graded["thresholds"], graded["stages"]
        if not recipe.exact:
            stages += _fp32_side(recipe, session, ctx, entry)
    except Exception as exc:  # noqa: BLE001 - a runtime that cannot run the artifact is a failed verification
        stages.append(error_stage("logits", exc))
    if ctx.tokenizer is None or not (path.parent / "tokenizer.json").is_file():
        stages.append({"stage": "runtime_generate", "skipped": "no tokenizer.json", "passed": True})
    else:
        stages.append(backend.generation_check(recipe, path, matched_model, ctx))
    entry["stages"] = stages
    entry["passed"] = all(stage["passed"] for stage in stages)
    return entry


def _fp32_side(recipe, session, ctx: VerifyContext, entry: dict) -> list[dict]:
    """Grade a quantized / reduced-precision artifact against fp32 eager: each stage by its mean KL, top-1 agreement
    pooled over every checked position (a 1-position stage would otherwise fail on a single flipped near-tie)."""
    kl_only = Thresholds(0.0, max_mean_kl=recipe.fp32_max_mean_kl)
    stages = verify_session(session, ctx.fp32_reference, kl_only, prefix=FP32_PREFIX)["stages"]
    positions = sum(s["positions"] for s in stages)
    pooled = sum(s["top1_agreement"] * s["positions"] for s in stages) / positions
    entry["fp32_thresholds"] = {"min_top1_agreement (all positions)": recipe.fp32_min_top1_agreement,
                                "max_mean_kl (each stage)": recipe.fp32_max_mean_kl}
    stages.append({"stage": f"{FP32_PREFIX}top1[all {positions} positions]", "positions": positions,
                   "top1_agreement": pooled, "passed": pooled >= recipe.fp32_min_top1_agreement})
    return stages
