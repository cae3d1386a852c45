"""Named export recipes: TOML files in ``recipes/``, validated into ``Recipe`` objects.

A recipe says where an artifact runs (target, backend), with which numerics (dtype, weight quantization, group
size, embedding quantization, attention kernel, ONNX cache contract, ONNX graph fusions, ExecuTorch weights in a
separate ``model.ptd``) and how it is verified:
- ``[verify]``: against the *matched* eager reference (fp32 eager for unquantized fp32 recipes; the eager model
  quantized / cast the same way for the others): ``max_abs_diff`` and/or ``max_rel_diff`` (max abs diff over the
  largest reference logit) and ``min_top1_agreement``, teacher-forced.
- ``[verify.fp32]`` (quantized / reduced-precision recipes only): against the fp32 eager model,
  ``min_top1_agreement`` and ``max_mean_kl`` (mean KL(fp32 || artifact) over all checked positions, nats).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
TARGETS = ("executorch", "onnx")
DEFAULT_RECIPES = {"executorch": "xnnpack-fp32", "onnx": "onnx-fp32"}
BACKENDS = {"executorch": ("xnnpack",), "onnx": ("onnxruntime",)}
DTYPES = {"executorch": ("float32", "float16"), "onnx": ("float32", "float16")}  # XNNPACK: no bf16 kernels
QUANTIZATIONS = {"executorch": ("none", "8da4w", "8da8w"), "onnx": ("none", "int4", "int8")}
EMBEDDING_QUANTIZATIONS = {"executorch": ("none", "4w", "8w"), "onnx": ("none", "4w", "8w")}
ATTENTIONS = {"executorch": ("export_safe", "executorch_custom_ops"), "onnx": ("export_safe", "onnxruntime_contrib_ops")}
KV_CACHES = {"executorch": ("static",), "onnx": ("static", "dynamic")}
# Graph fusions into onnxruntime's own ops for one of its providers (transformers' ``fuse_for_onnxruntime``).
ORT_FUSIONS = {"executorch": ("none",), "onnx": ("none", "cpu")}
# Group size 0 = one scale per output channel. Default per scheme when a recipe or flag does not say.
DEFAULT_GROUP_SIZE = {"none": 0, "8da4w": 32, "8da8w": 0, "int4": 32, "int8": 32}
# The shipped unquantized recipe per target and dtype (``--dtype`` switches to its verification thresholds).
DTYPE_RECIPES = {"executorch": {"float32": "xnnpack-fp32", "float16": "xnnpack-fp16"},
                 "onnx": {"float32": "onnx-fp32", "float16": "onnx-fp16"}}
DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                 "bf16": "bfloat16", "bfloat16": "bfloat16"}


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

    def choice(key, options, default=dataclasses.MISSING):
        value = field(key, str, default=default)
        if value not in options:
            raise UserError(f"recipe {where}: {key} {value!r} is not one of {', '.join(options)}")
        return value

    target = choice("target", TARGETS)
    verify = data.get("verify")
    if not isinstance(verify, dict):
        raise UserError(f"recipe {where}: missing [verify] table")
    fp32 = verify.get("fp32", {})
    if not isinstance(fp32, dict):
        raise UserError(f"recipe {where}: [verify.fp32] must be a table")
    quantization = choice("quantization", QUANTIZATIONS[target])
    recipe = Recipe(
        name=field("name", str),
        target=target,
        backend=choice("backend", BACKENDS[target]),
        dtype=choice("dtype", DTYPES[target]),
        quantization=quantization,
        max_seq_len=field("max_seq_len", int),
        group_size=field("group_size", int, default=DEFAULT_GROUP_SIZE[quantization]),
        embedding_quantization=choice("embedding_quantization", EMBEDDING_QUANTIZATIONS[target], default="none"),
        attention=choice("attention", ATTENTIONS[target], default="export_safe"),
        kv_cache=choice("kv_cache", KV_CACHES[target], default="static"),
        ort_fusions=choice("ort_fusions", ORT_FUSIONS[target], default="none"),
        external_weights=field("external_weights", bool, default=False),
        max_abs_diff=field("max_abs_diff", float, verify, default=None),
        max_rel_diff=field("max_rel_diff", float, verify, default=None),
        min_top1_agreement=field("min_top1_agreement", float, verify),
        fp32_min_top1_agreement=field("min_top1_agreement", float, fp32, default=None),
        fp32_max_mean_kl=field("max_mean_kl", float, fp32, default=None),
    )
    return check(recipe, where)


def check(recipe: Recipe, where: str) -> Recipe:
    """Cross-field rules (also applied after command-line overrides); returns ``recipe`` or raises UserError."""
    if recipe.max_seq_len < 2:
        raise UserError(f"recipe {where}: max_seq_len must be at least 2")
    if recipe.max_abs_diff is None and recipe.max_rel_diff is None:
        raise UserError(f"recipe {where}: [verify] needs max_abs_diff or max_rel_diff")
    for value in (recipe.min_top1_agreement, recipe.fp32_min_top1_agreement):
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"recipe {where}: [verify] thresholds out of range")
    for value in (recipe.max_abs_diff, recipe.max_rel_diff, recipe.fp32_max_mean_kl):
        if value is not None and value <= 0:
            raise UserError(f"recipe {where}: [verify] thresholds out of range")
    if recipe.group_size < 0:
        raise UserError(f"recipe {where}: group size must be 0 (per channel) or positive, got {recipe.group_size}")
    if recipe.target == "executorch" and recipe.group_size % 32:
        raise UserError(f"recipe {where}: XNNPACK needs a group size that is a multiple of 32, got {recipe.group_size}")
    size = recipe.group_size
    if recipe.target == "onnx" and size and (size < 16 or size & (size - 1)):
        raise UserError(f"recipe {where}: MatMulNBits needs a block size that is a power of two >= 16, got {size}")
    if recipe.quantization == "8da8w" and recipe.group_size:
        raise UserError(f"recipe {where}: 8da8w is per channel on XNNPACK (group size 0), got {recipe.group_size}")
    if recipe.quantization == "8da4w" and not recipe.group_size:
        raise UserError(f"recipe {where}: 8da4w needs a group size (XNNPACK int4 weights are blockwise)")
    if recipe.quantization == "int4" and not recipe.group_size:
        raise UserError(f"recipe {where}: int4 needs a block size (MatMulNBits is blockwise)")
    if recipe.dtype != "float32" and (recipe.quantization != "none" or recipe.embedding_quantization != "none"):
        raise UserError(f"recipe {where}: quantized weights with {recipe.dtype} activations are not supported "
                        "(no matched reference reproduces the kernels' rounding); use float32 with quantization")
    if recipe.external_weights and recipe.target != "executorch":
        raise UserError(f"recipe {where}: external_weights is an ExecuTorch option (ONNX weights are always in "
                        "model.onnx.data)")
    if recipe.attention == "onnxruntime_contrib_ops" and recipe.kv_cache != "static":
        raise UserError(f"recipe {where}: onnxruntime_contrib_ops needs the static (shared-buffer) KV cache")
    if not recipe.exact and (recipe.fp32_min_top1_agreement is None or recipe.fp32_max_mean_kl is None):
        raise UserError(f"recipe {where}: a quantized or reduced-precision recipe needs [verify.fp32] "
                        "min_top1_agreement and max_mean_kl")
    return recipe


def with_overrides(recipe: Recipe, group_size: int | None = None, embedding: str | None = None,
                   dtype: str | None = None, kv_cache: str | None = None,
                   external_weights: bool | None = None) -> Recipe:
    """``recipe`` with command-line overrides applied and re-validated (UserError when a flag does not apply)."""
    changes = {}
    if external_weights is not None and external_weights != recipe.external_weights:
        changes["external_weights"] = external_weights
    if group_size is not None:
        if recipe.quantization == "none":
            raise UserError(f"--group-size applies to quantized recipes; {recipe.name} has no weight quantization")
        changes["group_size"] = group_size
    if embedding is not None:
        if embedding not in EMBEDDING_QUANTIZATIONS[recipe.target]:
            raise UserError(f"--qembedding {embedding} is not available for {recipe.target} "
                            f"({', '.join(EMBEDDING_QUANTIZATIONS[recipe.target])})")
        changes["embedding_quantization"] = embedding
    if dtype is not None:
        dtype = DTYPE_ALIASES.get(dtype, dtype)
        if dtype not in DTYPES[recipe.target]:
            raise UserError(f"--dtype {dtype} is not supported for {recipe.target} "
                            f"(supported: {', '.join(DTYPES[recipe.target])})")
        if dtype != recipe.dtype and recipe.quantization == "none" and recipe.embedding_quantization == "none":
            # a precision change brings that precision's verification thresholds: take the shipped recipe for it
            sibling = load(DTYPE_RECIPES[recipe.target][dtype])
            recipe = dataclasses.replace(sibling, max_seq_len=recipe.max_seq_len, kv_cache=recipe.kv_cache,
                                         attention=recipe.attention)
        changes["dtype"] = dtype
    if kv_cache is not None:
        if kv_cache not in KV_CACHES[recipe.target]:
            raise UserError(f"--onnx-cache applies to the onnx target, not {recipe.target}")
        changes["kv_cache"] = kv_cache
    if not changes:
        return recipe
    if "dtype" in changes and changes["dtype"] == recipe.dtype and len(changes) == 1:
        return recipe
    return check(dataclasses.replace(recipe, **changes), f"{recipe.name} (with command-line options)")
