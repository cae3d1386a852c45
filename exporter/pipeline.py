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
import masks
from exporter import checks, loading, recipes, verify
from exporter.errors import ExportFailed, UserError
from exporter.manifest import write_manifest
from exporter.patches import export_patches
from exporter.progress import Progress
from exporter.quiet import native_output_captured

ATTN_IMPLEMENTATION = "export_safe"


def _build_executorch(*args):
    from exporter.executorch_artifact import build_executorch

    return build_executorch(*args)


def _build_onnx(*args):
    from exporter.onnx_artifact import build_onnx

    return build_onnx(*args)


# target -> builder(recipe, model, config, max_seq_len, ids, staging, progress) -> (file name, build details)
BUILDERS = {"executorch": _build_executorch, "onnx": _build_onnx}


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


def use_export_safe_attention() -> str:
    """Register this project's masks and attention under one implementation name and return the name."""
    masks.register(ATTN_IMPLEMENTATION)
    attention.register(ATTN_IMPLEMENTATION)
    return ATTN_IMPLEMENTATION


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


def resolve_max_seq_len(request: ExportRequest, config) -> int:
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
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


def _export_into(request: ExportRequest, staging: Path, workdir: Path, progress: Progress) -> ExportResult:
    torch.manual_seed(0)
    with progress.stage("load", f"model {request.model}"):
        model_dir, source_kind = loading.resolve_model_dir(request.model, workdir)
        config = loading.read_config(model_dir)
        max_seq_len = resolve_max_seq_len(request, config)
        # MoE experts as gathered batched matmuls: the default grouped_mm is a custom op ExecuTorch cannot run.
        model = loading.load_model(model_dir, use_export_safe_attention(), experts_implementation="batched_mm")
        ids = loading.special_ids(config, model_dir)
        progress.note(f"{config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
                      f"cache length {max_seq_len}")

    artifacts, builds = {}, {}
    for recipe in request.recipes:
        # A recipe that changes the weights (quantization, dtype) works on its own copy: --target all must not
        # hand the ONNX export a model the ExecuTorch recipe quantized.
        recipe_model = model if recipe.exact else copy.deepcopy(model)
        try:
            with export_patches(config.model_type):
                artifacts[recipe.target], builds[recipe.target] = BUILDERS[recipe.target](
                    recipe, recipe_model, config, max_seq_len, ids, staging, progress)
        except Exception as exc:
            if os.environ.get("EXPORT_MODEL_DEBUG"):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ExportFailed(f"{recipe.name}: {type(exc).__name__}: {first} "
                               "(set EXPORT_MODEL_DEBUG=1 for the traceback)") from None
        finally:
            del recipe_model
    for path in loading.tokenizer_files(model_dir):
        shutil.copy2(path, staging / path.name)
    shutil.copy2(model_dir / "config.json", staging / "config.json")

    del model
    report = checks.verify_folder(staging, artifacts, request.recipes, model_dir, config, max_seq_len, progress)
    (staging / "verification.json").write_text(json.dumps(report, indent=2) + "\n")

    with progress.stage("write", "manifest and hashes"):
        write_manifest(staging, {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"source": request.model, "kind": source_kind, "model_type": config.model_type,
                      "architectures": getattr(config, "architectures", None)},
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
    from exporter.runtime import executorch_data_file

    rows = []
    for target, name in artifacts.items():
        entry = report["artifacts"][name]
        data = executorch_data_file(staging / name) if name.endswith(".pte") else None
        size = sum(p.stat().st_size for p in [*staging.glob(name + "*"), *([data] if data else [])])
        rows.append([name, target, f"{size / 2**20:.1f} MiB", *verify.headline(entry),
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
