"""Keep library chatter (ExecuTorch C++ logs, runner echo, progress bars, warnings) out of the user's terminal.

The CLI runs each job with file descriptors 1 and 2 captured (``native_output_captured``); its own progress lines
go to ``console()``, a copy of the original stderr taken before, so they are the only lines the user sees.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager


_CONSOLE = None


def console():
    """A text stream on the process's original stderr (a duplicate of fd 2 taken on first use, before any
    capture), for the lines the user should see while library output is captured."""
    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                             errors="replace")
    return _CONSOLE


@contextmanager
def native_output_captured():
    """Redirect file descriptors 1 and 2 to a temporary file for the duration; yields a function returning it.

    Python-level ``sys.stdout``/``sys.stderr`` are flushed first, so only output written by native code is
    captured. Nested use is fine.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: _read(sink)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _read(sink) -> str:
    sink.flush()
    sink.seek(0)
    return sink.read().decode("utf-8", "replace")


def quiet_python_libraries() -> None:
    """Silence import-time warnings and progress bars of torch/torchao/transformers that say nothing about the
    user's export (call before those libraries are imported)."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with native_output_captured():
        import torch  # noqa: F401  (torch and torchao print while importing)

        try:
            import torchao  # noqa: F401
        except ImportError:
            pass
        from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards", "Loading weights" bars
    for name in ("torch", "torch.utils._pytree", "torch.onnx", "torch._dynamo", "torch.export", "torchao",
                 "executorch", "transformers", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
