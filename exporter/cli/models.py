"""``export-model models``: every causal-LM model type transformers knows and how well it is proven here."""

from __future__ import annotations

from collections import Counter

from exporter import tiers
from exporter.cli.common import EXIT_OK, ArgumentParser
from exporter.progress import table


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="export-model models",
                            description="List causal-LM model types by tier: tested, verified, not yet verified.")
    parser.add_argument("--tier", choices=(tiers.TESTED, tiers.VERIFIED, "not-verified"), help="only this tier")
    return parser


def cmd_models(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    wanted = tiers.NOT_VERIFIED if args.tier == "not-verified" else args.tier
    rows = [[t.model_type, t.tier, t.detail[:110]] for t in tiers.all_tiers() if wanted in (None, t.tier)]
    print(table(["model_type", "tier", "detail"], rows))
    counts = Counter(row[1] for row in rows)
    print("\n" + ", ".join(f"{counts[name]} {name}" for name in (tiers.TESTED, tiers.VERIFIED, tiers.NOT_VERIFIED)
                           if counts[name]) + f"; every type is attempted, verification decides "
                                              f"(coverage data: {tiers.TIERS_FILE.name})")
    return EXIT_OK
