"""``export-model run DIR --prompt ...``: greedy generation on the exported artifacts, with speed figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from exporter.cli import EXIT_OK, ArgumentParser, fail
from exporter.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="export-model run",
                            description="Generate greedily from an export-model output folder.")
    parser.add_argument("folder", type=Path, help="an output folder written by export-model")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--target", choices=("executorch", "onnx"), help="only this artifact (default: every one)")
    return parser


def generate_with(folder: Path, target: str, name: str, prompt_ids: list[int], max_new_tokens: int,
                  eos_ids: set[int]) -> dict:
    """Greedy tokens and timings: ExecuTorch runtime for a .pte, ONNX Runtime GenAI for an ONNX folder."""
    from exporter.quiet import native_output_captured
    from exporter.runtime import greedy_generate, open_session

    with native_output_captured():
        if target == "onnx" and (folder / "genai_config.json").is_file():
            from exporter.genai import generate_genai

            result = generate_genai(folder, prompt_ids, max_new_tokens)
            result["runtime"] = "onnxruntime-genai"
        else:
            result = greedy_generate(open_session(folder / name), prompt_ids, max_new_tokens, eos_ids)
            result["runtime"] = "executorch" if target == "executorch" else "onnxruntime"
    return result


def cmd_run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from exporter.manifest import check_integrity

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
        eos_ids = _eos_ids(args.folder)
    except UserError as exc:
        return fail(str(exc))
    for target, name in artifacts.items():
        result = generate_with(args.folder, target, name, prompt_ids, args.max_new_tokens, eos_ids)
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
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise UserError(f"{folder}: cannot load its tokenizer ({str(exc).splitlines()[0][:200]})") from None


def _eos_ids(folder: Path) -> set[int]:
    from transformers import AutoConfig

    from exporter.loading import special_ids

    return set(special_ids(AutoConfig.from_pretrained(folder), folder)[1])
