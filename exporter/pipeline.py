"""One export job: load -> wrap -> capture -> lower -> verify -> write, into a staging folder moved into place
only when every artifact passed verification.

Output folder: ``model.pte`` and/or ``model.onnx`` (+ ``model.onnx.data``, ``genai_config.json``), the tokenizer
files, ``config.json``, ``verification.json`` and ``manifest.json``. A failed verification leaves the folder at
``<output>.failed`` (with its report) and never under the output name.

Memory: before any work, the export's peak is estimated (``exporter.memory``) and refused, on one line, when it
exceeds the available memory (``force_memory`` overrides). Each recipe's build starts from its own fresh load of
the checkpoint (no copies of a shared model); for large checkpoints (``memory.isolate``) each build runs in a process
of its own (``build_worker``), which returns all the lowering's memory when it exits, so builds and verification
never hold each other's copies. Such a process dies with the export (SIGKILL included) and reports its stages,
with their peak memory, back to the export's progress and manifest.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import attention
from exporter import backends, checkpoint, memory, recipes, tiers
from exporter.errors import ExportFailed, UserError, check_interrupted, describe
from exporter.manifest import write_manifest
from exporter.patches import export_patches
from exporter.progress import Progress
from exporter.quiet import native_output_captured
from exporter.verification import compare, verify_folder
from exporter.verification.plan import default_plan


@dataclass
class ExportRequest:
    """What the user asked for (already parsed from the command line)."""

    model: str
    recipes: list[recipes.Recipe]
    output: Path
    max_seq_len: int | None = None
    force: bool = False
    gguf_file: str | None = None  # which GGUF file of a --model folder holding several
    force_memory: bool = False  # run even when the estimated peak memory exceeds what is available


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
    checkpoint.precheck(request.model, request.gguf_file)  # bad local input: refused before any work
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


def load_export_model(source: checkpoint.Checkpoint, on_tensor=None):
    """The model every recipe of an export starts from: export-safe attention and masks registered and selected,
    MoE experts as gathered batched matmuls (the default grouped_mm is a custom op ExecuTorch cannot run).
    ``on_tensor``: progress callback of ``Checkpoint.load_model``."""
    return source.load_model(attention.register(), experts_implementation="batched_mm", on_tensor=on_tensor)


def _load_for_build(source: checkpoint.Checkpoint, recipe: recipes.Recipe, progress: Progress):
    """``load_export_model`` as a progress stage (counting tensors when they are read one by one)."""
    info = memory.weight_info(source.folder)
    counted = bool(set(info.dtypes) - {"F32"}) and info.tensors  # bf16 / fp16 weights: read tensor by tensor
    with progress.stage("load", f"weights for {recipe.name} (fp32)", total=counted or None,
                        announce_after=2.0) as stage:
        return load_export_model(source, on_tensor=(lambda: stage.advance()) if counted else None)


def build_artifact(recipe: recipes.Recipe, model, source: checkpoint.Checkpoint, max_seq_len: int, staging: Path,
                   progress: Progress) -> dict:
    """Build ``recipe``'s artifact from ``model`` into ``staging`` (the backend's build under the family's
    capture-time patches); returns the build details. ``model`` must be the recipe's own copy if it is not exact."""
    with export_patches(source.model_type), progress.track("quantize", quantized_linears(model)):
        return backends.get(recipe.target).build(recipe, model, source, max_seq_len, staging, progress)


def quantized_linears(model):
    """A progress probe: ``() -> (Linear layers of model whose weight is no longer a plain tensor, all of them)``
    (quantization that swaps the eager model's weights one layer at a time shows its count)."""
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]

    def probe() -> tuple[int, int]:
        return sum(type(m.weight) not in (torch.Tensor, torch.nn.Parameter) for m in linears), len(linears)

    return probe


def _build(recipe: recipes.Recipe, model, source: checkpoint.Checkpoint, max_seq_len: int, staging: Path,
           progress: Progress) -> dict:
    try:
        return build_artifact(recipe, model, source, max_seq_len, staging, progress)
    except Exception as exc:  # noqa: BLE001 - any capture/lowering failure is reported on one line
        if os.environ.get("EXPORT_MODEL_DEBUG"):
            raise
        raise ExportFailed(f"{recipe.name}: {describe(exc)} (set EXPORT_MODEL_DEBUG=1 for the traceback)") from None


# The build process: quiet the libraries before they load, then build_worker(job file).
WORKER = ("from exporter.quiet import quiet_python_libraries; quiet_python_libraries(); import sys; "
          "from exporter.pipeline import build_worker; sys.exit(build_worker(sys.argv[1]))")


