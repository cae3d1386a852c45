"""Benchmark one model, in one run, on one prompt: this project's ExecuTorch ``.pte`` per recipe vs
``transformers.exporters`` (ExecuTorch, XNNPACK) vs optimum-executorch vs eager PyTorch; with ``--side onnx`` our
ONNX folders vs transformers' OnnxExporter and ONNX Runtime GenAI's own model builder.

Per artifact: export wall time and peak RSS of the export process, artifact size, prefill tokens/s (one call on the
prompt) and decode tokens/s (single-token steps after the prompt), each the median of ``--repeats`` runs after
``--warmup`` runs. Every export and every runtime measurement is its own process (peak RSS is per process, via
``os.wait4``); all runtimes use ``--threads`` threads (XNNPACK threadpool / ``torch.set_num_threads``).
Decode feeds the same fixed token ids to every runtime (teacher forcing), so every runtime does the same work.
``--accuracy`` also grades each of our artifacts teacher-forced against the fp32 eager model (top-1 agreement, mean
KL(fp32 || artifact)) and against the eager model quantized the same way (max abs diff, top-1).

    python scripts/bench.py                 # SmolLM2-135M-shaped random Llama (vocab 49152, 576 x 30 layers)
    python scripts/bench.py --quick         # a small Llama, for a fast end-to-end check
Prints a table with ratios; writes JSON (``--json``, default ``<workdir>/bench.json``).

optimum-executorch: 1.1.0 (latest) pins transformers==5.0.0rc1, so it cannot be installed beside the pinned stack
(transformers 5.24.0). With ``--optimum-python`` pointing at a venv where it was installed ``--no-deps`` over the
pinned stack, it is exported with ``use_custom_kv_cache=False``: its custom KV cache imports
``transformers.cache_utils.HybridCache``, which transformers 5.24 no longer has (ImportError).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# our ExecuTorch recipes (recipes/*.toml; "-q4emb": with --qembedding 4w, "-ptd": with --external-weights)
RECIPES = ("xnnpack-fp32", "xnnpack-fp16", "xnnpack-8da4w", "xnnpack-int8", "xnnpack-8da4w-q4emb")
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
QUICK = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, tie_word_embeddings=True,
             bos_token_id=1, eos_token_id=2)


# ---------------------------------------------------------------------------------------------- shared helpers
def quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from exporter.quiet import quiet_python_libraries

        quiet_python_libraries()
    except Exception:
        pass


def token_ids(vocab_size: int, length: int, seed: int = 1234) -> list[int]:
    import torch

    return torch.randint(3, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def set_et_threads(threads: int) -> None:
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)


def load_et_kernels() -> None:
    """Custom LLM ops and quantized kernels must be registered in the runtime before a fast-path .pte loads."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401


def build_model(directory: Path, overrides: dict, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (directory / "config.json").is_file():
        return directory
    from exporter.builtin import build_tokenizer_json

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**overrides), dtype=torch.float32)
    model.save_pretrained(directory)
    # a small tokenizer (ids below its vocabulary are what the benchmark feeds): ORT GenAI's builder needs one
    (directory / "tokenizer.json").write_text(build_tokenizer_json())
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return directory


def median_timings(run, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        run()
    return [run() for _ in range(repeats)]


# ---------------------------------------------------------------------------------------------- child: exports
def bench_recipe(name: str, max_seq_len: int):
    """The shipped recipe ``name``; suffixes add flags: ``-ptd`` = ``--external-weights``, ``-q4emb`` =
    ``--qembedding 4w`` (``xnnpack-fp32-ptd``, ``xnnpack-8da4w-q4emb``)."""
    import dataclasses

    from exporter import recipes

    external = name.endswith("-ptd")
    base = name[:-len("-ptd")] if external else name
    base, embedding = (base[:-len("-q4emb")], "4w") if base.endswith("-q4emb") else (base, None)
    recipe = recipes.with_overrides(recipes.load(base), embedding_quantization=embedding,
                                    external_weights=external or None)
    return dataclasses.replace(recipe, max_seq_len=max_seq_len)


def child_export_ours(job: dict) -> dict:
    """``exporter.pipeline.build_artifact`` (quantize -> wrap -> capture -> lower), exactly what ``export-model``
    runs before verification; phase timings from its progress stages."""
    import shutil

    import numpy as np
    import torch

    from exporter import checkpoint, pipeline
    from exporter.progress import Progress

    t0 = time.perf_counter()
    max_len = job["max_seq_len"]
    source = checkpoint.resolve(job["model_dir"], Path(job["out"] + ".work"))
    model = pipeline.load_export_model(source)
    phases = {"load": time.perf_counter() - t0}
    staging = Path(job["out"] + ".d")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    progress = Progress(quiet=True)
    details = pipeline.build_artifact(bench_recipe(job["recipe"], max_len), model, source, max_len, staging, progress)
    phases.update({stage: seconds for stage, _, seconds, _ in progress.timings})
    os.replace(staging / "model.pte", job["out"])
    files = [job["out"]]
    if details.get("weights_file"):  # model.ptd goes beside the .pte under the same stem
        files.append(str(Path(job["out"]).with_suffix(".ptd")))
        os.replace(staging / details["weights_file"], files[-1])
    shutil.rmtree(staging, ignore_errors=True)
    if job.get("accuracy"):  # the matched (quantized) eager reference: the model as it was captured, no cache
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([job["sequence"]])).logits[0]
        np.save(job["out"] + ".qref.npy", logits.float().numpy())
    return {"phases": phases, "details": details, "files": files}


