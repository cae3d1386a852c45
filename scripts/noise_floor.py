"""Noise floors behind the quantized recipes' ``[verify]`` thresholds: how far two eager computations of the same
matched reference drift apart when they differ only in float32 rounding.

    python scripts/noise_floor.py --model <checkpoint> --recipe xnnpack-8da4w [--artifact OUT_DIR] [--max-seq-len 48]

An int8-activation artifact (XNNPACK ``qd8``, MatMulNBits ``accuracy_level`` 4) cannot match its eager reference to
fp32 rounding on a trained model: a 1-ulp difference anywhere upstream moves an activation across an int8 rounding
boundary, and those flips compound over the layers. This measures that floor on the verification plan itself (same
cases and tokens as ``exporter.verification``): the matched reference with transformers' ``sdpa`` attention against
the same reference with ``eager`` attention (one kernel swap, nothing else), graded stage by stage like the tight
side (max rel diff, top-1). It also grades the eager matched reference against fp32 eager like the fp32 side (mean
KL per stage, top-1 pooled): what the artifact should measure there. With ``--artifact``, the folder's
``verification.json`` (or ``<folder>.failed``) is printed next to it. ONNX recipes need ``--artifact`` (their
reference is read from the file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter import backends, recipes  # noqa: E402
from exporter.checkpoint import resolve  # noqa: E402
from exporter.verification.compare import Thresholds, grade  # noqa: E402
from exporter.verification.folder import load_tokenizer  # noqa: E402
from exporter.verification.plan import default_plan  # noqa: E402
from exporter.verification.reference import build_reference  # noqa: E402
from exporter.progress import Progress  # noqa: E402

NOTHING = Thresholds(0.0)  # grade() with no pass condition: metrics only


def matched(backend, recipe, checkpoint, artifact, attention: str):
    return backend.matched_reference(recipe, checkpoint.load_model(attention), artifact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--artifact", type=Path, default=None, help="an export folder of that recipe")
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: the recipe's, capped by the model")
    parser.add_argument("--work", type=Path, default=Path("out/.noise-floor"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = recipes.load(args.recipe)
    backend = backends.get(recipe.target)
    checkpoint = resolve(args.model, args.work)
    max_seq_len = min(args.max_seq_len or recipe.max_seq_len, checkpoint.position_limit or 1 << 30)
    folder = args.artifact
    if folder is not None and not (folder / "verification.json").is_file():
        folder = folder.with_name(folder.name + ".failed")
    artifact = folder / backend.artifact if folder is not None else None
    tokenizer = load_tokenizer(checkpoint.folder, Progress(quiet=True))
    plan = default_plan(max_seq_len, checkpoint.smallest_window)
    fp32 = build_reference(checkpoint.load_reference(), tokenizer, plan)
    tokens = [case.tokens for case in fp32.cases]
    first = build_reference(matched(backend, recipe, checkpoint, artifact, "sdpa"), tokenizer, plan, tokens=tokens)
    second = build_reference(matched(backend, recipe, checkpoint, artifact, "eager"), tokenizer, plan, tokens=tokens)
    floor = grade([case.logits for case in second.cases], first, NOTHING)
    fp32_side = grade([case.logits for case in first.cases], fp32, NOTHING)
    actual = {}
    if folder is not None:
        entry = next(iter(json.loads((folder / "verification.json").read_text())["artifacts"].values()))
        actual = {s["stage"]: s for s in entry["stages"]}
    print(f"{recipe.name} on {args.model} (cache {max_seq_len})")
    print("| stage | floor max rel | floor top-1 | artifact max rel | artifact top-1 | eager vs fp32 KL | artifact KL |")
    print("|---|---|---|---|---|---|---|")
    for noise, side in zip(floor, fp32_side):
        got, got32 = actual.get(noise["stage"], {}), actual.get("vs fp32 " + noise["stage"], {})
        cells = [f"{noise['max_rel_diff']:.2e}", f"{noise['top1_agreement']:.3f}",
                 f"{got['max_rel_diff']:.2e}" if got else "-", f"{got['top1_agreement']:.3f}" if got else "-",
                 f"{side['mean_kl']:.4f}", f"{got32['mean_kl']:.4f}" if got32 else "-"]
        print(f"| {noise['stage']} ({noise['positions']}) | " + " | ".join(cells) + " |")
    positions = sum(s["positions"] for s in fp32_side)
    pooled = sum(s["top1_agreement"] * s["positions"] for s in fp32_side) / positions
    worst = {"floor max rel": max(s["max_rel_diff"] for s in floor),
             "floor min top-1": min(s["top1_agreement"] for s in floor),
             "eager max KL": max(s["mean_kl"] for s in fp32_side), "eager pooled top-1": pooled}
    print(json.dumps({k: round(v, 4) for k, v in worst.items()}))


if __name__ == "__main__":
    main()