def _build_isolated(recipe: recipes.Recipe, source: checkpoint.Checkpoint, max_seq_len: int, staging: Path,
                    workdir: Path, progress: Progress) -> dict:
    """Build ``recipe`` in a process of its own (``build_worker``); its stages join ``progress``, their peak memory
    counted for both processes (this one waits meanwhile, holding what it holds now)."""
    job = workdir / f"build-{recipe.target}.pickle"
    result = job.with_suffix(".json")
    console = _fileno(progress.stream)
    job.write_bytes(pickle.dumps({"recipe": recipe, "checkpoint": source, "max_seq_len": max_seq_len,
                                  "staging": staging, "result": result, "parent": os.getpid(), "console": console,
                                  "quiet": progress.quiet or console is None,
                                  "rss_offset": memory.rss_bytes() + progress.rss_offset}))
    process = subprocess.Popen([sys.executable, "-c", WORKER, str(job)], env={**os.environ,
                               **memory.child_allocator_env()}, pass_fds=() if console is None else (console,))
    try:
        code = process.wait()
    except BaseException:  # interrupted: stop the build before the staging folder is removed
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    outcome = json.loads(result.read_text()) if result.is_file() else {}
    progress.timings.extend(tuple(timing) for timing in outcome.get("timings", []))  # peaks: both processes
    if "details" in outcome:
        return outcome["details"]
    if outcome.get("kind") == "UserError":
        raise UserError(outcome["message"])
    if "message" in outcome:
        raise ExportFailed(f"{recipe.name}: {outcome['message']} (set EXPORT_MODEL_DEBUG=1 for the traceback)")
    if code == 130 or code == -signal.SIGINT:
        raise KeyboardInterrupt
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    raise ExportFailed(f"{recipe.name}: the build process {how}"
                       + (" (out of memory?)" if code == -signal.SIGKILL else ""))


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def build_worker(job_path: str) -> int:
    """Entry point of a build process (``_build_isolated``): load the checkpoint, build one recipe into the
    staging folder, write the build details (or the error) and the stage timings to the job's result file."""
    job = pickle.loads(Path(job_path).read_bytes())
    memory.die_with_parent(job["parent"])
    stream = os.fdopen(job["console"], "w", buffering=1, errors="replace") if job["console"] is not None else None
    progress = Progress(stream=stream or open(os.devnull, "w"), quiet=job["quiet"], rss_offset=job["rss_offset"])
    recipe, source = job["recipe"], job["checkpoint"]
    torch.manual_seed(0)
    outcome: dict = {}
    try:
        with native_output_captured():
            model = _load_for_build(source, recipe, progress)
            outcome["details"] = build_artifact(recipe, model, source, job["max_seq_len"], job["staging"], progress)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        outcome = {"kind": "UserError", "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported by the export on one line
        outcome = {"kind": type(exc).__name__, "message": describe(exc)}
        if os.environ.get("EXPORT_MODEL_DEBUG"):
            traceback.print_exc(file=progress.stream)
    outcome["timings"] = progress.timings
    Path(job["result"]).write_text(json.dumps(outcome))
    return 0 if "details" in outcome else 1


def _export_into(request: ExportRequest, staging: Path, workdir: Path, progress: Progress) -> ExportResult:
    torch.manual_seed(0)
    with progress.stage("load", f"model {request.model}", announce_after=2.0):  # a bad checkpoint fails at once
        source = checkpoint.resolve(request.model, workdir, request.gguf_file)
        max_seq_len = resolve_max_seq_len(request, source)
        info = memory.weight_info(source.folder)
        isolated = memory.isolate(info)
        positions = sum(case.length for case in default_plan(max_seq_len, source.smallest_window).cases)
        estimate = memory.estimate_peak(request.recipes, info, source.vocab_size, positions, isolated)
        if not request.force_memory:  # before any work or progress line: refused on one line
            memory.check_fits(estimate, memory.available_bytes(), f"--model {request.model}")
        progress.note(tiers.tier_of(source.model_type).sentence()
                      + (f"; text decoder of the composite {source.composite.name}" if source.composite else ""))
        progress.note(f"{source.model_type}, {info.parameters / 1e6:.2f} M parameters "
                      f"({'/'.join(info.dtypes).lower()}, {info.fp32_bytes / 2**30:.2f} GiB as fp32), cache length "
                      f"{max_seq_len}; estimated peak memory {estimate.peak / 2**30:.1f} GiB ({estimate.phase})"
                      + ("; each recipe is built in a process of its own" if isolated else ""))

    artifacts, builds = {}, {}
    shared = None  # in-process: the exact recipes' model, loaded once (a recipe that changes weights loads its own)
    try:
        for index, recipe in enumerate(request.recipes):
            if isolated:
                builds[recipe.target] = _build_isolated(recipe, source, max_seq_len, staging, workdir, progress)
            else:
                model = shared if recipe.exact and shared is not None else _load_for_build(source, recipe, progress)
                later_exact = any(r.exact for r in request.recipes[index + 1:])
                shared = model if recipe.exact and later_exact else None
                builds[recipe.target] = _build(recipe, model, source, max_seq_len, staging, progress)
                model = None
                memory.release_memory()
            artifacts[recipe.target] = backends.get(recipe.target).artifact
    finally:
        shared = model = None
        memory.release_memory()
    for path in source.tokenizer_files:
        shutil.copy2(path, staging / path.name)
    shutil.copy2(source.folder / "config.json", staging / "config.json")

    report = verify_folder(staging, artifacts, request.recipes, source, max_seq_len, progress)
    (staging / "verification.json").write_text(json.dumps(report, indent=2) + "\n")

    with progress.stage("write", "manifest and hashes"):
        write_manifest(staging, {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"source": request.model, "kind": source.kind, "model_type": source.model_type,
                      "architectures": getattr(source.config, "architectures", None),
                      **({"gguf_file": request.gguf_file} if request.gguf_file else {}),
                      **({"composite": source.composite_description()} if source.composite else {}),
                      **({"source_files": source.source_files} if source.source_files else {})},
            "recipes": [r.as_dict() for r in request.recipes],
            "max_seq_len": max_seq_len,
            "artifacts": artifacts,
            "build": builds,
            "stages": progress.stage_records(),
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
    check_interrupted()  # an interrupt some library swallowed still stops the export here
    target = output if passed else output.with_name(output.name + ".failed")
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
