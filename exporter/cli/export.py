"""``export-model --model M --target T --output DIR [...]``: export, verify, write (exit 0 / 1 / 2)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exporter import backends, builtin, recipes
from exporter.cli.common import EXIT_FAILED, EXIT_OK, ArgumentParser, fail
from exporter.errors import ExportFailed, UserError
from exporter.pipeline import ExportRequest, run_export
from exporter.progress import Progress, table
from exporter.quiet import native_output_captured

# command-line option -> (recipe field, type a batch file must give)
OPTIONS = {"group_size": ("group_size", int), "qembedding": ("embedding_quantization", str), "dtype": ("dtype", str),
           "onnx_cache": ("kv_cache", str), "external_weights": ("external_weights", bool)}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="export-model",
        description="Export a Hugging Face causal LM to verified ExecuTorch (.pte) and ONNX artifacts.",
    )
    parser.add_argument("--model", required=True,
                        help="hub id, local save_pretrained folder, .gguf file (or a folder holding one), or "
                             f"builtin:<name> ({', '.join(builtin.names())})")
    parser.add_argument("--gguf-file", help="the GGUF file to read when the --model folder holds several")
    parser.add_argument("--target", choices=(*backends.targets(), "all"),
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
    parser.add_argument("--external-weights", action=argparse.BooleanOptionalAction, default=None,
                        help="ExecuTorch: the weights in model.ptd beside model.pte, each tensor once (a tied "
                             "embedding and lm_head share one copy; the recipes' default), runtimes load both "
                             "files; --no-external-weights: one self-contained .pte (a tied table stored twice)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder once verified")
    parser.add_argument("--force-memory", action="store_true",
                        help="run even when the estimated peak memory exceeds the memory available")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    return parser


def select_recipes(target: str | None, names: list[str]) -> list[recipes.Recipe]:
    """Recipes for the requested targets: one per target, defaults where no --recipe names one."""
    chosen = [recipes.load(name) for name in names]
    by_target = {}
    for recipe in chosen:
        if recipe.target in by_target:
            raise UserError(f"two recipes for target {recipe.target}: {by_target[recipe.target].name}, {recipe.name}")
        by_target[recipe.target] = recipe
    if target is None:
        targets = list(by_target) or list(backends.targets())
    else:
        targets = list(backends.targets()) if target == "all" else [target]
    for recipe in chosen:
        if recipe.target not in targets:
            raise UserError(f"recipe {recipe.name} is for target {recipe.target}, but --target is {target}")
    return [by_target.get(t) or recipes.default_recipe(t) for t in targets]


def apply_overrides(chosen: list[recipes.Recipe], **options) -> list[recipes.Recipe]:
    """Apply the numeric command-line options (``OPTIONS``; None = not given) to the recipes they concern;
    UserError when a value has the wrong type or an option concerns none of the recipes."""
    result = list(chosen)
    for option, value in options.items():
        if value is None:
            continue
        field, kind = OPTIONS[option]
        flag = recipes.FLAGS[field]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise UserError(f"{flag} must be {dict(int='an integer', bool='true or false').get(kind.__name__, 'a string')}"
                            f", got {value!r}")
        concerned = [i for i, recipe in enumerate(result) if recipes.accepts(recipe, field)]
        if not concerned:
            raise UserError(f"{flag} does not apply to the selected recipes ({', '.join(r.name for r in result)})")
        for i in concerned:
            result[i] = recipes.with_overrides(result[i], **{field: value})
    return result


def cmd_export(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_seq_len is not None and args.max_seq_len < 4:
            raise UserError(f"--max-seq-len must be at least 4, got {args.max_seq_len}")
        chosen = apply_overrides(select_recipes(args.target, args.recipe),
                                 **{option: getattr(args, option) for option in OPTIONS})
        request = ExportRequest(model=args.model, recipes=chosen, output=args.output, max_seq_len=args.max_seq_len,
                                force=args.force, gguf_file=args.gguf_file, force_memory=args.force_memory)
        progress = Progress(quiet=args.quiet)
        with native_output_captured():  # library output stays out of the terminal; progress goes to the console
            result = run_export(request, progress)
    except UserError as exc:
        return fail(str(exc))
    except ExportFailed as exc:
        print(f"export-model: export failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print()
    print(table(["stage", "what", "seconds", "peak memory"],
                [[s, w, f"{t:.1f}", f"{m / 2**30:.2f} GiB"] for s, w, t, m in progress.timings]))
    print()
    print(table(["artifact", "target", "size", "max |diff|", "top-1", "verification"], result.rows))
    if result.passed:
        print(f"\nverified artifacts written to {result.output}")
        return EXIT_OK
    print(f"\nverification FAILED; nothing written to {request.output}; report and artifacts in {result.output}",
          file=sys.stderr)
    return EXIT_FAILED
