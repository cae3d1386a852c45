"""What every subcommand shares: exit codes, one-line usage errors, the argument parser that reports them."""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2), without the usage dump."""

    def error(self, message: str):
        raise SystemExit(fail(f"{message} (see {self.prog} --help)"))


def fail(message: str) -> int:
    """Report a usage/input error on one line of stderr; returns exit code 2."""
    print(f"export-model: error: {message}", file=sys.stderr)
    return EXIT_USAGE
