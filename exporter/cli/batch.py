"""``export-model batch FILE.toml --output DIR``: several exports in one run, each in its own folder.

The file holds ``[[export]]`` tables with ``model`` and ``target`` (required) and optional ``recipe`` (a name, or
a list of names), ``max_seq_len``, ``name`` (the sub-folder, default derived from the model) and the options of
``export-model``: ``group_size``, ``qembedding``, ``dtype``, ``onnx_cache``, ``external_weights``. Entries run one
after the other; a failed entry does not stop the others. ``summary.json`` and a table report every entry.
"""

from __future__ import annotations

import json
import re
import sys
import time
import tomllib
from pathlib import Path

from exporter import backends
from exporter.cli.common import EXIT_FAILED, EXIT_OK, ArgumentParser, fail
from exporter.cli.export import OPTIONS, apply_overrides, select_recipes
from exporter.errors import ExportFailed, UserError
from exporter.pipeline import ExportRequest, run_export
from exporter.progress import Progress, table

ENTRY_KEYS = {"model", "target", "recipe", "max_seq_len", "name", *OPTIONS}  # options: as the command-line flags


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="export-model batch", description="Run the exports listed in a TOML file.")
    parser.add_argument("file", type=Path, help="TOML file with [[export]] tables")
    parser.add_argument("--output", required=True, type=Path, help="folder that receives one sub-folder per entry")
    parser.add_argument("--force", action="store_true", help="replace existing entry folders once verified")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    return parser


def read_entries(path: Path) -> list[dict]:
    """Validated entries of a batch file (UserError on the first problem, before anything runs)."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"batch file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"batch file {path}: not valid TOML ({exc})") from None
    entries = data.get("export")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"batch file {path}: no [[export]] tables")
    names = set()
    for index, entry in enumerate(entries, 1):
        where = f"batch file {path}, export #{index}"
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise UserError(f"{where}: unknown keys {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(ENTRY_KEYS))})")
        if not isinstance(entry.get("model"), str) or entry.get("target") not in (*backends.targets(), "all"):
            targets = " | ".join(f'"{t}"' for t in (*backends.targets(), "all"))
            raise UserError(f"{where}: needs model = \"...\" and target = {targets}")
        recipes = entry.get("recipe", [])
        entry["recipe"] = [recipes] if isinstance(recipes, str) else list(recipes)
        entry["recipes"] = select_recipes(entry["target"], entry["recipe"])  # validates names and targets
        try:
            entry["recipes"] = apply_overrides(entry["recipes"], **{key: entry.get(key) for key in OPTIONS})
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        if "max_seq_len" in entry and (not isinstance(entry["max_seq_len"], int) or entry["max_seq_len"] < 4):
            raise UserError(f"{where}: max_seq_len must be an integer >= 4")
        entry["name"] = entry.get("name") or default_name(entry)
        if not re.fullmatch(r"[A-Za-z0-9._-]+", entry["name"]) or entry["name"] in names:
            raise UserError(f"{where}: name {entry['name']!r} must be unique and use only letters, digits, . _ -")
        names.add(entry["name"])
    return entries


def default_name(entry: dict) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", entry["model"].removeprefix("builtin:")).strip("-")
    return f"{base}-{entry['target']}"


def cmd_batch(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        entries = read_entries(args.file)
        args.output.mkdir(parents=True, exist_ok=True)
    except UserError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot create output folder {args.output} ({exc.strerror})")
    summary = []
    for entry in entries:
        progress = Progress(quiet=args.quiet)
        if not args.quiet:
            print(f"== {entry['name']}: {entry['model']} -> {entry['target']}", file=sys.stderr)
        start = time.perf_counter()
        record = {"name": entry["name"], "model": entry["model"], "target": entry["target"],
                  "recipes": [r.name for r in entry["recipes"]], "folder": str(args.output / entry["name"])}
        try:
            result = run_export(ExportRequest(model=entry["model"], recipes=entry["recipes"],
                                              output=args.output / entry["name"],
                                              max_seq_len=entry.get("max_seq_len"), force=args.force), progress)
            record.update(status="passed" if result.passed else "failed", folder=str(result.output),
                          artifacts={row[0]: {"size": row[2], "max_abs_diff": row[3], "top1": row[4],
                                              "verification": row[5]} for row in result.rows})
        except (UserError, ExportFailed) as exc:
            record.update(status="error", message=str(exc))
        record["seconds"] = round(time.perf_counter() - start, 1)
        summary.append(record)
    (args.output / "summary.json").write_text(json.dumps({"entries": summary}, indent=2) + "\n")
    rows = []
    for record in summary:
        artifacts = record.get("artifacts", {})
        rows.append([record["name"], record["status"], f"{record['seconds']:.1f}",
                     ", ".join(f"{n} {a['size']}" for n, a in artifacts.items()) or "-",
                     ", ".join(f"{a['max_abs_diff']}/{a['top1']}" for a in artifacts.values()) or
                     record.get("message", "-")[:80]])
    print(table(["entry", "status", "seconds", "sizes", "max |diff| / top-1 (or error)"], rows))
    failed = [r["name"] for r in summary if r["status"] != "passed"]
    print(f"\n{len(summary) - len(failed)} of {len(summary)} exports verified; summary in {args.output / 'summary.json'}")
    return EXIT_FAILED if failed else EXIT_OK
