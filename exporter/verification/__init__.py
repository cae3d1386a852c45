"""Verification: every artifact is compared with the unmodified eager transformers model, in its own runtime.

- ``plan``: what runs (prompts, cases);
- ``reference``: the eager logits and tokens to reproduce;
- ``compare``: metrics, thresholds, grading a session stage by stage;
- ``folder``: a whole output folder, each artifact through its backend (also ``export-model verify``).
"""

from exporter.verification.folder import verify_folder

__all__ = ["verify_folder"]
