"""ExecuTorch target: a ``.pte`` for the XNNPACK delegate (+ ``model.ptd`` with ``external_weights``).

Sub-modules: ``build`` (quantize -> wrap -> capture -> lower), ``wrapper`` and ``cache`` (the static cache as
mutable buffers, the custom-op layout), ``quantize`` (torchao), ``lower`` (XNNPACK, runner metadata),
``lowering_speedups``, ``runtime`` (sessions, ``TextLLMRunner``). They import ExecuTorch and torchao, so this
module imports them only inside the methods that need them (validating a recipe loads neither).
"""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.backends.base import Backend
from exporter.errors import UserError
from exporter.generation import EagerSession, eager_margin, greedy_generate
from exporter.verification.compare import error_stage
from exporter.verification.plan import prefill_chunk, runner_texts


class ExecuTorchBackend(Backend):
    target = "executorch"
    artifact = "model.pte"
    runtime = "executorch"
    default_recipe = "xnnpack-fp32"
    dtype_recipes = {"float32": "xnnpack-fp32", "float16": "xnnpack-fp16"}
    options = {
        "backend": ("xnnpack",),
        "dtype": ("float32", "float16"),  # XNNPACK 1.5.1 has no bf16 kernels
        "quantization": ("none", "8da4w", "8da8w"),
        "embedding_quantization": ("none", "4w", "8w"),
        "attention": ("export_safe", "executorch_custom_ops"),
        "kv_cache": ("static",),
        "ort_fusions": ("none",),
        "external_weights": (False, True),
    }
    default_group_size = {"none": 0, "8da4w": 32, "8da8w": 0}

    def check_recipe(self, recipe, where: str) -> None:
        if recipe.group_size % 32:
            raise UserError(f"recipe {where}: XNNPACK needs a group size that is a multiple of 32, "
                            f"got {recipe.group_size}")
        if recipe.quantization == "8da8w" and recipe.group_size:
            raise UserError(f"recipe {where}: 8da8w is per channel on XNNPACK (group size 0), got {recipe.group_size}")
        if recipe.quantization == "8da4w" and not recipe.group_size:
            raise UserError(f"recipe {where}: 8da4w needs a group size (XNNPACK int4 weights are blockwise)")

    def build(self, recipe, model, checkpoint, max_seq_len: int, staging: Path, progress) -> dict:
        from exporter.backends.executorch.build import build_executorch

        return build_executorch(recipe, model, checkpoint, max_seq_len, staging, progress)

    def open_session(self, path: Path, threads: int | None = None):
        from exporter.backends.executorch.runtime import ExecuTorchSession

        return ExecuTorchSession(path)

    def matched_reference(self, recipe, model, artifact: Path):
        """float16: the eager model cast to float16; quantized: torchao with the recipe's scheme and group size."""
        if recipe.dtype == "float16":
            return model.to(torch.float16)  # the recipe validator refuses float16 together with quantization
        from exporter.backends.executorch.quantize import quantize_model

        embedding = None if recipe.embedding_quantization == "none" else recipe.embedding_quantization
        quantize_model(model, recipe.quantization, recipe.group_size, embedding)
        return model

    def generation_check(self, recipe, artifact: Path, reference_model, context, allowed_error: float = 0.0) -> dict:
        """ExecuTorch's ``TextLLMRunner`` (temperature 0) driven like a chat app (``runtime.verify_text_runner``) vs
        greedy tokens. Exact recipes: eager greedy, a near-tie within the verified logit allowance may part them.
        Quantized artifacts: the artifact's own greedy tokens through the step function graded before, exactly
        (dynamic activation quantization rounds a few values differently from eager, which may flip a near-tie
        token; this check is about the runner contract, the logits were graded against the matched reference)."""
        from exporter.backends.executorch.runtime import ExecuTorchSession, verify_text_runner

        try:
            def expected(prompt_ids, n, chunks):
                if recipe.exact:
                    return greedy_generate(EagerSession(reference_model), prompt_ids, n, context.eos)["tokens"]
                return greedy_generate(ExecuTorchSession(artifact), prompt_ids, n, context.eos, chunks)["tokens"]

            stage = verify_text_runner(artifact, context.tokenizer, context.checkpoint.special_ids.bos,
                                       set(context.eos), expected,
                                       eager_margin(reference_model), allowed_error if recipe.exact else 0.0,
                                       context.generate_tokens, runner_texts(context.tokenizer), context.max_seq_len)
            if not recipe.exact:
                stage["expected_from"] = "the artifact's greedy tokens through the verified step function"
            return stage
        except Exception as exc:  # noqa: BLE001 - a runner that cannot run the artifact is a failed stage
            return error_stage("text_llm_runner", exc)

    def metadata_check(self, artifact: Path, checkpoint, max_seq_len: int) -> dict:
        """The constant methods ``TextLLMRunner`` reads, against the checkpoint and the export request."""
        from exporter.backends.executorch.runtime import ExecuTorchSession

        session = ExecuTorchSession(artifact)
        ids = checkpoint.special_ids
        expected = {"get_max_context_len": max_seq_len, "get_max_seq_len": prefill_chunk(max_seq_len),
                    "get_vocab_size": checkpoint.vocab_size, "get_eos_ids": sorted(ids.eos),
                    "use_kv_cache": True, "enable_dynamic_shape": True}
        if ids.bos is not None:
            expected["get_bos_id"] = ids.bos
        actual = {}
        for name in expected:
            value = session.constant(name)
            if name == "get_eos_ids":  # a one-element list comes back as its element
                value = sorted(value) if isinstance(value, list) else [value]
            actual[name] = value
        wrong = {name: {"expected": expected[name], "actual": actual[name]} for name in expected
                 if actual[name] != expected[name]}
        return {"stage": "metadata", "checked": sorted(expected), "mismatches": wrong, "passed": not wrong}

    def generate(self, folder: Path, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> dict:
        from exporter.backends.executorch.runtime import ExecuTorchSession
        result = greedy_generate(ExecuTorchSession(folder / self.artifact), prompt_ids, max_new_tokens, eos_ids)
        result["runtime"] = self.runtime
        return result

    def artifact_files(self, folder: Path) -> list[Path]:
        from exporter.backends.executorch.runtime import executorch_data_file

        data = executorch_data_file(folder / self.artifact)
        return [folder / self.artifact, *([data] if data else [])]
