"""Which model families this tool exports and verifies (each one has a built-in tiny model tested end to end)."""

from __future__ import annotations

from exporter.builtin import BUILTIN_CONFIGS

# model_type -> built-in tiny model that proves it in the test suite.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    model_type: name for name, (model_type, _) in BUILTIN_CONFIGS.items()
}


def is_supported(model_type: str) -> bool:
    return model_type in SUPPORTED_MODEL_TYPES


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_MODEL_TYPES))
