"""One export job: load -> wrap -> capture -> lower -> verify -> write, into a staging folder moved into place
only when every artifact passed verification.

Output folder: ``model.pte`` and/or ``model.onnx`` (+ ``model.onnx.data``, ``genai_config.json``), the tokenizer
files, ``config.json``, ``verification.json`` and ``manifest.json``. A failed verification leaves the folder at
``<output>.failed`` (with its report) and never under the output name.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import attention
from exporter import backends, checkpoint, recipes
from exporter.errors import ExportFailed, UserError, describe
from exporter.manifest import write_manifest
from exporter.patches import export_patches
from exporter.progress import Progress
from exporter.verification import compare, verify_folder


@dataclass
class ExportRequest:
    """What the user asked for (already parsed from the command line)."""

    model: str
    recipes: list[recipes.Recipe]
    output: Path
    max_seq_len: int | None = None
    force: bool = False


@dataclass
class ExportResult:
    passed: bool
    output: Path
    verification: dict
    rows: list[list] = field(default_factory=list)


def check_output(output: Path, force: bool) -> None:
    """Refuse an existing output without ``force`` and an output folder we cannot write next to."""
    if output.exists() and not force:
        raise UserError(f"output {output} already exists (pass --force to replace it)")
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a folder")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {parent} ({exc.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output folder {parent} is not writable")


def resolve_max_seq_len(request: ExportRequest, model: checkpoint.Checkpoint) -> int:
    """The cache length: ``--max-seq-len``, else the longest recipe default, capped by the model's position limit."""
    limit = model.position_limit
    wanted = request.max_seq_len if request.max_seq_len is not None else max(r.max_seq_len for r in request.recipes)
    if request.max_seq_len is None and limit:
        wanted = min(wanted, int(limit))
    if wanted < 4:
        raise UserError(f"--max-seq-len {wanted} is too small (at least 4)")
    if limit and wanted > int(limit):
        raise UserError(f"--max-seq-len {wanted} exceeds the model's position limit ({limit})")
    return wanted


def remove_stale_staging(output: Path) -> None:
    """Delete staging folders left by killed exports (their process no longer exists)."""
    for folder in output.parent.glob(f".{output.name}.partial-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_export(request: ExportRequest, progress: Progress) -> ExportResult:
    """Run one export job end to end; raises UserError on bad input, returns the (possibly failed) result."""
    output = request.output.resolve()
    check_output(output, request.force)
    remove_stale_staging(output)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with tempfile.TemporaryDirectory(prefix="export-model-") as workdir:
            result = _export_into(request, staging, Path(workdir), progress)
        _publish(staging, output, result.passed)
        result.output = output if result.passed else output.with_name(output.name + ".failed")
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_export_model(source: checkpoint.Checkpoint):
    """The model every recipe of an export starts from: export-safe attention and masks registered and selected,
    MoE experts as gathered batched matmuls (the default grouped_mm is a custom op ExecuTorch cannot run)."""
    return source.load_model(attention.register(), experts_implementation="batched_mm")


def build_artifact(recipe: recipes.Recipe, model, source: checkpoint.Checkpoint, max_seq_len: int, staging: Path,
                   progress: Progress) -> dict:
    """Build ``recipe``'s artifact from ``model`` into ``staging`` (the backend's build under the family's
    capture-time patches); returns the build details. ``model`` must be the recipe's own copy if it is not exact."""
    with export_patches(source.model_type):
        return backends.get(recipe.target).build(recipe, model, source, max_seq_len, staging, progress)


def _export_into(request: ExportRequest, staging: Path, workdir: Path, progress: Progress) -> ExportResult:
    torch.manual_seed(0)
    with progress.stage("load", f"model {request.model}"):
        source = checkpoint.resolve(request.model, workdir)
        max_seq_len = resolve_max_seq_len(request, source)
        model = load_export_model(source)
        progress.note(f"{source.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
                      f"cache length {max_seq_len}")

    artifacts, builds = {}, {}
    for recipe in request.recipes:
        # A recipe that changes the weights (quantization, dtype) works on its own copy: --target all must not
        # hand the ONNX export a model the ExecuTorch recipe quantized.
        recipe_model = model if recipe.exact else copy.deepcopy(model)
        try:
            builds[recipe.target] = build_artifact(recipe, recipe_model, source, max_seq_len, staging, progress)
            artifacts[recipe.target] = backends.get(recipe.target).artifact
        except Exception as exc:  # noqa: BLE001 - any capture/lowering failure is reported on one line
            if os.environ.get("EXPORT_MODEL_DEBUG"):
                raise
            raise ExportFailed(f"{recipe.name}: {describe(exc)} (set EXPORT_MODEL_DEBUG=1 for the traceback)") \
                from None
        finally:
            del recipe_model
    for path in source.tokenizer_files:
        shutil.copy2(path, staging / path.name)
    shutil.copy2(source.folder / "config.json", staging / "config.json")

    del model
    report = verify_folder(staging, artifacts, request.recipes, source, max_seq_len, progress)
    (staging / "verification.json").write_text(json.dumps(report, indent=2) + "\n")

    with progress.stage("write", "manifest and hashes"):
        write_manifest(staging, {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"source": request.model, "kind": source.kind, "model_type": source.model_type,
                      "architectures": getattr(source.config, "architectures", None)},
            "recipes": [r.as_dict() for r in request.recipes],
            "max_seq_len": max_seq_len,
            "artifacts": artifacts,
            "build": builds,
            "verification": {"passed": report["passed"], **{
                name: {"passed": entry["passed"], "stages": {s["stage"]: s["passed"] for s in entry["stages"]}}
                for name, entry in report["artifacts"].items()}},
        })
    rows = _summary_rows(staging, artifacts, report)
    return ExportResult(passed=report["passed"], output=staging, verification=report, rows=rows)


def _summary_rows(staging: Path, artifacts: dict, report: dict) -> list[list]:
    rows = []
    for target, name in artifacts.items():
        entry = report["artifacts"][name]
        size = sum(p.stat().st_size for p in backends.get(target).artifact_files(staging))
        rows.append([name, target, f"{size / 2**20:.1f} MiB", *compare.headline(entry),
                     "passed" if entry["passed"] else "FAILED"])
    return rows


def _publish(staging: Path, output: Path, passed: bool) -> None:
    """Move the complete staging folder into place (replacing an old output only now), or to ``.failed``."""
    target = output if passed else output.with_name(output.name + ".failed")
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
