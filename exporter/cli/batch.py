"""``export-model batch FILE.toml --output DIR``: several exports in one run, each in its own folder.

The file holds ``[[export]]`` tables with ``model`` and ``target`` (required) and optional ``recipe`` (a name, or
a list of names), ``max_seq_len``, ``name`` (the sub-folder, default derived from the model) and the options of
``export-model``: ``group_size``, ``qembedding``, ``dtype``, ``onnx_cache``, ``external_weights``. Entries run one
after the other; a failed entry does not stop the others. ``summary.json`` and a table report every entry.

``--shard I/N`` runs entries I, I+N, I+2N... of the file (1-based positions): N jobs with I = 1..N (a CI matrix)
run every entry exactly once, and ``export-model batch-merge`` combines their folders and summaries into what one
unsharded run writes. ``summary.json`` names the batch file (and its sha256), the shard, and for every entry its
position in the file and its folder relative to ``--output``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import time
import tomllib
from pathlib import Path

from exporter import backends
from exporter.cli.batch_merge import write_summary
from exporter.cli.common import ArgumentParser, fail
from exporter.cli.export import OPTIONS, apply_overrides, select_recipes
from exporter.errors import ExportFailed, UserError
from exporter.pipeline import ExportRequest, run_export
from exporter.progress import Progress
from exporter.quiet import native_output_captured

ENTRY_KEYS = {"model", "target", "recipe", "max_seq_len", "name", *OPTIONS}  # options: as the command-line flags


def build_parser() -> ArgumentParser:
    """The ``batch`` command line."""
    parser = ArgumentParser(prog="export-model batch", description="Run the exports listed in a TOML file.")
    parser.add_argument("file", type=Path, help="TOML file with [[export]] tables")
    parser.add_argument("--output", required=True, type=Path, help="folder that receives one sub-folder per entry")
    parser.add_argument("--force", action="store_true", help="replace existing entry folders once verified")
    parser.add_argument("--force-memory", action="store_true",
                        help="run entries whose estimated peak memory exceeds the memory available")
    parser.add_argument("--shard", metavar="I/N", type=parse_shard,
                        help="run only entries I, I+N, I+2N... of the file (1 <= I <= N), e.g. one job of a CI matrix")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    return parser


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``1 <= I <= N`` (argparse type: a bad value is a one-line usage error)."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. 2/3")
    return int(match[1]), int(match[2])


def shard_positions(count: int, shard: tuple[int, int] | None) -> list[int]:
    """The 1-based positions of a ``count``-entry file that shard ``(I, N)`` runs (all without a shard)."""
    if shard is None:
        return list(range(1, count + 1))
    index, shards = shard
    return list(range(index, count + 1, shards))


def batch_identity(path: Path, count: int) -> dict:
    """What identifies a batch file in summaries (shards of one file must agree on it)."""
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "entries": count}


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
    """An entry's folder name when it gives none: the model (without ``builtin:``) and the target."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", entry["model"].removeprefix("builtin:")).strip("-")
    return f"{base}-{entry['target']}"


def cmd_batch(argv: list[str]) -> int:
    """``export-model batch``: see the module docstring."""
    args = build_parser().parse_args(argv)
    try:
        entries = read_entries(args.file)
        args.output.mkdir(parents=True, exist_ok=True)
    except UserError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot create output folder {args.output} ({exc.strerror})")
    summary = []
    for position in shard_positions(len(entries), args.shard):
        summary.append(run_entry(entries[position - 1], position, args))
    body = {"batch": batch_identity(args.file, len(entries))}
    if args.shard:
        body["shard"] = {"index": args.shard[0], "count": args.shard[1]}
    return write_summary(args.output, {**body, "entries": summary})


def run_entry(entry: dict, position: int, args) -> dict:
    """Export one entry into ``args.output / name``; its summary record (status, folder relative to the output)."""
    progress = Progress(quiet=args.quiet)
    if not args.quiet:
        print(f"== {entry['name']}: {entry['model']} -> {entry['target']}", file=progress.stream, flush=True)
    start = time.perf_counter()
    record = {"index": position, "name": entry["name"], "model": entry["model"], "target": entry["target"],
              "recipes": [r.name for r in entry["recipes"]], "folder": entry["name"]}
    try:
        with native_output_captured():
            result = run_export(ExportRequest(model=entry["model"], recipes=entry["recipes"],
                                              output=args.output / entry["name"], max_seq_len=entry.get("max_seq_len"),
                                              force=args.force, force_memory=args.force_memory), progress)
        record.update(status="passed" if result.passed else "failed", folder=result.output.name,
                      artifacts={row[0]: {"size": row[2], "max_abs_diff": row[3], "top1": row[4],
                                          "verification": row[5]} for row in result.rows})
    except (UserError, ExportFailed) as exc:
        record.update(status="error", message=str(exc))
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record
