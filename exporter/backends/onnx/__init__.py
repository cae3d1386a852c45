"""ONNX target: ``model.onnx`` (+ ``model.onnx.data``) and ``genai_config.json``, an ONNX Runtime GenAI folder.

Sub-modules: ``build`` (wrap -> capture -> lower -> quantize -> fuse), ``wrappers`` (cache as graph inputs and
outputs: static, dynamic, GroupQueryAttention), ``lower`` (torch.onnx), ``quantize`` / ``qembedding`` /
``matmulnbits`` (MatMulNBits, GatherBlockQuantized), ``fusions`` (onnxruntime's fused ops), ``genai`` (config,
GenAI generation), ``runtime`` (onnxruntime step session). They import onnx / onnxruntime, so this module imports
them only inside the methods that need them.
"""

from __future__ import annotations

import json
from pathlib import Path

from exporter.backends.base import Backend
from exporter.errors import UserError
from exporter.generation import eager_margin, greedy_generate
from exporter.verification.compare import error_stage


class OnnxBackend(Backend):
    target = "onnx"
    artifact = "model.onnx"
    runtime = "onnxruntime-genai"
    default_recipe = "onnx-fp32"
    dtype_recipes = {"float32": "onnx-fp32", "float16": "onnx-fp16"}
    options = {
        "backend": ("onnxruntime",),
        "dtype": ("float32", "float16"),
        "quantization": ("none", "int4", "int8"),
        "embedding_quantization": ("none", "4w", "8w"),
        "attention": ("export_safe", "onnxruntime_contrib_ops"),
        "kv_cache": ("static", "dynamic"),
        "ort_fusions": ("none", "cpu"),
        "external_weights": (False,),  # ONNX weights are always in model.onnx.data
    }
    default_group_size = {"none": 0, "int4": 32, "int8": 32}

    def accepts(self, field: str, recipe) -> bool:
        if field == "embedding_quantization":  # GatherBlockQuantized beside quantized MatMuls only
            return recipe.quantization != "none"
        return super().accepts(field, recipe)

    def check_recipe(self, recipe, where: str) -> None:
        size = recipe.group_size
        if size and (size < 16 or size & (size - 1)):
            raise UserError(f"recipe {where}: MatMulNBits needs a block size that is a power of two >= 16, got {size}")
        if recipe.quantization == "int4" and not recipe.group_size:
            raise UserError(f"recipe {where}: int4 needs a block size (MatMulNBits is blockwise)")
        if recipe.attention == "onnxruntime_contrib_ops" and recipe.kv_cache != "static":
            raise UserError(f"recipe {where}: onnxruntime_contrib_ops needs the static (shared-buffer) KV cache")

    def build(self, recipe, model, checkpoint, max_seq_len: int, staging: Path, progress) -> dict:
        from exporter.backends.onnx.build import build_onnx

        return build_onnx(recipe, model, checkpoint, max_seq_len, staging, progress)

    def open_session(self, path: Path, threads: int | None = None):
        from exporter.backends.onnx.runtime import OnnxSession

        return OnnxSession(path, threads)

    def matched_reference(self, recipe, model, artifact: Path):
        """Weights read back from the file's MatMulNBits / GatherBlockQuantized initializers (int4 / int8), or
        float16-rounded weights computing in float32 (float16)."""
        from exporter.backends.onnx.quantize import onnx_reference_model

        return onnx_reference_model(recipe, model, artifact)

    def generation_check(self, recipe, artifact: Path, reference_model, context, allowed_error: float = 0.0) -> dict:
        """ONNX Runtime GenAI driven like a chat app from the folder vs eager greedy tokens (or, for graphs with
        rounding kernels, the graph's own greedy tokens through plain onnxruntime; see ``genai.verify_genai``)."""
        from exporter.backends.onnx.genai_verify import verify_genai

        try:
            stage = verify_genai(artifact.parent, reference_model, context.tokenizer, context.eos,
                                 context.generate_tokens, self.open_session, eager_margin(reference_model),
                                 allowed_error if recipe.exact else 0.0,
                                 batch_window=context.checkpoint.smallest_window)
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run the folder is a failed stage
            return error_stage("genai_generate", exc)
        for timing in ("timings", "load_s"):  # speed is not verification, and would make reports differ run to run
            stage.pop(timing, None)
        return stage

    def metadata_check(self, artifact: Path, checkpoint, max_seq_len: int) -> dict:
        """``genai_config.json`` against the checkpoint and the graph: context length, vocabulary, special ids,
        layer count, KV heads and head size of the cache inputs."""
        import onnx

        if not (artifact.parent / "genai_config.json").is_file():  # a state family GenAI has no contract for
            from exporter.backends.onnx.lower import graph_metadata_check  # (docs/hybrids.md)

            return graph_metadata_check(artifact, checkpoint, max_seq_len)
        config = json.loads((artifact.parent / "genai_config.json").read_text())["model"]
        graph = onnx.load(str(artifact), load_external_data=False).graph
        past = [i for i in graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
        shape = [d.dim_value for d in past[0].type.tensor_type.shape.dim] if past else [0, 0, 0, 0]
        ids = checkpoint.special_ids
        eos = config["eos_token_id"]
        expected = {"context_length": max_seq_len, "vocab_size": checkpoint.vocab_size,
                    "eos_token_id": sorted(ids.eos), "decoder.num_hidden_layers": len(checkpoint.layers),
                    "decoder.num_key_value_heads": shape[1], "decoder.head_size": shape[3]}
        actual = {"context_length": config["context_length"], "vocab_size": config["vocab_size"],
                  "eos_token_id": sorted(eos if isinstance(eos, list) else [eos]),
                  "decoder.num_hidden_layers": config["decoder"]["num_hidden_layers"],
                  "decoder.num_key_value_heads": config["decoder"]["num_key_value_heads"],
                  "decoder.head_size": config["decoder"]["head_size"]}
        if ids.bos is not None:
            expected["bos_token_id"], actual["bos_token_id"] = ids.bos, config["bos_token_id"]
        wrong = {name: {"expected": expected[name], "actual": actual[name]} for name in expected
                 if actual[name] != expected[name]}
        return {"stage": "metadata", "checked": sorted(expected), "mismatches": wrong, "passed": not wrong}

    def generate(self, folder: Path, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> dict:
        """ONNX Runtime GenAI when the folder has its config, else plain onnxruntime."""
        if (folder / "genai_config.json").is_file():
            from exporter.backends.onnx.genai import generate_genai

            result = generate_genai(folder, prompt_ids, max_new_tokens)
            result["runtime"] = self.runtime
            return result
        result = greedy_generate(self.open_session(folder / self.artifact), prompt_ids, max_new_tokens, eos_ids)
        result["runtime"] = "onnxruntime"
        return result
