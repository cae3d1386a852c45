"""How well each causal-LM model type is proven, for the CLI to say up front (every type is attempted; the
verification decides):

- ``tested``: a built-in tiny model of the type is exported to both targets and verified by the test suite;
- ``verified``: the coverage run (``scripts/coverage.py``) exported and verified a tiny model of the type on both
  targets, with the run's date and the fingerprint of the sources that did it;
- ``not yet verified``: anything else transformers maps as a causal LM (including types the coverage run saw fail,
  with its reason).

The coverage run's results live in ``exporter/model_tiers.json`` (written by ``scripts/coverage.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from exporter.builtin import BUILTIN_CONFIGS

TIERS_FILE = Path(__file__).with_name("model_tiers.json")
TESTED, VERIFIED, NOT_VERIFIED = "tested", "verified", "not yet verified"


@dataclass(frozen=True)
class Tier:
    model_type: str
    tier: str
    detail: str

    def sentence(self) -> str:
        return f"{self.model_type}: {self.tier} ({self.detail})"


def coverage_results() -> dict:
    """``{model_type: {"executorch": status, "onnx": status, "date", "sources", "note"}}`` of the last coverage
    run, or {} when the file is missing."""
    if not TIERS_FILE.is_file():
        return {}
    return json.loads(TIERS_FILE.read_text()).get("model_types", {})


def builtin_of(model_type: str) -> str | None:
    """The built-in whose model (or whose composite model's text decoder) is of ``model_type``."""
    for name, (builtin_type, _) in BUILTIN_CONFIGS.items():
        if builtin_type == model_type:
            return name
    return None


def tier_of(model_type: str, results: dict | None = None) -> Tier:
    """The tier of ``model_type`` (see the module notes)."""
    name = builtin_of(model_type)
    if name is not None:
        return Tier(model_type, TESTED, f"built-in {name} is exported and verified by the test suite")
    entry = (coverage_results() if results is None else results).get(model_type)
    if entry and all(entry.get(target) == VERIFIED for target in ("executorch", "onnx")):
        return Tier(model_type, VERIFIED, f"coverage run of {entry.get('date', '?')}, sources "
                                          f"{entry.get('sources', '?')}: both targets verified")
    if entry:
        statuses = ", ".join(f"{target} {entry.get(target, '?')}" for target in ("executorch", "onnx"))
        note = f"; {entry['note']}" if entry.get("note") else ""
        return Tier(model_type, NOT_VERIFIED, f"coverage run of {entry.get('date', '?')}: {statuses}{note}")
    return Tier(model_type, NOT_VERIFIED, "not in the coverage run; verification decides")


def all_tiers() -> list[Tier]:
    """Every causal-LM model type transformers knows, with its tier."""
    results = coverage_results()
    return [tier_of(model_type, results) for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)]
