"""The interface every export target implements. The pipeline, the recipe validator, verification and the CLI talk
to targets only through it; nothing outside ``exporter/backends/<target>/`` branches on a target's name.

A backend is a small object whose module imports nothing heavy: the runtime and lowering libraries are imported by
its methods, so validating a recipe or listing targets loads no ExecuTorch or onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Session(Protocol):
    """A loaded artifact driven token by token: ``step(ids, start_pos) -> logits [len(ids), V]`` (float32) at
    positions ``start_pos ..``; ``reset()`` starts a new sequence; ``max_seq_len`` is the cache length."""

    max_seq_len: int

    def reset(self) -> None: ...

    def step(self, token_ids: list[int], start_pos: int): ...


class Backend:
    """One export target. Subclasses set the class attributes and implement the methods below."""

    target: str  # the ``--target`` / recipe ``target`` name
    artifact: str  # the artifact's file name in the output folder
    runtime: str  # what runs it, for reports ("executorch", "onnxruntime-genai")
    default_recipe: str  # the recipe ``--target`` uses when no ``--recipe`` names one
    dtype_recipes: dict[str, str]  # dtype -> shipped unquantized recipe (``--dtype`` takes its thresholds)
    # recipe field -> the values this target accepts (the first is the default where a recipe omits the field)
    options: dict[str, tuple]
    default_group_size: dict[str, int]  # weight quantization scheme -> group size when a recipe omits it

    def accepts(self, field: str, recipe) -> bool:
        """Whether the command-line override of recipe ``field`` means anything for ``recipe`` (a flag that applies
        to none of the selected recipes is refused). Default: the target offers a choice for the field."""
        return len(self.options[field]) > 1

    def check_recipe(self, recipe, where: str) -> None:
        """Target-specific cross-field rules of a recipe; raise ``UserError`` naming ``where``."""

    def build(self, recipe, model, checkpoint, max_seq_len: int, staging: Path, progress) -> dict:
        """Write the artifact (and its companion files) into ``staging``; return build details for the manifest.
        ``model`` is the recipe's own copy when the recipe changes weights (it may be changed in place)."""
        raise NotImplementedError

    def open_session(self, path: Path, threads: int | None = None) -> Session:
        """A ``Session`` over the artifact at ``path`` in its runtime."""
        raise NotImplementedError

    def matched_reference(self, recipe, model, artifact: Path):
        """``model`` (fresh fp32 eager) changed in place to compute like the artifact of a non-exact ``recipe``
        (same quantized weights, same rounding): the tight side of a quantized artifact's verification."""
        raise NotImplementedError

    def metadata_check(self, artifact: Path, checkpoint, max_seq_len: int) -> dict:
        """The artifact's metadata (what a runtime reads: special ids, vocabulary, context length, cache shapes)
        against the checkpoint and the export request: a verification stage."""
        raise NotImplementedError

    def generation_check(self, recipe, artifact: Path, reference_model, context, allowed_error: float = 0.0) -> dict:
        """The runtime's own generation loop on the artifact, driven like an app (turns, a new sequence), vs greedy
        tokens: a verification stage. ``allowed_error``: the logit error the graded stages allowed (a difference
        at a near-tie within it may part the continuations)."""
        raise NotImplementedError

    def generate(self, folder: Path, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> dict:
        """Greedy tokens and prefill / decode speed from an output folder, the way an app would run it."""
        raise NotImplementedError

    def artifact_files(self, folder: Path) -> list[Path]:
        """Every file that makes up the artifact in ``folder`` (for sizes)."""
        return sorted(folder.glob(self.artifact + "*"))
