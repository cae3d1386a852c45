"""Named export recipes: TOML files in ``recipes/``, validated into ``Recipe`` objects.

A recipe says where an artifact runs (target, backend), with which numerics (dtype, weight quantization, group
size, embedding quantization, attention kernel, ONNX cache contract, ONNX graph fusions, ExecuTorch weights in a
separate ``model.ptd``) and how it is verified (``exporter.verification.compare``):
- ``[verify]`` of an exact (fp32, unquantized) recipe: against a float64 forward of the checkpoint,
  ``max_error_ratio`` (the artifact's max logit error in units of eager fp32's own error) and ``floor_ulps`` (added,
  in ulps of the largest logit), ``min_top1_agreement`` on margin-safe positions;
- ``[verify]`` of a quantized / reduced-precision recipe: against the *matched* eager reference (the eager model
  quantized / cast the same way): ``max_abs_diff`` and/or ``max_rel_diff`` (max abs diff over the largest reference
  logit) and ``min_top1_agreement``, teacher-forced;
- ``[verify.fp32]`` (quantized / reduced-precision recipes only): against the fp32 eager model,
  ``min_top1_agreement`` (pooled over all positions) and ``max_mean_kl`` (mean KL(fp32 || artifact) per stage, nats).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from exporter import backends
from exporter.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                 "bf16": "bfloat16", "bfloat16": "bfloat16"}
# recipe field -> the command-line flag that overrides it
FLAGS = {"group_size": "--group-size", "embedding_quantization": "--qembedding", "dtype": "--dtype",
         "kv_cache": "--onnx-cache", "external_weights": "--external-weights"}


@dataclass(frozen=True)
class Recipe:
    """One export recipe: where the artifact runs, with which numerics, and how it is verified."""

    name: str
    target: str
    backend: str
    dtype: str
    quantization: str
    max_seq_len: int
    min_top1_agreement: float
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    max_error_ratio: float | None = None
    floor_ulps: float | None = None
    group_size: int = 0
    embedding_quantization: str = "none"
    attention: str = "export_safe"
    kv_cache: str = "static"
    ort_fusions: str = "none"
    external_weights: bool = False
    fp32_min_top1_agreement: float | None = None
    fp32_max_mean_kl: float | None = None

    @property
    def exact(self) -> bool:
        """True when the artifact should reproduce fp32 eager up to rounding (no quantization, fp32)."""
        return self.quantization == "none" and self.embedding_quantization == "none" and self.dtype == "float32"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    return _validate(data, str(path))


def _validate(data: dict, where: str) -> Recipe:
    def field(key, kind, table=data, default=dataclasses.MISSING):
        if key not in table:
            if default is not dataclasses.MISSING:
                return default
            raise UserError(f"recipe {where}: missing field {key!r}")
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise UserError(f"recipe {where}: field {key!r} must be {kind.__name__}, got {value!r}")
        return value

    target = field("target", str)
    if target not in backends.targets():
        raise UserError(f"recipe {where}: target {target!r} is not one of {', '.join(backends.targets())}")
    backend = backends.get(target)

    def choice(key, kind=str, required=False):
        options = backend.options[key]
        value = field(key, kind, default=dataclasses.MISSING if required else options[0])
        if value not in options:
            shown = ", ".join(str(o).lower() if isinstance(o, bool) else o for o in options)
            raise UserError(f"recipe {where}: {key} {value!r} is not one of {shown}")
        return value

    verify = data.get("verify")
    if not isinstance(verify, dict):
        raise UserError(f"recipe {where}: missing [verify] table")
    fp32 = verify.get("fp32", {})
    if not isinstance(fp32, dict):
        raise UserError(f"recipe {where}: [verify.fp32] must be a table")
    quantization = choice("quantization", required=True)
    recipe = Recipe(
        name=field("name", str),
        target=target,
        backend=choice("backend", required=True),
        dtype=choice("dtype", required=True),
        quantization=quantization,
        max_seq_len=field("max_seq_len", int),
        group_size=field("group_size", int, default=backend.default_group_size[quantization]),
        embedding_quantization=choice("embedding_quantization"),
        attention=choice("attention"),
        kv_cache=choice("kv_cache"),
        ort_fusions=choice("ort_fusions"),
        external_weights=choice("external_weights", bool),
        max_abs_diff=field("max_abs_diff", float, verify, default=None),
        max_rel_diff=field("max_rel_diff", float, verify, default=None),
        max_error_ratio=field("max_error_ratio", float, verify, default=None),
        floor_ulps=field("floor_ulps", float, verify, default=None),
        min_top1_agreement=field("min_top1_agreement", float, verify),
        fp32_min_top1_agreement=field("min_top1_agreement", float, fp32, default=None),
        fp32_max_mean_kl=field("max_mean_kl", float, fp32, default=None),
    )
    return check(recipe, where)


def check(recipe: Recipe, where: str) -> Recipe:
    """The one recipe validator: cross-field rules, then the target's own (``Backend.check_recipe``); also applied
    after command-line overrides. Returns ``recipe`` or raises UserError."""
    if recipe.max_seq_len < 2:
        raise UserError(f"recipe {where}: max_seq_len must be at least 2")
    if recipe.exact and (recipe.max_error_ratio is None or recipe.floor_ulps is None):
        raise UserError(f"recipe {where}: [verify] of an fp32 recipe needs max_error_ratio and floor_ulps "
                        "(the allowance against the float64 reference)")
    if not recipe.exact and recipe.max_abs_diff is None and recipe.max_rel_diff is None:
        raise UserError(f"recipe {where}: [verify] of a quantized or reduced-precision recipe needs max_abs_diff or "
                        "max_rel_diff (against the matched reference)")
    for value in (recipe.min_top1_agreement, recipe.fp32_min_top1_agreement):
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"recipe {where}: [verify] thresholds out of range")
    for value in (recipe.max_abs_diff, recipe.max_rel_diff, recipe.fp32_max_mean_kl, recipe.max_error_ratio):
        if value is not None and value <= 0:
            raise UserError(f"recipe {where}: [verify] thresholds out of range")
    if recipe.group_size < 0:
        raise UserError(f"recipe {where}: group size must be 0 (per channel) or positive, got {recipe.group_size}")
    if recipe.dtype != "float32" and (recipe.quantization != "none" or recipe.embedding_quantization != "none"):
        raise UserError(f"recipe {where}: quantized weights with {recipe.dtype} activations are not supported "
                        "(no matched reference reproduces the kernels' rounding); use float32 with quantization")
    if not recipe.exact and (recipe.fp32_min_top1_agreement is None or recipe.fp32_max_mean_kl is None):
        raise UserError(f"recipe {where}: a quantized or reduced-precision recipe needs [verify.fp32] "
                        "min_top1_agreement and max_mean_kl")
    backends.get(recipe.target).check_recipe(recipe, where)
    return recipe


def default_recipe(target: str) -> Recipe:
    """The recipe ``--target`` uses when no ``--recipe`` names one."""
    return load(backends.get(target).default_recipe)


def accepts(recipe: Recipe, field: str) -> bool:
    """Whether overriding ``field`` means anything for ``recipe`` (see ``Backend.accepts``)."""
    if field == "group_size":
        return recipe.quantization != "none"
    return backends.get(recipe.target).accepts(field, recipe)


def with_overrides(recipe: Recipe, **changes) -> Recipe:
    """``recipe`` with command-line overrides (recipe field -> value; None = not given) applied and re-validated;
    UserError naming the flag when a value is not one the target offers.

    A ``dtype`` change of an unquantized recipe takes the shipped recipe for that dtype (its verification
    thresholds), keeping the cache length, cache contract and attention.
    """
    backend = backends.get(recipe.target)
    changes = {key: value for key, value in changes.items() if value is not None}
    if "dtype" in changes:
        changes["dtype"] = DTYPE_ALIASES.get(changes["dtype"], changes["dtype"])
    for key, value in changes.items():
        options = backend.options.get(key)
        if options is not None and value not in options:
            shown = ", ".join(str(o) for o in options)
            raise UserError(f"{FLAGS[key]} {value} is not supported for {recipe.target} (supported: {shown})")
    dtype = changes.get("dtype")
    if dtype is not None and dtype != recipe.dtype and recipe.quantization == "none" \
            and recipe.embedding_quantization == "none":
        # a precision change brings that precision's verification thresholds: take the shipped recipe for it
        sibling = load(backend.dtype_recipes[dtype])
        recipe = dataclasses.replace(sibling, max_seq_len=recipe.max_seq_len, kv_cache=recipe.kv_cache,
                                     attention=recipe.attention)
    changes = {key: value for key, value in changes.items() if getattr(recipe, key) != value}
    if not changes:
        return recipe
    return check(dataclasses.replace(recipe, **changes), f"{recipe.name} (with command-line options)")
