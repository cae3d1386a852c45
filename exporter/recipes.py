"""Named export recipes: TOML files in ``recipes/``, validated into ``Recipe`` objects."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
TARGETS = ("executorch", "onnx")
DEFAULT_RECIPES = {"executorch": "xnnpack-fp32", "onnx": "onnx-fp32"}
BACKENDS = {"executorch": ("xnnpack",), "onnx": ("onnxruntime",)}
DTYPES = ("float32",)
QUANTIZATIONS = ("none",)


@dataclass(frozen=True)
class Recipe:
    """One export recipe: where the artifact runs, with which numerics, and how it is verified."""

    name: str
    target: str
    backend: str
    dtype: str
    quantization: str
    max_seq_len: int
    max_abs_diff: float
    min_top1_agreement: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def available() -> list[str]:
    """Names of the recipes shipped in ``recipes/``."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def load(name_or_path: str) -> Recipe:
    """Load a recipe by name (``recipes/<name>.toml``) or by path to a TOML file; UserError if unknown or invalid."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        path = RECIPES_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise UserError(f"unknown recipe {name_or_path!r}; choose one of: {', '.join(available())}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe {path}: not valid TOML ({exc})") from None
    return _validate(data, path)


def _validate(data: dict, path: Path) -> Recipe:
    def field(key, kind, table=data):
        if key not in table:
            raise UserError(f"recipe {path}: missing field {key!r}")
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise UserError(f"recipe {path}: field {key!r} must be {kind.__name__}, got {value!r}")
        return value

    def choice(key, options, table=data):
        value = field(key, str, table)
        if value not in options:
            raise UserError(f"recipe {path}: {key} {value!r} is not one of {', '.join(options)}")
        return value

    target = choice("target", TARGETS)
    verify = data.get("verify")
    if not isinstance(verify, dict):
        raise UserError(f"recipe {path}: missing [verify] table")
    recipe = Recipe(
        name=field("name", str),
        target=target,
        backend=choice("backend", BACKENDS[target]),
        dtype=choice("dtype", DTYPES),
        quantization=choice("quantization", QUANTIZATIONS),
        max_seq_len=field("max_seq_len", int),
        max_abs_diff=field("max_abs_diff", float, verify),
        min_top1_agreement=field("min_top1_agreement", float, verify),
    )
    if recipe.max_seq_len < 2:
        raise UserError(f"recipe {path}: max_seq_len must be at least 2")
    if not (0.0 <= recipe.min_top1_agreement <= 1.0) or recipe.max_abs_diff <= 0:
        raise UserError(f"recipe {path}: [verify] thresholds out of range")
    return recipe
