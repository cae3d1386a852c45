"""Verify a folder of artifacts against the eager transformers model: used by the export job and by
``export-model verify``. The reference is loaded fresh with transformers' default attention and mask code."""

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
        reference_model = loading.load_model(model_dir)
        tokenizer = load_tokenizer(model_dir, progress)
        bos_id, eos_ids, _ = loading.special_ids(config, model_dir)
        plan = verify.default_plan(max_seq_len, loading.smallest_window(config))
        reference = verify.build_reference(reference_model, tokenizer, plan, set(eos_ids))
        report = {"reference": "transformers eager, default attention implementation "
                               f"({reference_model.config._attn_implementation})",
                  "plan": [{"prompt_length": length, "decode_steps": steps} for length, steps in plan.cases],
                  "artifacts": {}}
        generate_tokens = min(16, max_seq_len // 2)
        for recipe in recipes:
            name = artifacts[recipe.target]
            with native_output_captured():
                entry = _verify_artifact(recipe, folder / name, reference, reference_model, tokenizer, bos_id,
                                         set(eos_ids), generate_tokens)
            report["artifacts"][name] = entry
            progress.note(f"{name}: {'passed' if entry['passed'] else 'FAILED'}")
        report["passed"] = all(a["passed"] for a in report["artifacts"].values())
    return report


def _verify_artifact(recipe, path: Path, reference, reference_model, tokenizer, bos_id, eos_ids: set[int],
                     generate_tokens: int) -> dict:
    from exporter.runtime import open_session

    try:
        entry = verify.verify_session(open_session(path), reference, recipe.max_abs_diff, recipe.min_top1_agreement)
    except Exception as exc:  # a runtime that cannot run the artifact is a failed verification, reported
        entry = {"stages": [_error_stage("logits", exc)]}
    entry["recipe"] = recipe.name
    entry["stages"].append(_generation_check(recipe, path, reference_model, tokenizer, bos_id, eos_ids,
                                             generate_tokens))
    entry["passed"] = all(stage["passed"] for stage in entry["stages"])
    return entry


def _generation_check(recipe, path, reference_model, tokenizer, bos_id, eos_ids, generate_tokens) -> dict:
    """The runtime's own generation loop vs eager greedy tokens (ExecuTorch TextLLMRunner / ORT GenAI)."""
    if tokenizer is None or not (path.parent / "tokenizer.json").is_file():
        return {"stage": "runtime_generate", "skipped": "no tokenizer.json", "passed": True}
    try:
        if recipe.target == "executorch":
            return verify.verify_text_runner(path, path.parent / "tokenizer.json", reference_model, tokenizer,
                                             bos_id, eos_ids, generate_tokens)
        from exporter.genai import verify_genai

        window = loading.smallest_window(reference_model.config)
        stage = verify_genai(path.parent, reference_model, tokenizer, eos_ids, generate_tokens, batch_window=window)
        for timing in ("timings", "load_s"):  # speed is not verification, and would make reports differ run to run
            stage.pop(timing, None)
        return stage
    except Exception as exc:
        return _error_stage("text_llm_runner" if recipe.target == "executorch" else "genai_generate", exc)


def _error_stage(name: str, exc: Exception) -> dict:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return {"stage": name, "error": f"{type(exc).__name__}: {first}", "passed": False}
