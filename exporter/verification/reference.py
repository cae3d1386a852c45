"""Eager references for verification: the token ids an artifact is fed and the logits it must reproduce.

The fp32 reference is the checkpoint as transformers defines it (default attention, fresh load, no cache). For
exact recipes it comes with a float64 forward of the same weights (``float64``): the truth both the artifact and
fp32 eager are measured against, so eager fp32's own error is the noise floor. A quantized or reduced-precision
recipe also gets the *matched* reference: the same eager model changed exactly the way the artifact was (its
backend's ``matched_reference``). The matched reference isolates what capture and lowering did; the fp32 reference
measures what quantization cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from exporter.generation import EagerSession, eager_logits, greedy_generate
from exporter.verification.float64 import float64_forward
from exporter.verification.plan import Case, VerifyPlan, turn_token_ids


@dataclass
class CaseReference:
    """One case: every token it feeds (inputs and eager's greedy tokens) and the reference logits at every
    position, from one no-cache forward over the whole sequence."""

    case: Case
    tokens: list[int]
    logits: np.ndarray  # [T, V] float32 eager
    logits64: np.ndarray | None = None  # [T, V] float64 forward of the same weights (exact recipes)


@dataclass
class Reference:
    plan: VerifyPlan
    cases: list[CaseReference]


def case_tokens(model, tokenizer, case: Case) -> list[int]:
    """The tokens of ``case``: each turn's input ids, then eager's greedy continuation (full recompute, no cache)."""
    vocab_size = model.config.get_text_config().vocab_size
    tokens: list[int] = []
    for index, turn in enumerate(case.turns):
        tokens += turn_token_ids(tokenizer, vocab_size, index, turn.length)
        if turn.decode:
            tokens += greedy_generate(EagerSession(model), tokens, turn.decode, set())["tokens"]
    return tokens


@torch.no_grad()
def build_reference(model, tokenizer, plan: VerifyPlan, float64: bool = False,
                    tokens: list[list[int]] | None = None) -> Reference:
    """Run the eager reference ``model`` for every case of ``plan``. ``tokens``: the cases' token ids (from the
    fp32 reference), else eager greedy of ``model`` itself; ``float64``: also the float64 logits."""
    cases = []
    for index, case in enumerate(plan.cases):
        sequence = tokens[index] if tokens is not None else case_tokens(model, tokenizer, case)
        logits64 = None
        if float64:
            with float64_forward(model):
                logits64 = model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0].numpy()
        cases.append(CaseReference(case, sequence, eager_logits(model, sequence), logits64))
    return Reference(plan=plan, cases=cases)
