"""Eager references for verification: the token ids and logits an artifact must reproduce.

The fp32 reference is the checkpoint as transformers defines it (default attention, fresh load). A quantized or
reduced-precision recipe also gets the *matched* reference: the same eager model changed exactly the way the
artifact was (its backend's ``matched_reference``). The matched reference isolates what capture and lowering did;
the fp32 reference measures what quantization cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from exporter.generation import EagerSession, eager_logits, greedy_generate
from exporter.verification.plan import VerifyPlan, prompt_token_ids


@dataclass
class CaseReference:
    """Eager token ids and logits for one prompt and its decode steps."""

    prompt: list[int]
    prompt_logits: np.ndarray  # [L, V]
    decode_tokens: list[int]  # eager greedy continuation, fed one at a time after the prompt
    decode_logits: np.ndarray  # [N, V]


@dataclass
class Reference:
    cases: list[CaseReference]


@torch.no_grad()
def build_reference(model, tokenizer, plan: VerifyPlan) -> Reference:
    """Run the eager reference ``model`` (no cache) for every case of ``plan``: the prompt's logits, eager's greedy
    continuation, and the logits of every decode position from one forward over the whole sequence."""
    vocab_size = model.config.get_text_config().vocab_size
    cases = []
    for length, steps in plan.cases:
        prompt = prompt_token_ids(tokenizer, vocab_size, length)
        prompt_logits = eager_logits(model, prompt)
        decode = greedy_generate(EagerSession(model), prompt, steps, set())["tokens"] if steps else []
        full = eager_logits(model, prompt + decode) if steps else prompt_logits
        cases.append(CaseReference(prompt, prompt_logits, decode, full[length:]))
    return Reference(cases=cases)
