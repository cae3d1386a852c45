"""Stage-by-stage progress (load, quantize, capture, lower, verify, write) with timings and peak memory.

Each stage prints a start line and a closing line with its time and its peak resident memory. A stage that runs
long prints a heartbeat: in a terminal one line updated in place, in a log (CI) a plain line every
``LOG_INTERVAL`` seconds; a stage that counts its steps (``Stage.advance``) shows ``done/total`` and an estimate of
the time left, and every heartbeat shows the memory in use. A stage opened by code that cannot count for itself
(a backend's quantization) can be counted from outside: ``Progress.track(stage, probe)`` registers a
``probe() -> (done, total)`` consulted while a stage of that name runs. Peak memory is measured per stage: Linux's
high-water mark is reset when a stage starts (``/proc/self/clear_refs``), so each figure is that stage's own peak.
"""

from __future__ import annotations

import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from exporter.errors import check_interrupted
from exporter.memory import rss_bytes
from exporter.quiet import console

LOG_INTERVAL = 30.0  # seconds between heartbeat lines in a log
TERMINAL_INTERVAL = 1.0  # seconds between in-place updates in a terminal
CLEAR_REFS, STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Restart the process's peak-RSS counter (True if the platform allows it)."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident memory since the last reset (or since it started)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stage:
    """A running stage: ``advance()`` counts steps of a known ``total`` for the heartbeat's estimate; ``probe``
    (from ``Progress.track``), when set and the stage counts nothing itself, supplies ``(done, total)``."""

    def __init__(self, total: int | None, probe=None):
        self.total, self.done, self.started = total, 0, time.perf_counter()
        self.detail = ""
        self.probe = probe

    def advance(self, steps: int = 1, detail: str = "") -> None:
        """Count ``steps`` more steps done (``detail``: what is being done now, shown after the count)."""
        self.done += steps
        self.detail = detail

    def counts(self) -> tuple[int, int | None]:
        """``(done, total)``: the stage's own count, else its probe's once it has counted anything."""
        if self.total is None and self.probe is not None:
            try:
                done, total = self.probe()
            except Exception:  # noqa: BLE001 - a probe must never break the stage it watches
                return self.done, None
            if done:
                return done, total
        return self.done, self.total

    def status(self) -> str:
        """Elapsed time, ``done/total`` with an estimate of the time left, the detail, the memory in use."""
        elapsed = time.perf_counter() - self.started
        text = f"{elapsed:.0f} s"
        done, total = self.counts()
        if total:
            text += f", {done}/{total}"
            if 0 < done < total:
                text += f", about {elapsed / done * (total - done):.0f} s left"
        return text + (f", {self.detail}" if self.detail else "") + f", memory {rss_bytes() / 2**30:.1f} GiB"


class Progress:
    """Prints ``[stage] what ...`` lines and keeps ``(stage, what, seconds, peak RSS bytes)`` for the summary and
    the manifest."""

    def __init__(self, stream=None, quiet: bool = False, rss_offset: int = 0):
        self.stream = stream or console()
        self.quiet = quiet
        self.rss_offset = rss_offset  # resident memory of the export's other processes, counted in each peak
        self.timings: list[tuple[str, str, float, int]] = []
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.probes: dict[str, object] = {}
        self._inner_peaks: list[int] = []  # per open stage: the largest peak of the stages run inside it

    @contextmanager
    def track(self, stage: str, probe):
        """While active, stages named ``stage`` without a count of their own show ``probe() -> (done, total)``."""
        self.probes[stage] = probe
        try:
            yield
        finally:
            self.probes.pop(stage, None)

    def note(self, message: str) -> None:
        """An indented line under the current stage (nothing when quiet)."""
        if not self.quiet:
            self._line(f"        {message}")

    def _line(self, text: str, end: str = "\n") -> None:
        print(("\r\033[K" if self.terminal else "") + text, end=end, file=self.stream, flush=True)

    @contextmanager
    def stage(self, stage: str, what: str, total: int | None = None, announce_after: float = 0.0):
        """A stage. ``total``: steps it will ``advance`` through; ``announce_after``: print its lines only once it
        has run this long (a stage that fails at once on bad input then leaves the error as the only line)."""
        label = f"[{stage:>7}] {what}"
        state = Stage(total, self.probes.get(stage))
        announced = threading.Event()
        finished = threading.Event()

        def announce():
            if not self.quiet:
                self._line(f"{label} ...")
            announced.set()

        def heartbeat():
            if announce_after:
                if finished.wait(announce_after):
                    return
                announce()
            interval = TERMINAL_INTERVAL if self.terminal else LOG_INTERVAL
            while not finished.wait(interval):
                if not self.quiet:
                    self._line(f"{label} ... {state.status()}", end="" if self.terminal else "\n")

        reset_peak_rss()  # a stage inside this one resets it again: its peak is folded in when it ends
        self._inner_peaks.append(0)
        if not announce_after:
            announce()
        thread = threading.Thread(target=heartbeat, daemon=True)
        thread.start()
        status = "failed"
        try:
            yield state
            status = "done"
        finally:
            finished.set()
            thread.join()
            check_interrupted()
            elapsed = time.perf_counter() - state.started
            peak = max(peak_rss_bytes() + self.rss_offset, self._inner_peaks.pop())
            if self._inner_peaks:
                self._inner_peaks[-1] = max(self._inner_peaks[-1], peak)
            self.timings.append((stage, what, elapsed, peak))
            if announced.is_set() and not self.quiet:
                self._line(f"{label}: {status} in {elapsed:.1f} s, peak memory {peak / 2**30:.2f} GiB")

    def stage_records(self) -> list[dict]:
        """The stages as manifest entries."""
        return [{"stage": stage, "what": what, "seconds": round(seconds, 1), "peak_rss_mib": round(peak / 2**20)}
                for stage, what, seconds, peak in self.timings]


def table(headers: list[str], rows: list[list]) -> str:
    """A plain aligned text table."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
