"""``export-model``: the command line. Bad input -> one line on stderr and exit 2; failed verification -> exit 1."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Subcommand -> "module:function(argv) -> exit code"; `export-model --model ...` means `export-model export ...`.
SUBCOMMANDS = {
    "export": "exporter.cli:cmd_export",
    "masks": "exporter.mask_view:cmd_masks",
    "verify": "exporter.recheck:cmd_verify",
    "run": "exporter.run:cmd_run",
    "batch": "exporter.batch:cmd_batch",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2), without the usage dump."""

    def error(self, message: str):
        raise SystemExit(fail(f"{message} (see {self.prog} --help)"))


def fail(message: str) -> int:
    """Report a usage/input error on one line; returns exit code 2."""
    print(f"export-model: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def build_parser() -> ArgumentParser:
    from exporter import builtin, recipes

    parser = ArgumentParser(
        prog="export-model",
        description="Export a Hugging Face causal LM to verified ExecuTorch (.pte) and ONNX artifacts.",
    )
    parser.add_argument("--model", required=True,
                        help=f"hub id, local save_pretrained folder, or builtin:<name> ({', '.join(builtin.names())})")
    parser.add_argument("--target", choices=("executorch", "onnx", "all"),
                        help="what to produce (default: the targets of --recipe, else all)")
    parser.add_argument("--recipe", action="append", default=[],
                        help=f"recipe name or .toml path, once per target ({', '.join(recipes.available())})")
    parser.add_argument("--output", required=True, type=Path, help="output folder (must not exist unless --force)")
    parser.add_argument("--max-seq-len", type=int, help="KV cache length = longest prompt + generation (default: recipe)")
    parser.add_argument("--group-size", type=int,
                        help="weights per quantization group for quantized recipes (0 = per channel; default: recipe)")
    parser.add_argument("--qembedding", choices=("4w", "8w"),
                        help="also quantize the token embedding table, weight-only int4 / int8 (ExecuTorch recipes, "
                             "quantized ONNX recipes: a tied lm_head and the embedding then share one table)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"),
                        help="weight, activation and cache dtype; fp16 takes the xnnpack-fp16 / onnx-fp16 "
                             "verification thresholds (bf16: XNNPACK has no bf16 kernels)")
    parser.add_argument("--onnx-cache", choices=("static", "dynamic"),
                        help="ONNX KV cache contract: static shared buffer (default) or dynamic concatenation")
    parser.add_argument("--external-weights", action="store_true", default=None,
                        help="ExecuTorch: write the weights to model.ptd beside model.pte, each tensor once (a tied "
                             "embedding and lm_head share one copy); runtimes load both files")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder once verified")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    return parser


def select_recipes(target: str | None, names: list[str]):
    """Recipes for the requested targets: one per target, defaults where no --recipe names one."""
    from exporter import recipes
    from exporter.errors import UserError

    chosen = [recipes.load(name) for name in names]
    by_target = {}
    for recipe in chosen:
        if recipe.target in by_target:
            raise UserError(f"two recipes for target {recipe.target}: {by_target[recipe.target].name}, {recipe.name}")
        by_target[recipe.target] = recipe
    if target is None:
        targets = list(by_target) or list(recipes.TARGETS)
    else:
        targets = list(recipes.TARGETS) if target == "all" else [target]
    for recipe in chosen:
        if recipe.target not in targets:
            raise UserError(f"recipe {recipe.name} is for target {recipe.target}, but --target is {target}")
    return [by_target.get(t) or recipes.load(recipes.DEFAULT_RECIPES[t]) for t in targets]


def apply_overrides(chosen: list, group_size=None, qembedding=None, dtype=None, onnx_cache=None,
                    external_weights=None) -> list:
    """Apply the numeric command-line options to the recipes they concern; UserError when one concerns none."""
    from exporter import recipes
    from exporter.errors import UserError

    wanted = {"--group-size": (group_size, lambda r: r.quantization != "none", dict(group_size=group_size)),
              "--qembedding": (qembedding, lambda r: r.target == "executorch" or r.quantization != "none",
                               dict(embedding=qembedding)),
              "--dtype": (dtype, lambda r: True, dict(dtype=dtype)),
              "--onnx-cache": (onnx_cache, lambda r: r.target == "onnx", dict(kv_cache=onnx_cache)),
              "--external-weights": (external_weights, lambda r: r.target == "executorch",
                                     dict(external_weights=external_weights))}
    kinds = {"--group-size": int, "--external-weights": bool}
    result = list(chosen)
    for flag, (value, applies, change) in wanted.items():
        if value is None:
            continue
        kind = kinds.get(flag, str)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise UserError(f"{flag} must be {dict(int='an integer', bool='true or false').get(kind.__name__, 'a string')}"
                            f", got {value!r}")
        targets = [i for i, r in enumerate(result) if applies(r)]
        if not targets:
            names = ", ".join(r.name for r in result)
            raise UserError(f"{flag} does not apply to the selected recipes ({names})")
        for i in targets:
            result[i] = recipes.with_overrides(result[i], **change)
    return result


def cmd_export(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from exporter.errors import ExportFailed, UserError
    from exporter.pipeline import ExportRequest, run_export
    from exporter.progress import Progress, table

    try:
        if args.max_seq_len is not None and args.max_seq_len < 4:
            raise UserError(f"--max-seq-len must be at least 4, got {args.max_seq_len}")
        chosen = apply_overrides(select_recipes(args.target, args.recipe), args.group_size, args.qembedding,
                                 args.dtype, args.onnx_cache, args.external_weights)
        request = ExportRequest(model=args.model, recipes=chosen,
                                output=args.output, max_seq_len=args.max_seq_len, force=args.force)
        progress = Progress(quiet=args.quiet)
        result = run_export(request, progress)
    except UserError as exc:
        return fail(str(exc))
    except ExportFailed as exc:
        print(f"export-model: export failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print()
    print(table(["stage", "what", "seconds"], [[s, w, f"{t:.1f}"] for s, w, t in progress.timings]))
    print()
    print(table(["artifact", "target", "size", "max |diff|", "top-1", "verification"], result.rows))
    if result.passed:
        print(f"\nverified artifacts written to {result.output}")
        return EXIT_OK
    print(f"\nverification FAILED; nothing written to {request.output}; report and artifacts in {result.output}",
          file=sys.stderr)
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``export-model`` console script: ``export-model [export] ...`` or a subcommand."""
    from exporter.quiet import quiet_python_libraries

    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_python_libraries()
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM unwinds like Ctrl-C: staging folders are removed
    command, rest = ("export", argv)
    if argv and argv[0] in SUBCOMMANDS:
        command, rest = argv[0], argv[1:]
    module_name, function_name = SUBCOMMANDS[command].split(":")
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


if __name__ == "__main__":
    raise SystemExit(main())
