"""Verify a folder of artifacts against the eager transformers model: used by the export job and by
``export-model verify``. References are loaded fresh with transformers' default attention and mask code.

Exact (fp32, unquantized) recipes are graded against the fp32 eager model. Quantized / reduced-precision recipes
are graded twice (see ``exporter.references``): against the matched eager reference with the recipe's tight
``[verify]`` thresholds, and against fp32 eager with ``[verify.fp32]`` (top-1 agreement, mean KL; stage names
prefixed ``vs fp32``).
"""

from __future__ import annotations

from pathlib import Path

from exporter import loading, verify
from exporter.progress import Progress
from exporter.quiet import native_output_captured


def load_tokenizer(folder: Path, progress: Progress):
    """The transformers tokenizer of ``folder``, or None (reported) when there is none or it cannot load."""
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        progress.note("no tokenizer files: verification uses seeded token ids, runner checks are skipped")
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a tokenizer that cannot load must not stop the export; it is reported
        progress.note(f"tokenizer could not be loaded ({str(exc).splitlines()[0][:120]}); runner checks skipped")
        return None


def verify_folder(folder: Path, artifacts: dict[str, str], recipes, model_dir: Path, config, max_seq_len: int,
                  progress: Progress) -> dict:
    """Check every artifact in ``folder`` (``artifacts``: target -> file name) and return the report.

    Logit stages run in each artifact's runtime (see ``verify``); then the runtime's own generation loop:
    ExecuTorch's ``TextLLMRunner`` for a ``.pte``, ONNX Runtime GenAI for an ONNX folder.
    """
    with progress.stage("verify", "against eager transformers (default attention)"):
        fp32_model = loading.load_model(model_dir)
        tokenizer = load_tokenizer(model_dir, progress)
        ids = loading.special_ids(config, model_dir)
        plan = verify.default_plan(max_seq_len, loading.smallest_window(config))
        fp32_reference = verify.build_reference(fp32_model, tokenizer, plan, set(ids.eos))
        report = {"reference": "transformers eager, default attention implementation "
                               f"({fp32_model.config._attn_implementation})",
                  "plan": [{"prompt_length": length, "decode_steps": steps} for length, steps in plan.cases],
                  "artifacts": {}}
        context = _Context(tokenizer, ids, min(16, max_seq_len // 2), plan, fp32_model, fp32_reference, model_dir)
        for recipe in recipes:
            name = artifacts[recipe.target]
            with native_output_captured():
                entry = _verify_artifact(recipe, folder / name, context)
            report["artifacts"][name] = entry
            progress.note(f"{name}: {'passed' if entry['passed'] else 'FAILED'}")
        report["passed"] = all(a["passed"] for a in report["artifacts"].values())
    return report


class _Context:
    def __init__(self, tokenizer, ids, generate_tokens, plan, fp32_model, fp32_reference, model_dir):
        self.tokenizer, self.ids, self.generate_tokens, self.plan = tokenizer, ids, generate_tokens, plan
        self.fp32_model, self.fp32_reference, self.model_dir = fp32_model, fp32_reference, model_dir


def _verify_artifact(recipe, path: Path, ctx: _Context) -> dict:
    from exporter.references import matched_reference_model
    from exporter.runtime import open_session

    matched_model, stages = ctx.fp32_model, []
    entry = {"recipe": recipe.name, "reference": "fp32 eager" if recipe.exact else
             f"eager quantized/cast like the artifact ({recipe.quantization}, {recipe.dtype}, embedding "
             f"{recipe.embedding_quantization}), and fp32 eager"}
    try:
        session = open_session(path)
        if recipe.exact:
            matched_reference = ctx.fp32_reference
        else:
            matched_model = matched_reference_model(recipe, ctx.model_dir, path)
            matched_reference = verify.build_reference(matched_model, ctx.tokenizer, ctx.plan, set(ctx.ids.eos))
        tight = verify.Thresholds(recipe.min_top1_agreement, recipe.max_abs_diff, recipe.max_rel_diff)
        graded = verify.verify_session(session, matched_reference, tight)
        entry["thresholds"], stages = graded["thresholds"], graded["stages"]
        if not recipe.exact:
            stages += _fp32_side(recipe, session, ctx, entry)
    except Exception as exc:  # a runtime that cannot run the artifact is a failed verification, reported
        stages.append(_error_stage("logits", exc))
    stages.append(_generation_check(recipe, path, matched_model, ctx))
    entry["stages"] = stages
    entry["passed"] = all(stage["passed"] for stage in stages)
    return entry


def _fp32_side(recipe, session, ctx: _Context, entry: dict) -> list[dict]:
    """Grade a quantized / reduced-precision artifact against fp32 eager: each stage by its mean KL, top-1 agreement
    pooled over every checked position (a 1-position stage would otherwise fail on a single flipped near-tie)."""
    kl_only = verify.Thresholds(0.0, max_mean_kl=recipe.fp32_max_mean_kl)
    stages = verify.verify_session(session, ctx.fp32_reference, kl_only, prefix=verify.FP32_PREFIX)["stages"]
    positions = sum(s["positions"] for s in stages)
    pooled = sum(s["top1_agreement"] * s["positions"] for s in stages) / positions
    entry["fp32_thresholds"] = {"min_top1_agreement (all positions)": recipe.fp32_min_top1_agreement,
                                "max_mean_kl (each stage)": recipe.fp32_max_mean_kl}
    stages.append({"stage": f"{verify.FP32_PREFIX}top1[all {positions} positions]", "positions": positions,
                   "top1_agreement": pooled, "passed": pooled >= recipe.fp32_min_top1_agreement})
    return stages


def _generation_check(recipe, path, matched_model, ctx: _Context) -> dict:
    """The runtime's own generation loop vs greedy tokens (ExecuTorch TextLLMRunner / ORT GenAI).

    Exact recipes: eager greedy. Quantized ExecuTorch artifacts: the artifact's own greedy tokens through the
    step function graded above (dynamic activation quantization rounds a few values differently from eager, which
    may flip a near-tie token; the runner check is about the runner contract, the logits were graded above).
    """
    if ctx.tokenizer is None or not (path.parent / "tokenizer.json").is_file():
        return {"stage": "runtime_generate", "skipped": "no tokenizer.json", "passed": True}
    eos = set(ctx.ids.eos)
    try:
        if recipe.target == "executorch":
            if recipe.exact:
                def expected(prompt_ids, n):
                    return verify.eager_greedy(matched_model, prompt_ids, n, eos)
            else:
                def expected(prompt_ids, n):
                    from exporter.runtime import greedy_generate, open_session

                    return greedy_generate(open_session(path), prompt_ids, n, eos)["tokens"]
            stage = verify.verify_text_runner(path, path.parent / "tokenizer.json", ctx.tokenizer, ctx.ids.bos,
                                              expected, ctx.generate_tokens)
            if not recipe.exact:
                stage["expected_from"] = "the artifact's greedy tokens through the verified step function"
            return stage
        from exporter.genai import verify_genai

        window = loading.smallest_window(matched_model.config)
        stage = verify_genai(path.parent, matched_model, ctx.tokenizer, eos, ctx.generate_tokens, batch_window=window)
        for timing in ("timings", "load_s"):  # speed is not verification, and would make reports differ run to run
            stage.pop(timing, None)
        return stage
    except Exception as exc:
        return _error_stage("text_llm_runner" if recipe.target == "executorch" else "genai_generate", exc)


def _error_stage(name: str, exc: Exception) -> dict:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return {"stage": name, "error": f"{type(exc).__name__}: {first}", "passed": False}
