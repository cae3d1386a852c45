"""Memory: what an export will need, what the machine has, and keeping each process to what it still uses.

- ``weight_info(folder)``: parameter count, stored dtypes and the largest tensor, from the safetensors headers (no
  weights are read);
- ``estimate_peak(recipes, info, ...)``: the expected peak resident memory of an export, phase by phase (each
  recipe's build, the eager reference, each artifact's verification), from the factors in ``FACTORS`` (measured by
  ``scripts/scale_bench.py``, see ``docs/scale.md``); ``check_fits`` refuses an export whose estimate exceeds
  ``available_bytes()`` (MemAvailable, or the cgroup's limit) on one line;
- ``lazy_state_dict(folder)``: the checkpoint's tensors read one at a time with ``pread`` (no memory map), for
  loading a bf16 / fp16 checkpoint as fp32 without its mapped file pages staying resident next to the fp32 copy;
- ``release_memory()`` (garbage collection + ``malloc_trim``), ``child_allocator_env()`` (large allocations
  straight from ``mmap``, so freed tensors go back to the system), ``die_with_parent()`` (a build process that
  outlives a killed export stops).
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import UserError

GIB = 2**30
# bytes per element of the safetensors dtypes that hold weights (integer tensors are not weights)
FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
AVAILABLE_ENV = "EXPORT_MODEL_AVAILABLE_MEMORY"  # override what available_bytes() detects (e.g. "6G")
ISOLATE_ENV = "EXPORT_MODEL_ISOLATE"  # "1": every recipe build in its own process, "0": none, unset: by size
ISOLATE_ABOVE = 256 * 2**20  # fp32 weight bytes from which each recipe is built in its own process
MMAP_THRESHOLD = 1 << 20  # allocations from this size come straight from mmap in build processes

# Peak resident memory of each phase = BASE + weights * w + largest * head (+ the reference logits while
# verifying), in units of the checkpoint's fp32 weight bytes ("weights") and of its largest tensor in fp32
# ("largest": the embedding table / lm_head, which quantization unties and quantizes on its own). Keyed by the
# recipe's delegate (``recipe.backend``) and weight scheme; measured with scripts/scale_bench.py on the
# Llama-3.2-1B shape (docs/scale.md). A delegate or scheme not listed takes the largest factors listed.
BASE = int(0.6 * GIB)  # interpreter, torch, transformers, executorch / onnxruntime


@dataclass(frozen=True)
class Factors:
    """(weights, largest tensor) multipliers of one phase of a recipe."""

    build: tuple[float, float]
    verify: tuple[float, float]


FACTORS: dict[tuple[str, str], Factors] = {
    ("xnnpack", "none"): Factors(build=(3.4, 0.0), verify=(2.4, 0.0)),
    ("onnxruntime", "none"): Factors(build=(1.3, 0.0), verify=(2.0, 0.0)),
    ("xnnpack", "8da4w"): Factors(build=(1.1, 2.0), verify=(1.1, 2.0)),
    ("xnnpack", "8da8w"): Factors(build=(1.3, 2.0), verify=(1.3, 2.0)),
    ("onnxruntime", "int4"): Factors(build=(6.0, 0.0), verify=(1.3, 0.0)),
    ("onnxruntime", "int8"): Factors(build=(6.0, 0.0), verify=(1.3, 0.0)),
}
WORST = Factors(build=tuple(max(f.build[i] for f in FACTORS.values()) for i in range(2)),
                verify=tuple(max(f.verify[i] for f in FACTORS.values()) for i in range(2)))


@dataclass(frozen=True)
class WeightInfo:
    """What a checkpoint's weight files hold, from their headers."""

    parameters: int  # floating-point elements (a tied table counted once, as stored)
    stored_bytes: int
    dtypes: tuple[str, ...]  # safetensors dtype names of the floating-point tensors, e.g. ("BF16",)
    largest: int  # elements of the largest tensor
    tensors: int

    @property
    def fp32_bytes(self) -> int:
        """The weights' size as fp32 (what the export and its reference hold)."""
        return self.parameters * 4


def _header(path: Path) -> dict:
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length))


def weight_info(folder: Path) -> WeightInfo:
    """``WeightInfo`` of a save_pretrained folder from its safetensors headers; a ``.bin``-only folder is assumed
    to be fp32 (its size / 4 parameters)."""
    parameters = stored = largest = tensors = 0
    dtypes: set[str] = set()
    files = sorted(Path(folder).glob("*.safetensors"))
    for path in files:
        for name, entry in _header(path).items():
            if name == "__metadata__" or entry["dtype"] not in FLOAT_BYTES:
                continue
            count = math.prod(entry["shape"])
            parameters += count
            stored += count * FLOAT_BYTES[entry["dtype"]]
            largest = max(largest, count)
            tensors += 1
            dtypes.add(entry["dtype"])
    if not files:
        stored = sum(p.stat().st_size for p in Path(folder).glob("*.bin"))
        parameters, largest, dtypes = stored // 4, 0, {"F32"}
    return WeightInfo(parameters, stored, tuple(sorted(dtypes)), largest, tensors)


@dataclass(frozen=True)
class Estimate:
    """The expected peak resident memory of an export and the phase it falls in."""

    peak: int
    phase: str
    phases: dict[str, int] = field(default_factory=dict)


