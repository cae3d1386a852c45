"""Quality benchmark: how faithful every shipped recipe's artifact (and onnxruntime-genai's model builder int4) is to
the fp32 eager model, on real text, in one run.

    python scripts/quality.py                       # SmolLM2-135M-Instruct Q4_1 (scripts/real_weights.py), all recipes
    python scripts/quality.py --recipes onnx-int4,xnnpack-8da4w --reuse --out /tmp/quality

For each recipe: ``export-model --model M --recipe R --max-seq-len 512`` into ``OUT/R`` (a failed verification
leaves ``OUT/R.failed``, which is still measured, and the table says so), then the artifact runs in its own runtime
(the backend's step session), teacher-forced, over two texts that ship with Python (not written for this):
- English: CPython's ``LICENSE.txt`` from "B. TERMS AND CONDITIONS FOR ACCESSING OR OTHERWISE USING PYTHON", the
  first 1024 tokens as 4 independent windows of 256 (positions 0..255 each);
- Python: the standard library's ``textwrap.py`` from its start, the first 768 tokens as 3 windows of 256.
Metrics per text: mean KL(fp32 || artifact) over every position (nats), top-1 agreement with fp32's argmax, the
artifact's perplexity on the text (fp32's in the first row); and the artifact's size on disk (MiB).

The builder: ``python -m onnxruntime_genai.models.builder -i <dequantized checkpoint> -o OUT/builder-int4 -p int4
-e cpu``, run through plain onnxruntime with an empty past. Prints a markdown table, writes ``OUT/quality.json``.
Uses one intra-op thread where it can (the machine is shared); a full run exports every recipe (~1 h here).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from exporter import backends, recipes  # noqa: E402
from exporter.checkpoint import resolve  # noqa: E402
from real_weights import smollm2_gguf  # noqa: E402

WINDOW = 256
MAX_SEQ_LEN = 512  # room for one 256-token forward (prefill chunk = half the cache)
BUILDER = "builder-int4"


def texts() -> dict[str, tuple[Path, str | None, int]]:
    """name -> (file shipped with Python, text it starts at or None, tokens used)."""
    return {"english": (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", "B. TERMS AND CONDITIONS", 1024),
            "python": (Path(textwrap.__file__), None, 768)}


def windows(tokenizer) -> dict[str, list[list[int]]]:
    """Each text's token windows (see the module notes)."""
    out = {}
    for name, (path, anchor, count) in texts().items():
        text = path.read_text()
        ids = tokenizer(text[text.find(anchor) if anchor else 0:], add_special_tokens=False)["input_ids"][:count]
        if len(ids) != count:
            raise RuntimeError(f"{path}: only {len(ids)} tokens")
        out[name] = [ids[i:i + WINDOW] for i in range(0, count, WINDOW)]
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def metrics(reference: list[np.ndarray], actual: list[np.ndarray], wins: list[list[int]]) -> dict:
    """Mean KL(reference || actual), top-1 agreement and perplexity of ``actual`` over the windows."""
    kls, agree, nll, count = [], [], 0.0, 0
    for ref, got, ids in zip(reference, actual, wins):
        lp = log_softmax(got)
        kls.append((np.exp(ref) * (ref - lp)).sum(-1))
        agree.append(ref.argmax(-1) == lp.argmax(-1))
        nll -= float(lp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return {"kl": float(np.concatenate(kls).mean()), "top1": float(np.concatenate(agree).mean()),
            "ppl": float(np.exp(nll / count))}


class BuilderSession:
    """The builder's ``model.onnx`` through plain onnxruntime: one forward from an empty past."""

    def __init__(self, folder: Path):
        import onnxruntime as ort  # lazy: only this row needs it in this process

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}

    def reset(self) -> None:
        pass

    def step(self, ids: list[int], start_pos: int) -> np.ndarray:
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        for name, spec in self.inputs.items():
            if name.startswith("past_key_values"):
                feed[name] = np.zeros((1, spec.shape[1], 0, spec.shape[3]), np.float32)
        return self.session.run(["logits"], feed)[0][0]


def run_windows(session, wins: dict) -> dict[str, list[np.ndarray]]:
    """Logits of every window, each from position 0 on a fresh sequence."""
    out = {}
    for name, items in wins.items():
        rows = []
        for ids in items:
            session.reset()
            rows.append(log_softmax(session.step(ids, 0)))
        out[name] = rows
    return out


