"""``export-model``: the command line. ``export-model [export] ...`` or a subcommand, each in its own module.

Bad input -> one line on stderr and exit 2; failed verification -> exit 1.
"""

from __future__ import annotations

import importlib
import signal
import sys

from exporter.cli.common import EXIT_USAGE
from exporter.quiet import quiet_python_libraries

# Subcommand -> "module:function(argv) -> exit code"; `export-model --model ...` means `export-model export ...`.
SUBCOMMANDS = {
    "export": "exporter.cli.export:cmd_export",
    "masks": "exporter.cli.masks:cmd_masks",
    "verify": "exporter.cli.verify:cmd_verify",
    "run": "exporter.cli.run:cmd_run",
    "batch": "exporter.cli.batch:cmd_batch",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``export-model`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_python_libraries()
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM unwinds like Ctrl-C: staging folders are removed
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


def _interrupt(signum, frame):
    raise KeyboardInterrupt