def reference_logit_bytes(recipes, vocab_size: int, positions: int) -> int:
    """What verification keeps of logits over its ``positions`` checked positions: fp32 (and, for exact recipes,
    float64) reference logits, the artifact's own, and a quantized recipe's matched reference."""
    per_position = 4 + 4 + (8 if any(r.exact for r in recipes) else 0) + (4 if not all(r.exact for r in recipes) else 0)
    return positions * vocab_size * per_position


def estimate_peak(recipes, info: WeightInfo, vocab_size: int, positions: int, isolated: bool = True) -> Estimate:
    """The peak resident memory of exporting and verifying ``recipes`` from a checkpoint described by ``info``
    (``positions``: the verification plan's checked positions): the largest phase (see ``FACTORS``).
    ``isolated``: each build runs in its own process beside the parent."""
    weights, largest = info.fp32_bytes, info.largest * 4
    logits = reference_logit_bytes(recipes, vocab_size, positions)
    phases = {"eager reference": int(BASE + weights + (largest if any(r.exact for r in recipes) else 0) + logits)}
    for recipe in recipes:
        factors = FACTORS.get((recipe.backend, recipe.quantization), WORST)
        build = BASE * (2 if isolated else 1) + factors.build[0] * weights + factors.build[1] * largest
        phases[f"build {recipe.name}"] = int(build)
        phases[f"verify {recipe.name}"] = int(BASE + logits + factors.verify[0] * weights
                                              + factors.verify[1] * largest)
    phase = max(phases, key=phases.get)
    return Estimate(phases[phase], phase, phases)


def parse_size(text: str) -> int:
    """``"6G"``, ``"512M"``, ``"1000000"`` -> bytes (binary units)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(float(text))


def available_bytes() -> int | None:
    """Memory a new job can use: ``MemAvailable``, capped by the cgroup's limit minus its usage; None if unknown.
    ``$EXPORT_MODEL_AVAILABLE_MEMORY`` (e.g. ``6G``) overrides the detection."""
    if os.environ.get(AVAILABLE_ENV):
        try:
            return parse_size(os.environ[AVAILABLE_ENV])
        except ValueError:
            raise UserError(f"${AVAILABLE_ENV}={os.environ[AVAILABLE_ENV]!r} is not a size (e.g. 6G)") from None
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            room = max(0, int(limit) - usage)
            available = room if available is None else min(available, room)
    return available


def check_fits(estimate: Estimate, available: int | None, what: str) -> None:
    """Refuse (``UserError``, one line) an export whose estimated peak exceeds the available memory."""
    if available is None or estimate.peak <= available:
        return
    raise UserError(f"{what}: estimated peak memory {estimate.peak / GIB:.1f} GiB ({estimate.phase}) exceeds the "
                    f"{available / GIB:.1f} GiB available; free memory, pick a smaller recipe, or pass "
                    "--force-memory to try anyway")


def isolate(info: WeightInfo) -> bool:
    """Whether each recipe is built in its own process (``$EXPORT_MODEL_ISOLATE`` 1 / 0, else by weight size):
    a process returns everything a lowering left behind when it exits, so the next recipe and the verification
    start from a clean footprint."""
    forced = os.environ.get(ISOLATE_ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    return info.fp32_bytes >= ISOLATE_ABOVE


def rss_bytes() -> int:
    """This process's resident memory now."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _libc():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (``malloc_trim``, glibc only)."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def child_allocator_env() -> dict[str, str]:
    """Environment for a build process: allocations of ``MMAP_THRESHOLD`` or more come from ``mmap`` (glibc), so a
    freed weight-sized tensor is returned to the system at once instead of staying in a fragmented heap."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}


def die_with_parent(parent_pid: int) -> None:
    """Make this process receive SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``), and exit now if the
    parent is already gone: a build must not keep writing into the staging folder of a killed export."""
    libc = _libc()
    if libc is not None:
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


class _CountedSlice:
    """A safetensors slice that calls ``on_read`` once it is read (transformers reads each one with ``[...]``)."""

    __slots__ = ("_slice", "_on_read")

    def __init__(self, source, on_read):
        self._slice, self._on_read = source, on_read

    def __getitem__(self, index):
        tensor = self._slice[index]
        self._on_read()
        return tensor

    def __getattr__(self, name):
        return getattr(self._slice, name)


def lazy_state_dict(folder: Path, on_read=None):
    """``(state dict of lazy slices, close)`` over the folder's safetensors files, read with ``pread``: each tensor
    is read when transformers materializes it (then converted and dropped), and no file pages stay mapped, so
    loading a bf16 checkpoint as fp32 holds the fp32 weights plus one tensor, not also the mapped bf16 file.
    ``on_read()`` is called after each tensor is read (progress)."""
    # safetensors is imported here: only the low-memory load path needs its reader
    from safetensors import safe_open

    handles = [safe_open(str(path), framework="pt", device="cpu", backend="pread")
               for path in sorted(Path(folder).glob("*.safetensors"))]
    state = {}
    for handle in handles:
        for key in handle.keys():
            piece = handle.get_slice(key)
            state[key] = _CountedSlice(piece, on_read) if on_read is not None else piece

    def close():
        state.clear()
        for handle in handles:
            handle.__exit__(None, None, None)

    return state, close
