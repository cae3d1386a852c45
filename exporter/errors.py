"""The two exception types the CLI reports on one line, the one helper that makes that line, and the interrupt
flag (a Ctrl-C / SIGTERM is never lost: native code that swallows the KeyboardInterrupt still leaves the flag)."""

import threading

INTERRUPTED = threading.Event()


def interrupt(signum=None, frame=None):
    """Signal handler for SIGINT / SIGTERM: set the flag, then unwind like Ctrl-C."""
    INTERRUPTED.set()
    raise KeyboardInterrupt


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if an interrupt arrived (even one some library caught and dropped)."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


class UserError(Exception):
    """Bad input from the user (model, recipe, flags, files). The message is shown as is, on one line; exit 2."""


class ExportFailed(Exception):
    """Capture or lowering failed for a model that was accepted: reported on one line, exit code 1."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def describe(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: first line"`` of ``exc``, for reports that keep the exception type."""
    return f"{type(exc).__name__}: {first_line(exc, limit)}"
