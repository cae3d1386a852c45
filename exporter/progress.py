"""Stage-by-stage progress on stderr (load, capture, lower, verify, write) with timings."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Progress:
    """Prints ``[stage] what ... 1.23 s`` lines and keeps the timings for the summary."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.timings: list[tuple[str, str, float]] = []

    def note(self, message: str) -> None:
        if not self.quiet:
            print(f"        {message}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, stage: str, what: str):
        if not self.quiet:
            print(f"[{stage:>7}] {what} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        status = "failed"
        try:
            yield
            status = "done"
        finally:
            elapsed = time.perf_counter() - start
            self.timings.append((stage, what, elapsed))
            if not self.quiet:
                print(f"[{stage:>7}] {what}: {status} in {elapsed:.1f} s", file=self.stream, flush=True)


def table(headers: list[str], rows: list[list]) -> str:
    """A plain aligned text table."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
