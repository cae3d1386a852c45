"""Coverage run: try every causal-LM ``model_type`` transformers maps in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``.

For each model type a tiny config is built from its config class (sizes shrunk, structural fields such as
sliding windows, per-layer type patterns and MoE routing kept), a seeded random model is written with the demo
tokenizer (exactly like ``exporter.builtin.materialize``), and the folder is exported as a user would, one
``run_export`` call per target (``xnnpack-fp32`` and ``onnx-fp32``, ``max_seq_len=32``) so that a failure on one
target does not hide the other.

The results also go, per model type, to ``exporter/model_tiers.json`` (status per target, the run's date and the
fingerprint of the sources): the data ``export-model`` reads to say which tier a model type is in
(``exporter/tiers.py``, ``export-model models``).

Results are kept per model type in ``docs/coverage.json`` (resumable: entries already present are skipped unless
``--rerun``); ``docs/coverage.md`` is generated from that JSON. Each model type runs in its own subprocess with a
timeout, so a hang or a crash is recorded rather than fatal; per-target results are written as soon as they are
known, so a timeout in the second target keeps the first one's result.

Usage::

    python scripts/coverage.py                     # everything not yet in docs/coverage.json
    python scripts/coverage.py --only llama,qwen2 --rerun
    python scripts/coverage.py --limit 10 --jobs 2 --timeout 600
    python scripts/coverage.py --report-only       # regenerate docs/coverage.md from docs/coverage.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
JSON_PATH = DOCS / "coverage.json"
MD_PATH = DOCS / "coverage.md"
TARGETS = ("executorch", "onnx")
RECIPE_FOR = {"executorch": "xnnpack-fp32", "onnx": "onnx-fp32"}
ARTIFACT_FOR = {"executorch": "model.pte", "onnx": "model.onnx"}
MAX_SEQ_LEN = 32
WINDOW = 8

# Status words used in the JSON and the table.
VERIFIED = "verified"
FAILED_VERIFICATION = "failed verification"
EXPORT_FAILED = "export failed"
CONFIG_FAILED = "config failed"
SKIPPED = "skipped"
TIMEOUT = "timeout"
CRASHED = "crashed"

# --------------------------------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 4, 2, 16, 128
MAX_LAYERS_FOR_PATTERN = 8

# canonical name -> every field name some config class uses for it (attribute_map targets are added per class)
ALIASES = {
    "hidden_size": ["hidden_size", "n_embd", "d_model", "dim", "embed_dim", "model_dim", "hidden_dim", "n_embed",
                    "embedding_size", "emb_dim"],
    "num_hidden_layers": ["num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers"],
    "num_attention_heads": ["num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads"],
    "num_key_value_heads": ["num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
                            "kv_n_heads", "num_key_value_groups_"],
    "head_dim": ["head_dim", "kv_channels", "attention_head_dim", "d_head", "dim_head"],
    "intermediate_size": ["intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "decoder_ffn_dim",
                          "intermediate_size_mlp", "d_ff", "dim_ff", "mlp_dim", "ffn_intermediate_size",
                          "dense_intermediate_size", "d_inner"],
    "moe_intermediate_size": ["moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                              "moe_ffn_hidden_size", "expert_hidden_size", "shared_intermediate_size",
                              "moe_shared_expert_intermediate_size", "moe_dim", "moe_hidden_size"],
    "num_experts": ["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                    "n_experts", "num_total_experts"],
    "num_experts_per_tok": ["num_experts_per_tok", "moe_top_k", "num_experts_per_token", "top_k", "moe_topk",
                            "n_activated_experts", "num_selected_experts", "router_topk"],
    "max_position_embeddings": ["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length",
                                "max_sequence_length", "block_size"],
    "window": ["sliding_window", "attention_window", "attention_chunk_size", "local_window_size", "window_size",
               "sliding_window_size", "local_attention_window"],
}
ONE_FIELDS = ["n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "n_group", "topk_group",
              "first_k_dense_replace", "num_expert_group", "topk_groups"]
SMALL_FIELDS = {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                "v_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
                "mamba_d_state": 16, "state_size": 16, "ssm_state_size": 16, "mamba_n_heads": 4, "mamba_d_head": 16,
                "mamba_n_groups": 1, "n_groups": 1, "time_step_rank": 8, "mamba_d_conv": 4, "conv_kernel": 4,
                "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                "linear_value_head_dim": 16, "num_memory_tokens": 0, "global_attn_every_n_layers": 1,
                "hidden_size_per_layer_input": 16}
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "decoder_start_token_id": 1}
# The whole-model keys to never touch.
KEEP = {"model_type", "transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"}


def _skip_reason(model_type: str, config_cls) -> str | None:
    sub = dict(getattr(config_cls, "sub_configs", None) or {})
    names = set(sub)
    if "text_config" in names:
        others = sorted(names - {"text_config"})
        return ("composite config (text_config" + (" + " + ", ".join(others) if others else "") +
                "): the causal-LM class needs the multimodal wrapper; text-only variants are listed separately")
    modal = sorted(n for n in names if any(k in n for k in ("vision", "audio", "vq", "image", "encoder", "patcher")))
    if modal:
        return f"multimodal / multi-part config ({', '.join(sorted(names))})"
    return None


def _per_layer_lists(d: dict, n_orig) -> list[str]:
    if not isinstance(n_orig, int) or n_orig <= 1:
        return []
    return [k for k, v in d.items() if isinstance(v, list) and len(v) == n_orig and k not in KEEP]


def _layers_keeping_pattern(d: dict, list_keys: list[str]) -> int:
    """Smallest layer count (>=2, <=8) whose prefix of every per-layer list contains each distinct value."""
    best = 2
    for key in list_keys:
        values = d[key]
        try:
            distinct = set(map(lambda v: json.dumps(v, sort_keys=True), values))
        except TypeError:
            continue
        seen = set()
        for i, v in enumerate(values):
            seen.add(json.dumps(v, sort_keys=True))
            if seen == distinct:
                best = max(best, i + 1)
                break
    return min(best, MAX_LAYERS_FOR_PATTERN)


def shrink_dict(d: dict, attribute_map: dict, top: bool = True) -> dict:
    """Shrink a config dict in place (sizes small, structure kept); nested sub-config dicts are shrunk too."""
    from exporter.builtin import vocab_size

    def keys_for(canonical):
        names = list(ALIASES.get(canonical, [canonical]))
        if canonical in attribute_map:
            names.insert(0, attribute_map[canonical])
        return [n for n in dict.fromkeys(names) if n in d]

    def set_all(canonical, value, only_if_set=False):
        for key in keys_for(canonical):
            if only_if_set and d[key] in (None, False, 0):
                continue
            if isinstance(d[key], bool):
                continue
            d[key] = value

    mla_rope_is_head_dim = isinstance(d.get("qk_rope_head_dim"), int) and d.get("head_dim") == d["qk_rope_head_dim"]
    layer_keys = keys_for("num_hidden_layers")
    n_orig = d[layer_keys[0]] if layer_keys else None
    per_layer = _per_layer_lists(d, n_orig)
    n_layers = _layers_keeping_pattern(d, per_layer)
    if isinstance(d.get("num_kv_shared_layers"), int) and d["num_kv_shared_layers"] > 0:
        n_layers = min(2 * n_layers, n_orig)  # the shared half must see every layer type too
        d["num_kv_shared_layers"] = n_layers // 2
    if all(isinstance(d.get(k), int) for k in ("n_input_layers", "n_recurrent_layers", "n_output_layers")):
        # input / recurrent / output blocks must add up to the layer count; even counts, as dory serializes
        # "attention + mlp" blocks as two layers each
        n_layers = max(n_layers + n_layers % 2, 6)
        d["n_input_layers"] = d["n_output_layers"] = 2
        d["n_recurrent_layers"] = n_layers - 4
    for key in per_layer:
        d[key] = d[key][:n_layers]
    for key in layer_keys:
        if isinstance(d[key], int):
            d[key] = n_layers

    heads_keys = keys_for("num_attention_heads")
    heads_orig = d[heads_keys[0]] if heads_keys else None
    kv_keys = keys_for("num_key_value_heads")
    kv_orig = d[kv_keys[0]] if kv_keys else None
    set_all("hidden_size", HIDDEN)
    set_all("num_attention_heads", HEADS)
    for key in kv_keys:
        if isinstance(d[key], bool) or not isinstance(d[key], (int, type(None))):
            continue
        d[key] = 1 if kv_orig == 1 else (HEADS if kv_orig == heads_orig else KV_HEADS)
    for key in keys_for("head_dim"):  # None means "derived" in the config but some model code reads it as is
        if not isinstance(d[key], bool) and isinstance(d[key], (int, type(None))):
            d[key] = HEAD_DIM
    set_all("intermediate_size", INTER, only_if_set=True)
    set_all("moe_intermediate_size", 32, only_if_set=True)
    experts_orig = None
    for key in keys_for("num_experts"):
        if d[key] is None or (isinstance(d[key], int) and d[key] > 0):
            experts_orig = d[key] or 4
            d[key] = min(experts_orig, 4)
    for key in keys_for("num_experts_per_tok"):
        if d[key] is None or (isinstance(d[key], int) and d[key] > 0):
            d[key] = min(d[key] or 2, 2, experts_orig or 2)
    for key in ONE_FIELDS:
        if key in d and (d[key] is None and key.startswith("n") and "shared" in key
                         or isinstance(d[key], int) and not isinstance(d[key], bool) and d[key] > 1):
            d[key] = 1
    for key, value in SMALL_FIELDS.items():
        if key in d and d[key] is not None and not isinstance(d[key], bool):
            if value is None or (isinstance(d[key], (int, float)) and d[key] > value):
                d[key] = value
    for key in keys_for("window"):
        if isinstance(d[key], int) and not isinstance(d[key], bool) and d[key] > 0:
            d[key] = WINDOW
    if "vocab_size" in d or top:
        d["vocab_size"] = vocab_size()
    if isinstance(d.get("vocab_size_per_layer_input"), int):
        d["vocab_size_per_layer_input"] = vocab_size()
    for key, value in list(d.items()):  # {layer index: overrides} maps lose the layers that were cut
        if key.startswith("per_layer") and isinstance(value, dict) and all(str(k).isdigit() for k in value):
            d[key] = {k: v for k, v in value.items() if int(k) < n_layers}
    for key in keys_for("max_position_embeddings"):
        if isinstance(d[key], int) and not isinstance(d[key], bool):
            d[key] = 512
    for key, value in TOKEN_IDS.items():
        if key in d or (top and key != "decoder_start_token_id"):
            d[key] = value
    if "initializer_range" in d:
        d["initializer_range"] = 0.1
    if "use_cache" in d:
        d["use_cache"] = True
    # multi-head latent attention: head_dim is the rope part, qk_head_dim = nope + rope
    if mla_rope_is_head_dim:
        d["head_dim"] = d["qk_rope_head_dim"]
    if isinstance(d.get("qk_head_dim"), int) and isinstance(d.get("qk_rope_head_dim"), int) \
            and isinstance(d.get("qk_nope_head_dim"), int):
        d["qk_head_dim"] = d["qk_rope_head_dim"] + d["qk_nope_head_dim"]
    # coupled sizes some validators check: mamba heads * head dim == expand * hidden
    hidden = next((d[k] for k in keys_for("hidden_size") if isinstance(d[k], int)), HIDDEN)
    if isinstance(d.get("mamba_expand"), int) and isinstance(d.get("mamba_n_heads"), int) and "mamba_d_head" in d:
        if isinstance(d.get("mamba_d_ssm"), int):
            d["mamba_d_ssm"] = d["mamba_expand"] * hidden
        d["mamba_d_head"] = d["mamba_expand"] * hidden // d["mamba_n_heads"]
    if isinstance(d.get("expand"), int) and isinstance(d.get("num_heads"), int) and "head_dim" in d \
            and any("state" in k for k in d):
        d["head_dim"] = d["expand"] * hidden // d["num_heads"]
    if top and "is_decoder" in d:
        d["is_decoder"] = True
    for key, value in list(d.items()):
        if isinstance(value, dict) and key not in ("rope_scaling", "rope_parameters", "attribute_map") \
                and any(k in value for k in ("hidden_size", "num_experts", "moe_num_experts", "kv_n_heads",
                                             "ffn_hidden_size", "num_hidden_layers", "d_model")):
            shrink_dict(value, {}, top=False)
    return d


def build_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    d = default.to_dict()
    for key in KEEP:
        d.pop(key, None)
    shrink_dict(d, dict(getattr(cls, "attribute_map", {}) or {}))
    d["tie_word_embeddings"] = d.get("tie_word_embeddings", False)
    try:
        return cls(**d)
    except Exception:
        return cls.from_dict(d)


def config_sha(config) -> str:
    """Short hash of the tiny config (to spot results made with an older shrinking rule)."""
    import hashlib

    text = json.dumps({k: v for k, v in config.to_dict().items() if k != "transformers_version"}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def materialize(model_type: str, directory: Path):
    """Tiny seeded model for ``model_type`` in save_pretrained layout plus the demo tokenizer (as builtin does)."""
    import torch
    from transformers import AutoModelForCausalLM

    from exporter.builtin import SEED, build_tokenizer_json

    config = build_config(model_type)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text(build_tokenizer_json())
    text = config.get_text_config()
    tokenizer_config = {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True,
        "model_max_length": getattr(text, "max_position_embeddings", None) or 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return config, n_params, type(model).__name__


# --------------------------------------------------------------------------------------------------------------
# Worker: one model type, both targets, results written after each step
# --------------------------------------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:400]


def _verification_note(report: dict, artifact: str) -> str:
    entry = report.get("artifacts", {}).get(artifact, {})
    failed = [s for s in entry.get("stages", []) if not s.get("passed")]
    if not failed:
        return "verification failed (no failing stage recorded)"
    worst = None
    for stage in failed:
        if "error" in stage:
            return f"{stage['stage']}: {stage['error']}"[:400]
        if worst is None or (stage.get("max_abs_diff") or 0) > (worst.get("max_abs_diff") or 0):
            worst = stage
    if isinstance(worst.get("expected"), list) and isinstance(worst.get("actual"), list):
        return f"{worst['stage']}: {_generation_mismatch(worst)}"
    parts = [f"{worst['stage']}"]
    if worst.get("max_abs_diff") is not None:
        parts.append(f"max abs diff {worst['max_abs_diff']:.3g}")
    if worst.get("top1_agreement") is not None:
        parts.append(f"top-1 {worst['top1_agreement']:.0%}")
    if len(parts) == 1:
        extra = {k: v for k, v in worst.items() if k not in ("stage", "passed", "expected_pieces", "pieces")}
        parts.append(json.dumps(extra)[:250])
    return ", ".join(parts)


def code_fingerprint() -> str:
    """Short hash of the project's Python sources (exporter/, masks/, attention/, recipes/) a result was made with."""
    import hashlib

    digest = hashlib.sha256()
    for folder in ("exporter", "masks", "attention", "recipes"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".toml") and path.is_file():
                digest.update(str(path.relative_to(ROOT)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _first_diff(expected: list, actual: list) -> str | None:
    for i, (want, got) in enumerate(zip(expected, actual)):
        if want != got:
            return f"token {i}: expected {want}, got {got}"
    if len(expected) != len(actual):
        return f"length {len(actual)} instead of {len(expected)}"
    return None


def _generation_mismatch(stage: dict) -> str:
    """Where a runtime's greedy generation first departs from eager's (sequences, then the batched run)."""
    expected, actual = stage["expected"], stage["actual"]
    if expected and not isinstance(expected[0], list):
        expected, actual = [expected], [actual]
    for row, (want, got) in enumerate(zip(expected, actual)):
        diff = _first_diff(want, got)
        if diff:
            return f"greedy tokens differ from eager (prompt {row}, {diff})"
    batch = stage.get("batch") or {}
    if batch.get("passed") is False:
        for row, (want, got) in enumerate(zip(batch["expected"], batch["actual"])):
            diff = _first_diff(want, got)
            if diff:
                return f"single-prompt generation matches eager; batched generation differs (row {row}, {diff})"
    tok = stage.get("genai_tokenizer") or {}
    if tok and not tok.get("matches", True):
        return f"tokenizer mismatch ({tok.get('error') or 'ids differ'})"
    return "generation check failed"


def worker(model_type: str, out_path: Path) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result: dict = {"model_type": model_type, "code": code_fingerprint(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save():
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    from exporter import recipes
    from exporter.errors import ExportFailed, UserError
    from exporter.pipeline import ExportRequest, run_export
    from exporter.progress import Progress
    from exporter.quiet import quiet_python_libraries

    quiet_python_libraries()
    with tempfile.TemporaryDirectory(prefix=f"coverage-{model_type}-") as tmp:
        folder = Path(tmp) / "model"
        try:
            result["config_sha"] = config_sha(build_config(model_type))  # before from_config annotates it
            config, n_params, cls_name = materialize(model_type, folder)
            result["model_class"] = cls_name
            result["params"] = n_params
        except Exception as exc:
            for target in TARGETS:
                result[target] = {"status": CONFIG_FAILED, "note": _first_line(exc)}
            result["traceback"] = traceback.format_exc()[-3000:]
            save()
            return
        save()
        for target in ("onnx", "executorch"):
            start = time.time()
            result[target] = {"status": "running"}
            save()
            try:
                res = run_export(ExportRequest(model=str(folder), recipes=[recipes.load(RECIPE_FOR[target])],
                                               output=Path(tmp) / f"out-{target}", max_seq_len=MAX_SEQ_LEN),
                                 Progress(quiet=True))
                artifact = ARTIFACT_FOR[target]
                passed = bool(res.verification["artifacts"][artifact]["passed"]) and res.passed
                entry = {"status": VERIFIED if passed else FAILED_VERIFICATION}
                stages = res.verification["artifacts"][artifact]["stages"]
                diffs = [s["max_abs_diff"] for s in stages if s.get("max_abs_diff") is not None]
                if diffs:
                    entry["max_abs_diff"] = max(diffs)
                if not passed:
                    entry["note"] = _verification_note(res.verification, artifact)
                    entry["failed_stages"] = [{k: v for k, v in st.items() if k != "timings"}
                                              for st in stages if not st.get("passed")]
            except (UserError, ExportFailed) as exc:
                entry = {"status": EXPORT_FAILED, "note": _first_line(exc)}
            except Exception as exc:
                entry = {"status": EXPORT_FAILED, "note": _first_line(exc)}
                result.setdefault("tracebacks", {})[target] = traceback.format_exc()[-3000:]
            entry["seconds"] = round(time.time() - start, 1)
            result[target] = entry
            save()


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------

def all_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _priority(model_type: str) -> int:
    """Try order only (results do not depend on it): families with built-ins, then plain decoders, MoE, the rest."""
    from exporter.builtin import BUILTIN_CONFIGS
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in {mt for mt, _ in BUILTIN_CONFIGS.values()}:
        return 0
    try:
        keys = set(CONFIG_MAPPING[model_type]().to_dict())
    except Exception:
        return 5
    text = " ".join(keys)
    if any(k in text for k in ("mamba", "ssm", "state_size", "conv_", "linear_", "rwkv", "xlstm", "lru_",
                               "block_types", "encoder_layers", "type_vocab_size", "decoder_layers")):
        return 4
    if any(k in text for k in ("expert", "moe")):
        return 2
    if "num_key_value_heads" in keys:
        return 1
    return 3


def load_results() -> dict:
    if JSON_PATH.is_file():
        return json.loads(JSON_PATH.read_text())
    return {}


def save_results(results: dict) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    ordered = {k: results[k] for k in sorted(results)}
    tmp = JSON_PATH.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ordered, indent=2) + "\n")
    tmp.replace(JSON_PATH)


def run_one(model_type: str, timeout: float) -> dict:
    """Run the worker for ``model_type`` in a subprocess; fill in timeouts / crashes from what it left behind."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        reason = _skip_reason(model_type, CONFIG_MAPPING[model_type])
    except Exception:  # noqa: BLE001 - an unreadable config class is tried, not skipped
        reason = None
    if reason:
        return {"model_type": model_type, **{t: {"status": SKIPPED, "note": reason} for t in TARGETS}}
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="coverage-run-") as tmp:
        out = Path(tmp) / "result.json"
        log = Path(tmp) / "log.txt"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        with open(log, "wb") as logf:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", model_type,
                                     "--worker-out", str(out)], stdout=logf, stderr=subprocess.STDOUT, env=env,
                                    cwd=str(ROOT), start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                problem = None if rc == 0 else (CRASHED, f"worker exited with code {rc}")
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                problem = (TIMEOUT, f"no result within {timeout:.0f} s (whole model type, both targets)")
        result = json.loads(out.read_text()) if out.is_file() else {"model_type": model_type}
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
    for target in TARGETS:
        entry = result.get(target)
        if entry is None or entry.get("status") == "running":
            status, note = problem or (CRASHED, "worker ended without a result")
            if status == CRASHED and tail:
                note += f" ({tail[0][:200]})"
            result[target] = {"status": status, "note": note}
    result["seconds"] = round(time.time() - start, 1)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model types")
    parser.add_argument("--limit", type=int, help="try at most N model types (of those not yet done)")
    parser.add_argument("--rerun", action="store_true", help="redo model types already in the JSON")
    parser.add_argument("--report-only", action="store_true", help="only regenerate docs/coverage.md")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model type (both targets)")
    parser.add_argument("--jobs", type=int, default=1, help="model types run in parallel")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    if args.worker:
        worker(args.worker, Path(args.worker_out))
        return 0

    from exporter.quiet import quiet_python_libraries

    quiet_python_libraries()
    universe = all_model_types()
    results = load_results()
    if not args.report_only:
        if args.only:
            wanted = [t.strip() for t in args.only.split(",") if t.strip()]
            unknown = [t for t in wanted if t not in universe]
            if unknown:
                parser.error(f"not causal-LM model types: {', '.join(unknown)}")
        else:
            wanted = sorted(universe, key=lambda t: (_priority(t), t))
        todo = [t for t in wanted if args.rerun or t not in results]
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        for t in list(todo):  # skips need no subprocess: record them up front
            reason = _skip_reason(t, CONFIG_MAPPING[t])
            if reason:
                results[t] = {"model_type": t, **{g: {"status": SKIPPED, "note": reason} for g in TARGETS}}
                todo.remove(t)
        save_results(results)
        if args.limit is not None:
            todo = todo[:args.limit]
        run_all(todo, results, args.timeout, args.jobs)
    write_markdown(results, universe)
    write_tiers(results)
    print(f"wrote {MD_PATH.relative_to(ROOT)} ({len([t for t in universe if t in results])}/{len(universe)} tried)")
    return 0


TIERS_PATH = ROOT / "exporter" / "model_tiers.json"


def write_tiers(results: dict) -> None:
    """``exporter/model_tiers.json``: per model type, each target's status, the run's date, the sources'
    fingerprint and (when not verified) the reason, for ``exporter.tiers``."""
    tiers = {}
    for model_type, entry in sorted(results.items()):
        item = {target: (entry.get(target) or {}).get("status") for target in TARGETS}
        item.update(date=(entry.get("started") or "")[:10], sources=entry.get("code"))
        notes = [f"{target}: {entry[target]['note']}" for target in TARGETS
                 if isinstance(entry.get(target), dict) and entry[target].get("note")
                 and entry[target].get("status") != VERIFIED]
        if notes:
            item["note"] = "; ".join(notes)[:300]
        tiers[model_type] = item
    TIERS_PATH.write_text(json.dumps({"written_by": "scripts/coverage.py", "model_types": tiers}, indent=1,
                                     sort_keys=True) + "\n")


def run_all(todo: list[str], results: dict, timeout: float, jobs: int) -> None:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    universe = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    total = len(todo)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run_one, t, timeout): t for t in todo}
        for done, future in enumerate(as_completed(futures), 1):
            model_type = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # driver bug: record it, keep going
                result = {"model_type": model_type,
                          **{t: {"status": CRASHED, "note": f"driver: {_first_line(exc)}"} for t in TARGETS}}
            results[model_type] = result
            save_results(results)
            write_markdown(results, universe)
            print(f"[{done}/{total}] {model_type}: executorch={result['executorch']['status']} "
                  f"onnx={result['onnx']['status']} ({result.get('seconds', 0)} s)", flush=True)


def _cell(entry: dict) -> str:
    status = entry.get("status", "?")
    return status


def _note(entry: dict) -> str | None:
    """The stored note, re-derived from the failing stages when they were kept."""
    if entry.get("failed_stages"):
        return _verification_note({"artifacts": {"a": {"stages": entry["failed_stages"]}}}, "a")
    return entry.get("note")


def _md_escape(text: str) -> str:
    text = text.replace(" (set EXPORT_MODEL_DEBUG=1 for the traceback)", "").replace("\x1b[96m", "").replace("\x1b[0m", "")
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown(results: dict, universe: list[str]) -> None:
    import transformers

    tried = [t for t in universe if t in results]
    not_tried = [t for t in universe if t not in results]

    def ok(t, target):
        return results[t][target]["status"] == VERIFIED

    both = [t for t in tried if ok(t, "executorch") and ok(t, "onnx")]
    et_only = [t for t in tried if ok(t, "executorch") and not ok(t, "onnx")]
    onnx_only = [t for t in tried if ok(t, "onnx") and not ok(t, "executorch")]
    none = [t for t in tried if not ok(t, "executorch") and not ok(t, "onnx")]
    by_status = {target: {} for target in TARGETS}
    for t in tried:
        for target in TARGETS:
            s = results[t][target]["status"]
            by_status[target][s] = by_status[target].get(s, 0) + 1
    total_seconds = sum(results[t].get("seconds", 0) for t in tried)

    lines = [
        "# Causal-LM coverage",
        "",
        f"Generated by `scripts/coverage.py` from `docs/coverage.json` (transformers {transformers.__version__}): "
        f"every `model_type` in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` ({len(universe)} types), a tiny config built "
        "from its config class (hidden 64, 4 heads, 2 KV heads, head_dim 16, 2 layers or enough layers to keep "
        f"the per-layer pattern, at most 4 experts with top-2, windows {WINDOW}, demo-tokenizer vocab), seeded "
        f"random weights, exported per target in its own `run_export` call (`xnnpack-fp32`, `onnx-fp32`, "
        f"max_seq_len {MAX_SEQ_LEN}) and verified against eager transformers. The support gate "
        "(`exporter.support.is_supported`) is bypassed for this run only.",
        "",
        "## Counts",
        "",
        f"- tried: {len(tried)} of {len(universe)} model types; **not yet tried: {len(not_tried)}**",
        f"- verified on both targets: **{len(both)}**",
        f"- verified on ExecuTorch only: {len(et_only)}",
        f"- verified on ONNX only: {len(onnx_only)}",
        f"- verified on neither: {len(none)}",
    ]
    for target in TARGETS:
        parts = ", ".join(f"{s} {n}" for s, n in sorted(by_status[target].items(), key=lambda kv: -kv[1]))
        lines.append(f"- {target}: {parts or 'nothing tried yet'}")
    lines.append(f"- summed wall time of the tried model types: {total_seconds / 60:.0f} min "
                 "(run with `--jobs` > 1, so elapsed time is lower)")
    versions: dict[str, int] = {}
    for t in tried:
        if results[t]["executorch"]["status"] != SKIPPED:
            key = results[t].get("code", "unrecorded")
            versions[key] = versions.get(key, 0) + 1
    if versions:
        lines.append("- project-source fingerprints of the exported results (sha256 of exporter/, masks/, attention/, "
                     f"recipes/ when the model ran; the current sources are `{code_fingerprint()}`; results made "
                     "with other fingerprints came from earlier sources and are not strictly comparable): "
                     + ", ".join(f"`{k}` {n}" for k, n in sorted(versions.items(), key=lambda kv: -kv[1])))
    lines += ["", "Statuses: `verified` (export and every verification stage passed), `failed verification` "
              "(worst stage and its max abs diff, or the stage's error), `export failed` (first line of the error), "
              "`config failed` (no tiny config or model could be built), `skipped` (reason), `timeout` / `crashed` "
              "(the worker process hung or died).", ""]
    lines += ["## Results", "", "| model_type | executorch | onnx | note |", "|---|---|---|---|"]
    for t in universe:
        if t not in results:
            lines.append(f"| {t} | not yet tried | not yet tried | |")
            continue
        r = results[t]
        et, ox = r["executorch"], r["onnx"]
        et_note, ox_note = _note(et), _note(ox)
        notes = []
        if et_note and et_note.replace("xnnpack-fp32", "onnx-fp32") == ox_note:
            notes.append(et_note.replace("xnnpack-fp32: ", ""))
        else:
            if et_note:
                notes.append(f"executorch: {et_note}")
            if ox_note:
                notes.append(f"onnx: {ox_note}")
        lines.append(f"| {t} | {_cell(et)} | {_cell(ox)} | {_md_escape('; '.join(notes))} |")
    if not_tried:
        lines += ["", f"Not yet tried ({len(not_tried)}): " + ", ".join(not_tried)]
    MD_PATH.parent.mkdir(parents=True, exist_ok=True)
    MD_PATH.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
