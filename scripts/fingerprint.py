"""Fingerprint what the CLI writes: every built-in model with every shipped recipe, exported through
``export-model batch``, reduced to the sha256 of each artifact file and the verification figures.

Used to prove that a restructuring changes nothing: run it before and after, then ``--compare`` the two JSON files.
Only the command line is used, so the script works on any revision of the project.

    python scripts/fingerprint.py --output /tmp/before.json [--work DIR] [--only tiny-llama,tiny-gemma2]
    python scripts/fingerprint.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT_SUFFIXES = (".pte", ".ptd", ".onnx", ".data", "genai_config.json")
VOLATILE = {"timings", "load_s", "seconds", "created"}  # run-to-run fields


def builtin_names() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from exporter import builtin

    return builtin.names()


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (ROOT / "recipes").glob("*.toml"))


def _sha(path: Path) -> str:
    """sha256 of a file; for ``.onnx``, of the graph without per-node debug metadata (stack traces and module class
    paths name the source files that ran the export, not what the graph computes)."""
    if path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        for node in proto.graph.node:
            del node.metadata_props[:]
        return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def fingerprint(models: list[str], recipes: list[str], work: Path, max_seq_len: int) -> dict:
    lines = []
    for model in models:
        for recipe in recipes:
            lines += ["[[export]]", f'model = "builtin:{model}"', f'recipe = "{recipe}"',
                      f'target = "{"onnx" if recipe.startswith("onnx") else "executorch"}"',
                      f"max_seq_len = {max_seq_len}", f'name = "{model}--{recipe}"', ""]
    batch = work / "batch.toml"
    batch.write_text("\n".join(lines))
    subprocess.run([sys.executable, "-m", "exporter.cli", "batch", str(batch), "--output", str(work / "out"),
                    "--quiet"], cwd=ROOT, check=False)
    return collect(models, recipes, work)


def collect(models: list[str], recipes: list[str], work: Path) -> dict:
    """Fingerprints of the folders a batch wrote under ``work/out``."""
    result = {}
    for model in models:
        for recipe in recipes:
            name = f"{model}--{recipe}"
            folder = work / "out" / name
            if not folder.is_dir():
                folder = work / "out" / f"{name}.failed"
            entry = {"status": "missing"}
            if folder.is_dir():
                entry = {"status": "passed" if not folder.name.endswith(".failed") else "failed",
                         "files": {p.name: _sha(p) for p in sorted(folder.iterdir())
                                   if p.is_file() and p.name.endswith(ARTIFACT_SUFFIXES)}}
                report = folder / "verification.json"
                if report.is_file():
                    entry["verification"] = _strip(json.loads(report.read_text()))
            result[name] = entry
    return result


def compare(before: dict, after: dict) -> int:
    differences = 0
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a == b:
            continue
        differences += 1
        if a is None or b is None:
            print(f"{name}: only in {'after' if a is None else 'before'}")
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                print(f"{name}: {key} differs")
    print(f"{len(set(before) | set(after)) - differences} identical, {differences} different")
    return 1 if differences else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--only", help="comma-separated built-in names (default: all)")
    parser.add_argument("--recipes", help="comma-separated recipe names (default: all shipped)")
    parser.add_argument("--max-seq-len", type=int, default=32)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--rehash", action="store_true", help="only fingerprint what --work already holds")
    args = parser.parse_args()
    if args.compare:
        return compare(*(json.loads(p.read_text()) for p in args.compare))
    models = args.only.split(",") if args.only else builtin_names()
    recipes = args.recipes.split(",") if args.recipes else recipe_names()
    work = args.work or Path(tempfile.mkdtemp(prefix="fingerprint-"))
    work.mkdir(parents=True, exist_ok=True)
    result = collect(models, recipes, work) if args.rehash else fingerprint(models, recipes, work, args.max_seq_len)
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
