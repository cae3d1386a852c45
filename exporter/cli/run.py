"""``export-model run DIR --prompt ...``: greedy generation on the exported artifacts, with speed figures."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from exporter import backends
from exporter.checkpoint import special_ids
from exporter.cli.common import EXIT_OK, ArgumentParser, fail
from exporter.errors import UserError, first_line
from exporter.manifest import check_integrity
from exporter.quiet import native_output_captured


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="export-model run",
                            description="Generate greedily from an export-model output folder.")
    parser.add_argument("folder", type=Path, help="an output folder written by export-model")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--target", choices=backends.targets(), help="only this artifact (default: every one)")
    return parser


def cmd_run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        manifest = check_integrity(args.folder)
        artifacts = {t: n for t, n in manifest["artifacts"].items() if args.target in (None, t)}
        if not artifacts:
            raise UserError(f"{args.folder} has no {args.target} artifact")
        tokenizer = _tokenizer(args.folder)
        prompt_ids = tokenizer(args.prompt)["input_ids"]
        max_seq_len = int(manifest["max_seq_len"])
        if len(prompt_ids) >= max_seq_len:
            raise UserError(f"the prompt is {len(prompt_ids)} tokens; the cache holds {max_seq_len} "
                            "(export with a larger --max-seq-len)")
        eos_ids = set(special_ids(AutoConfig.from_pretrained(args.folder), args.folder).eos)
    except UserError as exc:
        return fail(str(exc))
    for target, name in artifacts.items():
        with native_output_captured():
            result = backends.get(target).generate(args.folder, prompt_ids, args.max_new_tokens, eos_ids)
        text = tokenizer.decode(result["tokens"], skip_special_tokens=True)
        prefill, decode = result.get("prefill_tokens_per_s"), result.get("decode_tokens_per_s")
        print(f"== {name} ({result['runtime']}): {len(prompt_ids)} prompt tokens, "
              f"{len(result['tokens'])} generated")
        print(args.prompt + text)
        print(f"prefill {prefill:.1f} tokens/s, decode {decode:.1f} tokens/s" if prefill and decode
              else "prefill/decode speed: too few tokens to measure")
    return EXIT_OK


def _tokenizer(folder: Path):
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure: one line for the user
        raise UserError(f"{folder}: cannot load its tokenizer ({first_line(exc, 200)})") from None
