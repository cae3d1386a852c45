"""``export-model verify DIR``: re-check an existing output folder (file hashes, then every artifact vs eager)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from exporter import checkpoint
from exporter.cli.common import EXIT_FAILED, EXIT_OK, ArgumentParser, fail
from exporter.errors import UserError
from exporter.manifest import check_integrity
from exporter.progress import Progress, table
from exporter.quiet import native_output_captured
from exporter.recipes import Recipe
from exporter.verification import compare, verify_folder


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="export-model verify",
                            description="Re-verify an export-model output folder against the eager model.")
    parser.add_argument("folder", type=Path, help="an output folder written by export-model")
    parser.add_argument("--model", help="checkpoint to compare with (default: the source named in manifest.json)")
    parser.add_argument("--gguf-file", help="the GGUF file to read when the --model folder holds several")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def recipes_from_manifest(manifest: dict) -> list[Recipe]:
    try:
        return [Recipe(**entry) for entry in manifest["recipes"]]
    except (KeyError, TypeError) as exc:
        raise UserError(f"manifest.json: unreadable recipes ({exc})") from None


def cmd_verify(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    progress = Progress(quiet=args.quiet)
    try:
        with progress.stage("hashes", f"files listed in {args.folder}/manifest.json"):
            manifest = check_integrity(args.folder)
        recipes = recipes_from_manifest(manifest)
        source = args.model or manifest.get("model", {}).get("source")
        gguf_file = args.gguf_file or (None if args.model else manifest.get("model", {}).get("gguf_file"))
        if not source:
            raise UserError("manifest.json names no model source; pass --model")
        with tempfile.TemporaryDirectory(prefix="export-model-") as workdir:
            with progress.stage("load", f"reference model {source}"):
                model = checkpoint.resolve(source, Path(workdir), gguf_file)
            with native_output_captured():
                report = verify_folder(args.folder, manifest["artifacts"], recipes, model,
                                       int(manifest["max_seq_len"]), progress)
    except UserError as exc:
        return fail(str(exc))
    rows = [[name, *compare.headline(entry), "passed" if entry["passed"] else "FAILED"]
            for name, entry in report["artifacts"].items()]
    print(table(["artifact", "max |diff|", "top-1", "verification"], rows))
    if report["passed"]:
        print(f"\n{args.folder}: hashes intact, every artifact verified")
        return EXIT_OK
    print(f"\n{args.folder}: verification FAILED", file=sys.stderr)
    return EXIT_FAILED
