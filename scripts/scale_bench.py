"""Scale benchmark: peak memory and time per stage of ``export-model`` on checkpoints of the on-device sizes.

Random-weight checkpoints with the published configs of Llama-3.2-1B and Llama-3.2-3B (and smaller shapes for the
seconds-per-layer comparison) are written in bf16, sharded like the published ones, with the built-in byte-level
tokenizer (``exporter.builtin.build_tokenizer_json``; bos/eos/pad are its ids 1/2/0), under ``--models-dir``
(default ``/tmp/scale-models``, outside the repository). Each run is one ``export-model`` command as a user types it
(recipe defaults, cache 2048), one at a time; while it runs, the resident memory of the whole process tree (the
export and its build processes) is sampled every 0.2 s: "peak RSS" is the largest sum seen, also reported next to
the largest single process (what ``/usr/bin/time -v`` prints). Stage seconds and per-stage peaks come from the
export's progress lines.

    python scripts/scale_bench.py make                       # write the checkpoints only
    python scripts/scale_bench.py run [--only NAME ...]      # every run (or those named), then the table
    python scripts/scale_bench.py run --only llama-3.2-1b:xnnpack-8da4w
    python scripts/scale_bench.py table                      # the table of the last JSON

Writes ``--json`` (default ``docs/scale-bench.json``) after every run, and prints the table (model, recipe, peak RSS,
RSS / fp32 weights, seconds per stage, seconds per layer). The bounds checked: fp32 recipes (also ``--target all``)
peak <= 2.5x the fp32 weight bytes, quantized recipes <= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LLAMA3_ROPE = dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0, original_max_position_embeddings=8192,
                   rope_type="llama3")
TOKENIZER_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # the built-in tokenizer's specials
# The published config.json values (meta-llama/Llama-3.2-1B, -3B; HuggingFaceTB/SmolLM2-135M).
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
SHAPES["llama-3.2-1b-12l"] = dict(SHAPES["llama-3.2-1b"], num_hidden_layers=12)  # same width, fewer layers
ALL = ["xnnpack-fp32", "onnx-fp32"]  # --target all
# (model, recipes) in the order they run; every recipe list is one export-model command
RUNS = [("smollm2-135m", ALL), ("smollm2-135m", ["xnnpack-8da4w"]), ("smollm2-135m", ["onnx-int4"]),
        ("llama-3.2-1b-12l", ALL),
        ("llama-3.2-1b", ALL), ("llama-3.2-1b", ["xnnpack-8da4w"]), ("llama-3.2-1b", ["onnx-int4"]),
        ("llama-3.2-3b", ["xnnpack-8da4w"]), ("llama-3.2-3b", ["onnx-int4"]), ("llama-3.2-3b", ALL)]
BOUNDS = {"fp32": 2.5, "quantized": 1.5}
STAGE_LINE = re.compile(r"^\[\s*(\w+)\] (.*): (done|failed) in ([\d.]+) s, peak memory ([\d.]+) GiB$")
SHARD_BYTES = 2 << 30  # published Llama-3.2 checkpoints are sharded; so are these (<= 2 GiB per file)


def make_checkpoint(name: str, folder: Path, seed: int = 0) -> Path:
    """Write ``SHAPES[name]`` with seeded random bf16 weights (normal, std = initializer_range; norms 1) in
    save_pretrained layout, one tensor at a time (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from exporter.builtin import build_tokenizer_json

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(**SHAPES[name], **TOKENIZER_IDS, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            current[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            current[key] = (torch.randn(shape, generator=generator) * config.initializer_range).to(torch.bfloat16)
        size += current[key].numel() * 2
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file(shard, str(partial / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        total = sum(t.numel() * 2 for shard in shards for t in shard.values())
        (partial / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.dtype = torch.bfloat16
    config.save_pretrained(partial)
    (partial / "tokenizer.json").write_text(build_tokenizer_json())
    (partial / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True,
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    os.rename(partial, folder)
    return folder


def tree_rss(pid: int) -> tuple[int, int]:
    """(sum, largest) resident bytes of process ``pid`` and all its descendants."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    sizes = [rss.get(p, 0) for p in tree]
    return sum(sizes), max(sizes, default=0)


def run_export(model_dir: Path, recipes: list[str], output: Path, log: Path) -> dict:
    """One ``export-model`` command; its exit code, wall time, sampled peak tree / process RSS, stage lines."""
    command = [sys.executable, "-m", "exporter.cli", "--model", str(model_dir), "--output", str(output), "--force"]
    for recipe in recipes:
        command += ["--recipe", recipe]
    peak = {"tree": 0, "process": 0}
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        done = threading.Event()

        def sample():
            while not done.wait(0.2):
                total, largest = tree_rss(process.pid)
                peak["tree"], peak["process"] = max(peak["tree"], total), max(peak["process"], largest)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        _, status, usage = os.wait4(process.pid, 0)
        done.set()
        thread.join()
    stages = []
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        match = STAGE_LINE.match(line.strip())
        if match:
            stages.append({"stage": match[1], "what": match[2], "status": match[3], "seconds": float(match[4]),
                           "peak_gib": float(match[5])})
    errors = [line for line in text.splitlines() if line.startswith("export-model: ")]
    return {"command": " ".join(command[2:]), "exit": os.waitstatus_to_exitcode(status),
            "wall_s": round(time.perf_counter() - start, 1), "peak_tree_bytes": peak["tree"],
            "peak_process_bytes": max(peak["process"], usage.ru_maxrss * 1024), "stages": stages,
            "message": errors[-1] if errors else None}


def machine() -> dict:
    """Load and memory when a run starts (the machine is shared: timings vary with the load)."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {"loadavg": os.getloadavg(), "mem_available_gib": round(int(meminfo["MemAvailable"].split()[0]) / 2**20, 1),
            "cpus": os.cpu_count()}


def rows_of(result: dict) -> list[dict]:
    """Per recipe of a run: its build stages (from its weights load to the next one), its verification stage and
    the shared eager-reference stage."""
    per: dict[str, dict] = {}
    current = None
    for stage in result["stages"]:
        found = re.search(r"weights for (\S+)", stage["what"])
        if stage["stage"] == "load" and found:
            current = found[1]
        found = re.search(r"\((\S+)\) in ", stage["what"])
        owner = found[1] if stage["stage"] == "verify" and found else current
        if stage["stage"] == "verify" and not found:
            owner = "reference"
        if stage["stage"] in ("write",) or owner is None:
            continue
        per.setdefault(owner, {}).setdefault(stage["stage"], 0.0)
        per[owner][stage["stage"]] += stage["seconds"]
    return [{"recipe": recipe, "seconds": seconds} for recipe, seconds in per.items()]


def print_table(report: dict) -> None:
    """The README table: one line per (model, run), seconds per stage of each recipe."""
    from exporter.progress import table

    lines = []
    for run in report["runs"]:
        weights = run["fp32_weight_bytes"]
        peak = run["peak_tree_bytes"]
        kind = "quantized" if all(("int" in r or "da" in r) for r in run["recipes"]) else "fp32"
        ratio = peak / weights if weights else 0
        ok = run["exit"] == 0 and ratio <= BOUNDS[kind]
        per_stage = "; ".join(
            f"{row['recipe']}: " + ", ".join(f"{k} {v:.0f}" for k, v in row["seconds"].items())
            for row in rows_of(run))
        build = sum(s["seconds"] for s in run["stages"] if s["stage"] in ("load", "quantize", "capture", "lower",
                                                                        "qembed", "fuse"))
        lines.append([run["model"], "+".join(run["recipes"]), f"{peak / 2**30:.1f} GiB",
                      f"{ratio:.2f}x (<= {BOUNDS[kind]}x {'ok' if ok else 'NO'})", f"{run['wall_s']:.0f}",
                      f"{build / run['layers']:.1f}" if run["stages"] else "-",
                      (per_stage or run.get("message") or f"exit {run['exit']}")[:200]])
    print(table(["model", "recipes", "peak RSS (tree)", "RSS / fp32 weights", "wall s", "build s/layer",
                 "s per stage"], lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("make", "run", "table"))
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/scale-models"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale-bench"), help="outputs and logs")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "scale-bench.json")
    parser.add_argument("--only", nargs="*", help="run only these: a model (name of SHAPES), or MODEL:RECIPE+RECIPE")
    parser.add_argument("--keep", action="store_true", help="keep the exported folders")
    args = parser.parse_args(argv)
    if args.action == "table":
        print_table(json.loads(args.json.read_text()))
        return 0
    runs = [(m, r) for m, r in RUNS if not args.only or m in args.only or f"{m}:{'+'.join(r)}" in args.only]
    for model in dict.fromkeys(m for m, _ in runs):
        print(f"checkpoint {model}: {make_checkpoint(model, args.models_dir / model)}", flush=True)
    if args.action == "make":
        return 0
    from exporter.memory import weight_info

    report = json.loads(args.json.read_text()) if args.json.is_file() else {"runs": []}
    args.work.mkdir(parents=True, exist_ok=True)
    for model, recipes in runs:
        folder = args.models_dir / model
        name = f"{model}-{'+'.join(recipes)}"
        print(f"== {name}", flush=True)
        entry = {"model": model, "recipes": recipes, "layers": SHAPES[model]["num_hidden_layers"],
                 "fp32_weight_bytes": weight_info(folder).fp32_bytes, "machine": machine(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        entry.update(run_export(folder, recipes, args.work / name, args.work / f"{name}.log"))
        entry["machine_after"] = machine()
        report["runs"] = [r for r in report["runs"] if (r["model"], r["recipes"]) != (model, recipes)] + [entry]
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"   exit {entry['exit']}, {entry['wall_s']:.0f} s, peak {entry['peak_tree_bytes'] / 2**30:.2f} GiB "
              f"({entry['peak_tree_bytes'] / entry['fp32_weight_bytes']:.2f}x)", flush=True)
        if not args.keep:
            for suffix in ("", ".failed"):
                shutil.rmtree(args.work / (name + suffix), ignore_errors=True)
    print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