def export(model: str, recipe: str, out: Path, reuse: bool) -> Path:
    """``OUT/<recipe>`` (or ``.failed``) with the artifact, exported unless ``reuse`` finds it."""
    for folder in (out / recipe, out / f"{recipe}.failed"):
        if reuse and (folder / "verification.json").is_file():
            return folder
    command = [sys.executable, "-m", "exporter.cli", "--model", model, "--recipe", recipe, "--output",
               str(out / recipe), "--max-seq-len", str(MAX_SEQ_LEN), "--force", "--quiet"]
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(f"# exported {recipe} in {time.time() - started:.0f} s (exit {result.returncode})", file=sys.stderr)
    folder = out / recipe if result.returncode == 0 else out / f"{recipe}.failed"
    if not (folder / "verification.json").is_file():
        raise RuntimeError(f"{recipe}: export failed before verification:\n{result.stderr[-2000:]}")
    return folder


def build_builder(checkpoint_folder: Path, out: Path, reuse: bool) -> Path:
    """onnxruntime-genai's model builder int4 of the dequantized checkpoint."""
    folder = out / BUILDER
    if not (reuse and (folder / "model.onnx").is_file()):
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint_folder), "-o",
                   str(folder), "-p", "int4", "-e", "cpu", "-c", str(out / ".builder-cache")]
        subprocess.run(command, check=True, capture_output=True)
    return folder


def mib(paths) -> float:
    return sum(p.stat().st_size for p in paths) / 2 ** 20


def measure(args) -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    checkpoint = resolve(args.model, args.out / ".work")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder)
    wins = windows(tokenizer)
    model = checkpoint.load_model()

    class Eager:
        def reset(self):
            pass

        def step(self, ids, start):
            with torch.no_grad():
                return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()

    reference = run_windows(Eager(), wins)
    rows = [{"name": "fp32 eager (reference)", "size_mib": None, "verified": None,
             **{t: metrics(reference[t], reference[t], wins[t]) for t in wins}}]
    names = args.recipes.split(",") if args.recipes else recipes.available()
    for name in names:
        recipe = recipes.load(name)
        backend = backends.get(recipe.target)
        folder = export(args.model, name, args.out, args.reuse)
        report = json.loads((folder / "verification.json").read_text())
        session = backend.open_session(folder / backend.artifact)
        logits = run_windows(session, wins)
        rows.append({"name": name, "size_mib": mib(backend.artifact_files(folder)), "verified": report["passed"],
                     **{t: metrics(reference[t], logits[t], wins[t]) for t in wins}})
        print(f"# {name}: {json.dumps(rows[-1])}", file=sys.stderr)
    if not args.no_builder:
        folder = build_builder(checkpoint.folder, args.out, args.reuse)
        logits = run_windows(BuilderSession(folder), wins)
        rows.append({"name": "onnxruntime-genai builder int4", "size_mib": mib([folder / "model.onnx",
                                                                                  folder / "model.onnx.data"]),
                     "verified": None, **{t: metrics(reference[t], logits[t], wins[t]) for t in wins}})
    return {"model": args.model, "texts": {t: {"file": str(p), "from": a, "tokens": n, "windows": n // WINDOW}
                                           for t, (p, a, n) in texts().items()}, "rows": rows}


def table(result: dict) -> str:
    """The markdown table of ``result``."""
    builder = next((r for r in result["rows"] if r["name"].startswith("onnxruntime-genai")), None)
    lines = ["| artifact | size MiB | vs builder | en KL | en top-1 | en ppl | py KL | py top-1 | py ppl | verified |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        size = "-" if row["size_mib"] is None else f"{row['size_mib']:.1f}"
        ratio = "-" if row["size_mib"] is None or builder is None else f"{row['size_mib'] / builder['size_mib']:.2f}x"
        verified = {None: "-", True: "passed", False: "FAILED"}[row["verified"]]
        en, py = row["english"], row["python"]
        lines.append(f"| {row['name']} | {size} | {ratio} | {en['kl']:.4f} | {en['top1']:.3f} | {en['ppl']:.2f} | "
                     f"{py['kl']:.4f} | {py['top1']:.3f} | {py['ppl']:.2f} | {verified} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the SmolLM2 Q4_1 GGUF the tests use)")
    parser.add_argument("--out", type=Path, default=Path("out/quality"), help="exports and quality.json go here")
    parser.add_argument("--recipes", default="", help="comma-separated recipe names (default: every shipped one)")
    parser.add_argument("--reuse", action="store_true", help="measure existing exports in --out instead of exporting")
    parser.add_argument("--no-builder", action="store_true", help="skip onnxruntime-genai's model builder row")
    args = parser.parse_args()
    args.model = args.model or str(smollm2_gguf())
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