def child_export_cli(job: dict) -> dict:
    """The whole ``export-model`` job (capture, lower, verification) once the recipes are integrated."""
    out = Path(job["out"]).parent / (Path(job["out"]).stem + "-cli")
    cmd = [sys.executable, "-m", "exporter.cli", "--model", job["model_dir"], "--recipe", job["recipe"],
           "--output", str(out), "--max-seq-len", str(job["max_seq_len"]), "--force", "--quiet"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    Path(job["out"]).write_bytes((out / "model.pte").read_bytes())
    return {"phases": {}, "files": [job["out"]], "note": "export-model CLI, includes verification"}


def child_export_hf(job: dict) -> dict:
    """``transformers.exporters``: ``export_for_generation`` with a static cache, multi-token decode, XNNPACK."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.exporters import ExecutorchConfig
    from transformers.exporters.exporter_executorch import ExecutorchExporter

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    ids = torch.tensor([job["sequence"][:8]])
    generation = GenerationConfig(cache_implementation="static", max_cache_len=job["max_seq_len"], do_sample=False)
    exported = ExecutorchExporter().export_for_generation(
        model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ExecutorchConfig(dynamic=True),
        generation_config=generation, multi_token_decode=True)
    out = Path(job["out"])
    exported.save_pretrained(out)
    files = sorted(str(p) for p in out.glob("*.pte"))
    return {"phases": {"export_and_save": time.perf_counter() - t0}, "files": files,
            "components": list(exported.components)}


def child_export_optimum(job: dict) -> dict:
    """optimum-executorch ``main_export`` (run with the optimum venv's interpreter)."""
    from optimum.exporters.executorch import main_export

    out = Path(job["out"])
    kwargs = dict(attn_implementation="custom_sdpa", use_custom_kv_cache=False, max_seq_len=job["max_seq_len"])
    if job.get("qlinear"):
        kwargs["qlinear"] = job["qlinear"]
    main_export(job["model_dir"], task="text-generation", recipe="xnnpack", output_dir=str(out), **kwargs)
    return {"phases": {}, "files": [str(out / "model.pte")], "options": kwargs}


# ---------------------------------------------------------------------------------------------- child: ONNX
def child_export_onnx_ours(job: dict) -> dict:
    """``exporter.pipeline.build_artifact`` for an ONNX recipe into a GenAI folder (no verification), phase
    timings."""
    import shutil

    from exporter import checkpoint, pipeline
    from exporter.progress import Progress

    t0 = time.perf_counter()
    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    recipe = bench_recipe(job["recipe"], job["max_seq_len"])
    source = checkpoint.resolve(job["model_dir"], Path(job["out"] + ".work"))
    model = pipeline.load_export_model(source)
    phases = {"load": time.perf_counter() - t0}
    details = pipeline.build_artifact(recipe, model, source, job["max_seq_len"], out, Progress(quiet=True))
    phases["build"] = time.perf_counter() - t0 - phases["load"]
    return {"phases": phases, "files": sorted(str(p) for p in out.glob("model.onnx*")),
            "details": {k: v for k, v in details.items() if k != "kept_float_matmuls"}}


def child_export_onnx_builder(job: dict) -> dict:
    """ONNX Runtime GenAI's own model builder (``python -m onnxruntime_genai.models.builder``, hand-written graphs,
    no check against eager) at ``job["precision"]`` for the CPU provider, its defaults otherwise."""
    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", job["model_dir"], "-o", str(out),
           "-p", job["precision"], "-e", "cpu", "-c", str(out) + ".cache"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"builder failed: {proc.stderr[-2000:]}")
    return {"phases": {"build": time.perf_counter() - t0}, "files": sorted(str(p) for p in out.glob("*.onnx*"))}


def child_export_onnx_hf(job: dict) -> dict:
    """``transformers.exporters`` ``OnnxExporter.export_for_generation`` (dynamic shapes, multi-token decode, the
    model's default cache), with ``ort_fusions`` = ``job["ort_fusions"]`` (None or "cpu")."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.exporters.configs import OnnxConfig
    from transformers.exporters.exporter_onnx import OnnxExporter

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    ids = torch.tensor([job["sequence"][:8]])
    exported = OnnxExporter().export_for_generation(
        model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        OnnxConfig(dynamic=True, ort_fusions=job.get("ort_fusions")), multi_token_decode=True)
    out = Path(job["out"])
    exported.save_pretrained(out)
    files = sorted(str(p) for p in out.glob("*.onnx*"))
    return {"phases": {"export_and_save": time.perf_counter() - t0}, "files": files,
            "components": list(exported.components)}


def child_run_onnx_genai(job: dict) -> dict:
    """Our folder through ONNX Runtime GenAI: prefill = ``append_tokens(prompt)``; decode = one ``append_tokens``
    per fixed token (teacher-forced: the same work as every other runtime; greedy picks would stop at a random eos).
    """
    import numpy as np
    import onnxruntime_genai as og

    from exporter.backends.onnx.genai import GenAIModel

    model = GenAIModel(Path(job["path"]), threads=job["threads"])
    ids, prompt_len = job["sequence"], job["prompt_len"]
    prompt = np.asarray([ids[:prompt_len]], dtype=np.int32)
    steps = [np.asarray([[t]], dtype=np.int32) for t in ids[prompt_len:]]

    def generator():
        return og.Generator(model.model, model._params(len(ids)))

    def prefill():
        gen = generator()
        start = time.perf_counter()
        gen.append_tokens(prompt)
        return time.perf_counter() - start

    def decode():
        gen = generator()
        gen.append_tokens(prompt)
        start = time.perf_counter()
        for step in steps:
            gen.append_tokens(step)
        return time.perf_counter() - start

    result = timing_result(prefill, decode, prompt_len, len(steps), job)
    result["load_s"] = model.load_s
    return result


def child_run_onnx_ort(job: dict) -> dict:
    """Our ``model.onnx`` through plain onnxruntime (``exporter.backends.onnx.runtime.OnnxSession``: numpy feeds, the present
    tensors fed back as the next past)."""
    from exporter.backends.onnx.runtime import OnnxSession

    session = OnnxSession(Path(job["path"]) / "model.onnx", threads=job["threads"])
    ids, prompt_len = job["sequence"], job["prompt_len"]

    def prefill():
        session.reset()
        start = time.perf_counter()
        session.step(ids[:prompt_len], 0)
        return time.perf_counter() - start

    def decode():
        session.reset()
        session.step(ids[:prompt_len], 0)
        start = time.perf_counter()
        for i in range(prompt_len, len(ids)):
            session.step([ids[i]], i)
        return time.perf_counter() - start

    return timing_result(prefill, decode, prompt_len, len(ids) - prompt_len, job)


def child_run_onnx_hf(job: dict) -> dict:
    """``transformers.exporters`` ONNX components through its own runner (IO binding): prefill on the prompt, then
    decode one token at a time, the cache passed in and returned each call."""
    import onnxruntime as ort
    import torch
    from transformers.exporters import ExportedModel

    options = ort.SessionOptions()
    options.intra_op_num_threads = job["threads"]
    exported = ExportedModel.from_pretrained(job["path"], session_options=options)
    runners = exported.runners
    ids, prompt_len = job["sequence"], job["prompt_len"]
    prompt = torch.tensor([ids[:prompt_len]])
    names = list(runners)

    def run_prefill():
        start = time.perf_counter()
        out = runners["prefill"](input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 position_ids=torch.arange(prompt_len)[None])
        return time.perf_counter() - start, out

    def decode():
        _, out = run_prefill()
        cache = out.cache
        start = time.perf_counter()
        for i in range(prompt_len, len(ids)):
            out = runners["decode"](input_ids=torch.tensor([[ids[i]]]), position_ids=torch.tensor([[i]]),
                                    attention_mask=torch.ones(1, i + 1, dtype=torch.long), cache=cache)
            cache = out.cache
        return time.perf_counter() - start

    result = timing_result(lambda: run_prefill()[0], decode, prompt_len, len(ids) - prompt_len, job)
    result["components"] = names
    return result


# ---------------------------------------------------------------------------------------------- child: runtimes
def child_run_pte(job: dict) -> dict:
    """A ``forward(tokens [1,S], input_pos [S])`` program (ours, optimum's): prefill and decode timings."""
    import numpy as np
    import torch
    from executorch.runtime import Runtime

    load_et_kernels()
    set_et_threads(job["threads"])
    data = Path(job["path"]).with_suffix(".ptd")
    program = Runtime.get().load_program(Path(job["path"]), data_path=str(data) if data.is_file() else None)
    ids, prompt_len = job["sequence"], job["prompt_len"]
    prompt = torch.tensor([ids[:prompt_len]])
    steps = [(torch.tensor([[t]]), torch.tensor([i])) for i, t in enumerate(ids[prompt_len:], start=prompt_len)]

    def prefill():
        method = program.load_method("forward")  # fresh cache; loading is not timed
        start = time.perf_counter()
        method.execute([prompt, torch.arange(prompt_len)])
        return time.perf_counter() - start

    def decode():
        method = program.load_method("forward")
        method.execute([prompt, torch.arange(prompt_len)])
        start = time.perf_counter()
        for tokens, pos in steps:
            method.execute([tokens, pos])
        return time.perf_counter() - start

    result = timing_result(prefill, decode, prompt_len, len(steps), job)
    if job.get("accuracy"):
        method = program.load_method("forward")
        rows = [method.execute([prompt, torch.arange(prompt_len)])[0][0]]
        rows += [method.execute([tokens, pos])[0][0] for tokens, pos in steps]
        logits = torch.cat([r.float() for r in rows]).numpy()
        result["accuracy"] = accuracy(logits, np.load(job["fp32_ref"]),
                                      np.load(job["qref"]) if job.get("qref") and Path(job["qref"]).is_file() else None)
    return result


def child_run_hf(job: dict) -> dict:
    """``transformers.exporters`` components through its own runner: prefill.pte on the prompt, then decode.pte
    one token at a time, the StaticCache passed in and returned each call (its program's interface)."""
    import torch
    from transformers import StaticCache
    from transformers.exporters import ExportedModel

    set_et_threads(job["threads"])
    exported = ExportedModel.from_pretrained(job["path"])
    runners = exported.runners
    ids, prompt_len, max_len = job["sequence"], job["prompt_len"], job["max_seq_len"]
    prompt = torch.tensor([ids[:prompt_len]])
    config = exported.config

    def run_prefill():
        cache = StaticCache(config=config, max_cache_len=max_len)
        start = time.perf_counter()
        out = runners["prefill"](input_ids=prompt, position_ids=torch.arange(prompt_len)[None], cache=cache)
        return time.perf_counter() - start, out.cache

    def decode():
        _, cache = run_prefill()
        start = time.perf_counter()
        for i in range(prompt_len, len(ids)):
            mask = (torch.arange(max_len) <= i)[None, None, None, :]
            out = runners["decode"](input_ids=torch.tensor([[ids[i]]]), attention_mask=mask,
                                    position_ids=torch.tensor([[i]]), cache=cache)
            cache = out.cache
        return time.perf_counter() - start

    return timing_result(lambda: run_prefill()[0], decode, prompt_len, len(ids) - prompt_len, job)


def child_run_eager(job: dict) -> dict:
    """Eager transformers (default sdpa attention), DynamicCache, the same prompt and decode tokens."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    ids, prompt_len = job["sequence"], job["prompt_len"]
    prompt = torch.tensor([ids[:prompt_len]])

    @torch.no_grad()
    def prefill():
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        model(input_ids=prompt, cache=cache, use_cache=True)
        return time.perf_counter() - start

    @torch.no_grad()
    def decode():
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, cache=cache, use_cache=True)
        start = time.perf_counter()
        for i in range(prompt_len, len(ids)):
            model(input_ids=torch.tensor([[ids[i]]]), cache=cache, use_cache=True)
        return time.perf_counter() - start

    result = timing_result(prefill, decode, prompt_len, len(ids) - prompt_len, job)
    if job.get("fp32_ref"):
        import numpy as np

        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        np.save(job["fp32_ref"], logits)
    return result


def timing_result(prefill, decode, prompt_len: int, decode_len: int, job: dict) -> dict:
    prefill_s = median_timings(prefill, job["warmup"], job["repeats"])
    decode_s = median_timings(decode, job["warmup"], job["repeats"])
    return {"prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tok_s": prompt_len / statistics.median(prefill_s),
            "decode_tok_s": decode_len / statistics.median(decode_s)}


def accuracy(logits, fp32, quantized_ref) -> dict:
    """Teacher-forced agreement: vs fp32 eager (top-1, mean KL(fp32 || artifact)), vs quantized eager (max abs)."""
    import numpy as np

    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(fp32), log_softmax(logits)
    result = {"vs_fp32": {"top1_agreement": float((logits.argmax(-1) == fp32.argmax(-1)).mean()),
                          "mean_kl": float((np.exp(lp) * (lp - lq)).sum(-1).mean()),
                          "max_abs_diff": float(np.abs(logits - fp32).max()),
                          "max_abs_logit": float(np.abs(fp32).max())}}
    if quantized_ref is not None:
        diff = np.abs(logits.astype(np.float64) - quantized_ref)
        result["vs_quantized_eager"] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                                        "top1_agreement": float((logits.argmax(-1) == quantized_ref.argmax(-1)).mean())}
    return result


CHILDREN = {"export_ours": child_export_ours, "export_cli": child_export_cli, "export_hf": child_export_hf,
            "export_optimum": child_export_optimum, "run_pte": child_run_pte, "run_hf": child_run_hf,
            "run_eager": child_run_eager, "export_onnx_ours": child_export_onnx_ours,
            "export_onnx_hf": child_export_onnx_hf, "run_onnx_genai": child_run_onnx_genai,
            "export_onnx_builder": child_export_onnx_builder,
            "run_onnx_ort": child_run_onnx_ort, "run_onnx_hf": child_run_onnx_hf}


def child_main(kind: str, job_path: str) -> None:
    quiet()
    job = json.loads(Path(job_path).read_text())
    result = CHILDREN[kind](job)
    Path(job_path + ".result").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- parent
def run_child(kind: str, job: dict, workdir: Path, python: str = sys.executable, log=None) -> dict:
    """Run one child process; returns its result plus wall seconds and its own peak RSS (MiB)."""
    job_path = workdir / f"job-{kind}-{time.time_ns()}.json"
    job_path.write_text(json.dumps(job))
    start = time.perf_counter()
    with open(workdir / "children.log", "a") as logfile:
        proc = subprocess.Popen([python, str(Path(__file__).resolve()), "_child", kind, str(job_path)], cwd=ROOT,
                                stdout=logfile, stderr=logfile, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                                     "OMP_NUM_THREADS": str(job["threads"])})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    result_path = Path(str(job_path) + ".result")
    if os.waitstatus_to_exitcode(status) != 0 or not result_path.is_file():
        return {"error": f"{kind} failed (exit {os.waitstatus_to_exitcode(status)}); see {workdir / 'children.log'}",
                "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}
    result = json.loads(result_path.read_text())
    result.update(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024)
    return result


def size_mib(files: list[str]) -> float:
    return sum(Path(f).stat().st_size for f in files) / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small Llama instead of the SmolLM2-135M shape")
    parser.add_argument("--model", help="a save_pretrained Llama folder instead of the built-from-config model")
    parser.add_argument("--recipes", default="xnnpack-fp32,xnnpack-8da4w,xnnpack-int8",
                        help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for every runtime and export (1: on a loaded 2-core machine, 2 OpenMP threads "
                             "spin against other work: eager decode measured 30x slower)")
    parser.add_argument("--skip-hf", action="store_true", help="skip transformers.exporters (its export is slow)")
    parser.add_argument("--skip-eager", action="store_true", help="skip the eager PyTorch row")
    parser.add_argument("--optimum-python", help="python of a venv with optimum-executorch (see the docstring)")
    parser.add_argument("--optimum-qlinear", default="none,8da4w", help="optimum exports: none = fp32")
    parser.add_argument("--via-cli", action="store_true", help="export ours with the export-model CLI")
    parser.add_argument("--accuracy", action="store_true", help="grade our artifacts vs fp32 / quantized eager")
    parser.add_argument("--side", choices=("executorch", "onnx", "all"), default="executorch",
                        help="which artifacts to measure (default: executorch; the eager row runs for every side)")
    parser.add_argument("--onnx-recipes", default="onnx-fp32,onnx-fp32-gqa,onnx-int4,onnx-int4-gqa",
                        help="ONNX recipes (--side onnx/all); with --skip-hf only these rows (and eager) run")
    parser.add_argument("--onnx-builder", default="fp32,int4",
                        help="ORT GenAI model builder rows (--side onnx/all): precisions, empty = none")
    parser.add_argument("--onnx-hf-fusions", default="none,cpu",
                        help="transformers OnnxExporter exports: ort_fusions values, none = unfused")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    quiet()

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.prompt_len, args.decode_tokens, args.max_seq_len = min(args.prompt_len, 32), min(args.decode_tokens, 32), 128
    model_dir = Path(args.model) if args.model else build_model(workdir / "model", QUICK if args.quick else SMOLLM2_135M)
    config = json.loads((model_dir / "config.json").read_text())
    sequence = token_ids(config["vocab_size"], args.prompt_len + args.decode_tokens)
    common = dict(model_dir=str(model_dir), max_seq_len=args.max_seq_len, prompt_len=args.prompt_len,
                  sequence=sequence, threads=args.threads, warmup=args.warmup, repeats=args.repeats)
    report = {"model": {"dir": str(model_dir), **{k: config.get(k) for k in
                        ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "intermediate_size", "tie_word_embeddings")}},
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")},
              "cpu_count": os.cpu_count(), "rows": {}}
    report["settings"]["workdir"] = str(workdir)
    fp32_ref = str(workdir / "fp32_logits.npy")

    def note(msg):
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if not args.skip_eager:
        note(f"eager PyTorch ({model_dir})")
        report["rows"]["eager"] = {"export": None, "run": run_child(
            "run_eager", {**common, "fp32_ref": fp32_ref if args.accuracy else None}, workdir)}

    if args.side in ("executorch", "all"):
        for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
            note(f"ours {name}: export")
            out = str(workdir / f"ours-{name}.pte")
            job = {**common, "recipe": name, "out": out, "accuracy": args.accuracy}
            export = run_child("export_cli" if args.via_cli else "export_ours", job, workdir)
            row = {"export": export}
            if "error" not in export:
                export["size_mib"] = size_mib(export["files"])
                note(f"ours {name}: run ({export['wall_s']:.0f} s export, {export['size_mib']:.1f} MiB)")
                row["run"] = run_child("run_pte", {**common, "path": out, "accuracy": args.accuracy, "fp32_ref": fp32_ref,
                                                   "qref": out + ".qref.npy"}, workdir)
            report["rows"][f"ours {name}"] = row

        if args.optimum_python:
            for qlinear in [q.strip() for q in args.optimum_qlinear.split(",") if q.strip()]:
                label = f"optimum {'fp32' if qlinear == 'none' else qlinear}"
                note(f"{label}: export")
                out = workdir / f"optimum-{qlinear}"
                export = run_child("export_optimum", {**common, "out": str(out),
                                                      "qlinear": None if qlinear == "none" else qlinear},
                                   workdir, python=args.optimum_python)
                row = {"export": export}
                if "error" not in export:
                    export["size_mib"] = size_mib(export["files"])
                    row["run"] = run_child("run_pte", {**common, "path": export["files"][0]}, workdir)
                report["rows"][label] = row
        else:
            report["rows"]["optimum"] = {"skipped": "no --optimum-python: optimum-executorch 1.1.0 requires "
                                                    "transformers==5.0.0rc1 (pinned: 5.24.0); see the docstring"}

        if not args.skip_hf:
            note("transformers.exporters: export (slow)")
            export = run_child("export_hf", {**common, "out": str(workdir / "hf-exporters")}, workdir)
            row = {"export": export}
            if "error" not in export:
                export["size_mib"] = size_mib(export["files"])
                note(f"transformers.exporters: run ({export['wall_s']:.0f} s export)")
                row["run"] = run_child("run_hf", {**common, "path": str(workdir / "hf-exporters")}, workdir)
            report["rows"]["transformers.exporters"] = row

    if args.side in ("onnx", "all"):
        onnx_side(args, common, workdir, report, note)

    report["ratios"] = ratios(report["rows"])
    print_table(report)
    json_path = args.json or workdir / "bench.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {json_path}")
    return 0


def onnx_side(args, common: dict, workdir: Path, report: dict, note) -> None:
    """Our ONNX folders (export, then ORT GenAI and plain onnxruntime) and transformers' OnnxExporter exports
    (through its own runner), one process each."""
    rows = report["rows"]
    for name in [r.strip() for r in args.onnx_recipes.split(",") if r.strip()]:
        note(f"ours {name}: export")
        out = workdir / f"ours-{name}"
        export = run_child("export_onnx_ours", {**common, "recipe": name, "out": str(out)}, workdir)
        rows[f"ours {name} (genai)"] = {"export": export}
        if "error" in export:
            continue
        export["size_mib"] = size_mib(export["files"])
        note(f"ours {name}: run ({export['wall_s']:.0f} s export, {export['size_mib']:.1f} MiB)")
        rows[f"ours {name} (genai)"]["run"] = run_child("run_onnx_genai", {**common, "path": str(out)}, workdir)
        rows[f"ours {name} (onnxruntime)"] = {"export": None, "run": run_child("run_onnx_ort", {**common,
                                                                                              "path": str(out)}, workdir)}
    for precision in [p.strip() for p in args.onnx_builder.split(",") if p.strip()]:
        label = f"ORT GenAI builder {precision}"
        note(f"{label}: export")
        out = workdir / f"builder-{precision}"
        export = run_child("export_onnx_builder", {**common, "precision": precision, "out": str(out)}, workdir)
        rows[label] = {"export": export}
        if "error" not in export:
            export["size_mib"] = size_mib(export["files"])
            note(f"{label}: run ({export['wall_s']:.0f} s export, {export['size_mib']:.1f} MiB)")
            rows[label]["run"] = run_child("run_onnx_genai", {**common, "path": str(out)}, workdir)
    if args.skip_hf:
        return
    for fusions in [f.strip() for f in args.onnx_hf_fusions.split(",") if f.strip()]:
        label = "transformers onnx" + ("" if fusions == "none" else f" ort_fusions={fusions}")
        note(f"{label}: export")
        out = workdir / f"hf-onnx-{fusions}"
        export = run_child("export_onnx_hf", {**common, "out": str(out),
                                               "ort_fusions": None if fusions == "none" else fusions}, workdir)
        rows[label] = {"export": export}
        if "error" not in export:
            export["size_mib"] = size_mib(export["files"])
            note(f"{label}: run ({export['wall_s']:.0f} s export, {export['size_mib']:.1f} MiB)")
            rows[label]["run"] = run_child("run_onnx_hf", {**common, "path": str(out)}, workdir)


def _get(rows, name, *keys):
    value = rows.get(name, {})
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _first(rows, names, *keys):
    """The value at ``keys`` of the first row among ``names`` that has one (a recipe benchmarked as a variant,
    e.g. ``xnnpack-fp32-ptd`` for ``xnnpack-fp32``)."""
    return next((v for v in (_get(rows, name, *keys) for name in names) if v is not None), None)


def ratios(rows: dict) -> dict:
    def ratio(a, b):
        return a / b if a and b else None

    hf = "transformers.exporters"
    et_fp32 = [f"ours xnnpack-fp32{suffix}" for suffix in ("", "-ptd")]
    et_q4 = [f"ours xnnpack-8da4w{suffix}" for suffix in ("", "-q4emb")]
    onnx_fp32 = ["ours onnx-fp32-gqa (genai)", "ours onnx-fp32 (genai)"]
    onnx_int4 = [f"ours onnx-int4-gqa{suffix} (genai)" for suffix in ("-q4emb", "")]
    builder = {
        "ONNX decode fp32-gqa ours (genai) / ORT GenAI builder fp32": ratio(
            _first(rows, onnx_fp32, "run", "decode_tok_s"), _get(rows, "ORT GenAI builder fp32", "run", "decode_tok_s")),
        "ONNX decode int4-gqa ours (genai) / ORT GenAI builder int4": ratio(
            _first(rows, onnx_int4, "run", "decode_tok_s"), _get(rows, "ORT GenAI builder int4", "run", "decode_tok_s")),
        "ONNX decode int4-gqa / fp32-gqa, ours genai (target >= 2)": ratio(
            _first(rows, onnx_int4, "run", "decode_tok_s"), _first(rows, onnx_fp32, "run", "decode_tok_s")),
        "ET decode fp32 (any variant) / transformers.exporters (target >= 1.5)": ratio(
            _first(rows, et_fp32, "run", "decode_tok_s"), _get(rows, hf, "run", "decode_tok_s")),
        "ET decode 8da4w (any variant) / ours fp32 (target >= 3)": ratio(
            _first(rows, et_q4, "run", "decode_tok_s"), _first(rows, et_fp32, "run", "decode_tok_s")),
        "ET decode 8da4w (any variant) / optimum 8da4w (target >= 1)": ratio(
            _first(rows, et_q4, "run", "decode_tok_s"), _get(rows, "optimum 8da4w", "run", "decode_tok_s")),
        "ET export time fp32 (any variant) / transformers.exporters (target <= 0.25)": ratio(
            _first(rows, et_fp32, "export", "wall_s"), _get(rows, hf, "export", "wall_s")),
    }
    return {**builder, **{
        "ONNX decode fp32 ours (genai) / transformers onnx ort_fusions=cpu (target >= 1.2)": ratio(
            _get(rows, "ours onnx-fp32 (genai)", "run", "decode_tok_s"),
            _get(rows, "transformers onnx ort_fusions=cpu", "run", "decode_tok_s")),
        "ONNX decode fp32 ours (onnxruntime) / transformers onnx ort_fusions=cpu": ratio(
            _get(rows, "ours onnx-fp32 (onnxruntime)", "run", "decode_tok_s"),
            _get(rows, "transformers onnx ort_fusions=cpu", "run", "decode_tok_s")),
        "ONNX decode fp32 ours (genai) / transformers onnx unfused": ratio(
            _get(rows, "ours onnx-fp32 (genai)", "run", "decode_tok_s"),
            _get(rows, "transformers onnx", "run", "decode_tok_s")),
        "ONNX decode int4 / fp32, ours genai (target >= 2)": ratio(
            _get(rows, "ours onnx-int4 (genai)", "run", "decode_tok_s"),
            _get(rows, "ours onnx-fp32 (genai)", "run", "decode_tok_s")),
        "ONNX decode fp32 GroupQueryAttention / export_safe, ours genai": ratio(
            _get(rows, "ours onnx-fp32-gqa (genai)", "run", "decode_tok_s"),
            _get(rows, "ours onnx-fp32 (genai)", "run", "decode_tok_s")),
        "ONNX decode fp32 GroupQueryAttention / export_safe, ours onnxruntime": ratio(
            _get(rows, "ours onnx-fp32-gqa (onnxruntime)", "run", "decode_tok_s"),
            _get(rows, "ours onnx-fp32 (onnxruntime)", "run", "decode_tok_s")),
        "ONNX decode int4 GroupQueryAttention / export_safe, ours genai": ratio(
            _get(rows, "ours onnx-int4-gqa (genai)", "run", "decode_tok_s"),
            _get(rows, "ours onnx-int4 (genai)", "run", "decode_tok_s")),
        "ONNX decode fp32-gqa ours (genai) / transformers onnx ort_fusions=cpu (target >= 1.2)": ratio(
            _get(rows, "ours onnx-fp32-gqa (genai)", "run", "decode_tok_s"),
            _get(rows, "transformers onnx ort_fusions=cpu", "run", "decode_tok_s")),
        "ONNX export time fp32 ours / transformers onnx ort_fusions=cpu": ratio(
            _get(rows, "ours onnx-fp32 (genai)", "export", "wall_s"),
            _get(rows, "transformers onnx ort_fusions=cpu", "export", "wall_s")),
        "decode fp32 ours / eager": ratio(
            _get(rows, "ours xnnpack-fp32", "run", "decode_tok_s"), _get(rows, "eager", "run", "decode_tok_s")),
    }}


def print_table(report: dict) -> None:
    header = ["artifact", "export s", "export peak RSS MiB", "size MiB", "prefill tok/s", "decode tok/s", "note"]
    lines = []
    for name, row in report["rows"].items():
        export, run = row.get("export") or {}, row.get("run") or {}
        note = row.get("skipped") or export.get("error") or run.get("error") or ""
        acc = run.get("accuracy")
        if acc:
            note = (f"top1 vs fp32 {acc['vs_fp32']['top1_agreement']:.2f}, KL {acc['vs_fp32']['mean_kl']:.2e}"
                    + (f", max|d| vs q-eager {acc['vs_quantized_eager']['max_abs_diff']:.1e}"
                       if "vs_quantized_eager" in acc else ""))

        def fmt(v, spec):
            return format(v, spec) if isinstance(v, (int, float)) else "-"

        lines.append([name, fmt(export.get("wall_s"), ".0f"), fmt(export.get("peak_rss_mib"), ".0f"),
                      fmt(export.get("size_mib"), ".1f"), fmt(run.get("prefill_tok_s"), ".1f"),
                      fmt(run.get("decode_tok_s"), ".1f"), note[:100]])
    widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths]] + lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print()
    for key, value in report["ratios"].items():
        print(f"{key}: {'-' if value is None else f'{value:.2f}'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2], sys.argv[3])
        raise SystemExit(0)
    raise SystemExit(main())
