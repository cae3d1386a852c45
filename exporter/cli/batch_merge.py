"""``export-model batch-merge DIR... --output DIR``: the shards of one batch file (``export-model batch --shard
I/N``, one per CI job) combined into what one unsharded run writes: every entry's folder under ``--output``, one
``summary.json`` with the entries in file order, and the same table.

The shards must come from the same batch file (same sha256 in their summaries) and cover it exactly once: shards
1..N each once, every entry of the file once. Entry folders are hard-linked into ``--output`` where the file system
allows (no second copy of the weights), else copied. Exit 0 when every entry verified, 1 when any failed, 2 for
missing, mismatched or overlapping shards (one line, before anything is written).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from exporter.cli.common import EXIT_FAILED, EXIT_OK, ArgumentParser, fail
from exporter.errors import UserError
from exporter.progress import table

SUMMARY = "summary.json"


def build_parser() -> ArgumentParser:
    """The ``batch-merge`` command line."""
    parser = ArgumentParser(prog="export-model batch-merge",
                            description="Combine the outputs of `export-model batch --shard I/N` runs.")
    parser.add_argument("shards", nargs="+", type=Path, help="the --output folders of the shard runs")
    parser.add_argument("--output", required=True, type=Path, help="folder for the combined entries and summary")
    parser.add_argument("--force", action="store_true", help="replace entry folders that already exist in --output")
    return parser


def read_summary(folder: Path) -> dict:
    """``folder/summary.json`` of a batch run (UserError if missing or not a batch summary)."""
    path = folder / SUMMARY
    try:
        summary = json.loads(path.read_text())
        summary["batch"]["sha256"], summary["entries"]  # noqa: B018 - the fields a merge needs
    except FileNotFoundError:
        raise UserError(f"{folder}: no {SUMMARY} (not the --output folder of an export-model batch run)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{path}: not a batch summary written by this version of export-model") from None
    return summary


def merge_summaries(summaries: list[dict], names: list[str]) -> dict:
    """One summary from the shards' (``names``: where each came from, for errors): the batch identity and every
    entry in file order. UserError unless the shards are of one file and cover it exactly once."""
    batch = summaries[0]["batch"]
    shards: dict[int, str] = {}
    count = None
    for summary, name in zip(summaries, names):
        if summary["batch"] != batch:
            raise UserError(f"{name}: a shard of another batch file ({summary['batch'].get('file')}, sha256 "
                            f"{summary['batch'].get('sha256', '')[:12]}) than {names[0]} ({batch.get('file')}, "
                            f"{batch.get('sha256', '')[:12]})")
        shard = summary.get("shard") or {"index": 1, "count": 1}
        if count is not None and shard["count"] != count:
            raise UserError(f"{name}: shard {shard['index']}/{shard['count']}, but {names[0]} is one of {count}")
        count = shard["count"]
        if shard["index"] in shards:
            raise UserError(f"{name} and {shards[shard['index']]} are both shard {shard['index']}/{count}")
        shards[shard["index"]] = name
    missing = sorted(set(range(1, count + 1)) - set(shards))
    if missing:
        raise UserError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(f'{i}/{count}' for i in missing)} "
                        "missing: pass the output folder of every shard")
    entries = sorted((e for s in summaries for e in s["entries"]), key=lambda e: e["index"])
    positions = [e["index"] for e in entries]
    if positions != list(range(1, batch["entries"] + 1)):
        raise UserError(f"the shards hold entries {positions}, not each of the file's {batch['entries']} entries once")
    return {"batch": batch, "entries": entries}


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def gather_folders(shard_folders: list[Path], summaries: list[dict], output: Path, force: bool) -> None:
    """Hard-link (else copy) every entry folder of the shards into ``output``."""
    plan = []
    for folder, summary in zip(shard_folders, summaries):
        for entry in summary["entries"]:
            source, target = folder / entry["folder"], output / entry["folder"]
            if not source.is_dir() or source.resolve() == target.resolve():
                continue
            if target.exists() and not force:
                raise UserError(f"{target} already exists (pass --force to replace it)")
            plan.append((source, target))
    output.mkdir(parents=True, exist_ok=True)
    for source, target in plan:
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial, copy_function=_link_or_copy)
        if target.exists():
            shutil.rmtree(target)
        os.rename(partial, target)


def write_summary(output: Path, summary: dict) -> int:
    """Write ``output/summary.json``, print the table of its entries; the exit code (1 if any entry failed)."""
    (output / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    records = summary["entries"]
    rows = []
    for record in records:
        artifacts = record.get("artifacts", {})
        rows.append([record["name"], record["status"], f"{record['seconds']:.1f}",
                     ", ".join(f"{n} {a['size']}" for n, a in artifacts.items()) or "-",
                     ", ".join(f"{a['max_abs_diff']}/{a['top1']}" for a in artifacts.values()) or
                     record.get("message", "-")[:80]])
    print(table(["entry", "status", "seconds", "sizes", "max |diff| / top-1 (or error)"], rows))
    failed = [r["name"] for r in records if r["status"] != "passed"]
    shard = summary.get("shard")
    scope = f" (shard {shard['index']}/{shard['count']})" if shard else ""
    print(f"\n{len(records) - len(failed)} of {len(records)} exports verified{scope}; summary in {output / SUMMARY}")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_batch_merge(argv: list[str]) -> int:
    """``export-model batch-merge``: see the module docstring."""
    args = build_parser().parse_args(argv)
    try:
        summaries = [read_summary(folder) for folder in args.shards]
        merged = merge_summaries(summaries, [str(folder) for folder in args.shards])
        gather_folders(args.shards, summaries, args.output, args.force)
    except UserError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot write {args.output} ({exc.strerror})")
    return write_summary(args.output, merged)
