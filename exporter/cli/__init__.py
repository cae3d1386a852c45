"""``export-model``: the command line. ``export-model [export] ...`` or a subcommand, each in its own module.

Bad input -> one line on stderr and exit 2; failed verification -> exit 1.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from exporter.errors import interrupt
from exporter.cli.common import EXIT_USAGE
from exporter.quiet import quiet_python_libraries

# Subcommand -> "module:function(argv) -> exit code"; `export-model --model ...` means `export-model export ...`.
SUBCOMMANDS = {
    "export": "exporter.cli.export:cmd_export",
    "masks": "exporter.cli.masks:cmd_masks",
    "verify": "exporter.cli.verify:cmd_verify",
    "run": "exporter.cli.run:cmd_run",
    "batch": "exporter.cli.batch:cmd_batch",
    "batch-merge": "exporter.cli.batch_merge:cmd_batch_merge",
    "models": "exporter.cli.models:cmd_models",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``export-model`` console script."""
    if argv is None and os.environ.get("PYTHONHASHSEED") != "0":
        # transformers iterates sets of strings while building some models' graphs (Gemma 3 computes its rotary
        # tables per layer type in set order): a fixed hash seed makes the exported bytes the same on every run
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "exporter.cli", *sys.argv[1:]])
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_python_libraries()
    # SIGTERM unwinds like Ctrl-C (staging folders are removed); both also set a flag checked between stages and
    # before publishing, for the case a native library catches the KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt)
    command, rest = ("export", argv)
    if argv and argv[0] in SUBCOMMANDS:
        command, rest = argv[0], argv[1:]
    module_name, function_name = SUBCOMMANDS[command].split(":")
    # each subcommand's module is imported only when it runs (they pull in torch, transformers, the runtimes)
    handler = getattr(importlib.import_module(module_name), function_name)
    try:
        return handler(rest)
    except SystemExit as exc:  # argparse: --help (0) or a usage error already reported on one line (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print("export-model: interrupted; nothing was written under the output name", file=sys.stderr)
        return 130


