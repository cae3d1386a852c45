"""Unit tests of the verification machinery: the plan's cases and stage cuts, the float64 noise-floor criterion,
the float64 forward, and the greedy comparison that tolerates near-ties only."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from exporter.generation import compare_greedy
from exporter.verification.compare import Thresholds, compare_to_float64, stage_slices
from exporter.verification.float64 import _KeepFloat64, float64_forward
from exporter.verification.plan import Case, Turn, VerifyPlan, default_plan
from exporter.verification.reference import CaseReference, Reference

EXACT = Thresholds(1.0, max_error_ratio=8.0, floor_ulps=16.0)


def test_default_plan_covers_how_runtimes_drive_a_program():
    plan = default_plan(2048)
    names = [case.name for case in plan.cases]
    assert {"", "multi-turn", "chunked prompt", "second sequence"} <= set(names)
    assert plan.prefill_chunk == 256
    second = plan.cases[names.index("second sequence")]
    longest = max(plan.cases, key=lambda c: c.length)
    assert not second.fresh and plan.cases[names.index("second sequence") - 1] is longest
    chunked = plan.cases[names.index("chunked prompt")]
    assert chunked.turns[0].length > plan.prefill_chunk  # split as TextLLMRunner splits it


def test_windowed_plan_crosses_the_window_everywhere():
    plan = default_plan(64, window=8)
    lengths = [case.turns[0].length for case in plan.cases if case.name == ""]
    assert max(lengths) > 8 and min(lengths) < 8
    multi = next(case for case in plan.cases if case.name == "multi-turn")
    assert multi.turns[1].length > 8  # the later message alone is longer than the window
    assert all(case.length <= 64 for case in plan.cases)


@pytest.mark.parametrize("cache", [4, 5, 16, 33, 128])
def test_plans_fit_small_caches(cache):
    plan = default_plan(cache)
    assert all(0 < case.length <= cache for case in plan.cases)


def test_stages_record_start_position_and_token_count():
    plan = VerifyPlan(cases=[Case("multi-turn", (Turn(5, 2), Turn(7, 3)))], prefill_chunk=4)
    reference = Reference(plan, [CaseReference(plan.cases[0], list(range(17)), np.zeros((17, 3)))])
    stages = [(fields["stage"], fields["start_pos"], fields["tokens"], (cut.start, cut.stop))
              for fields, cut in stage_slices(reference, reference.cases[0])]
    assert stages == [("multi-turn prefill[4]", 0, 4, (0, 4)), ("multi-turn chunk[4+1]", 4, 1, (4, 5)),
                      ("multi-turn decode[5+2]", 5, 2, (5, 7)), ("multi-turn chunk[7+4]", 7, 4, (7, 11)),
                      ("multi-turn chunk[11+3]", 11, 3, (11, 14)), ("multi-turn decode[14+3]", 14, 3, (14, 17))]


def _logits(rng, positions=6, vocab=50, scale=20.0):
    return rng.standard_normal((positions, vocab)) * scale


def test_an_artifact_as_noisy_as_eager_passes_and_a_biased_one_fails():
    rng = np.random.default_rng(0)
    truth = _logits(rng)
    noise = 3e-5
    eager32 = truth + rng.standard_normal(truth.shape) * noise
    good = truth + rng.standard_normal(truth.shape) * noise * 2
    stage = compare_to_float64(good.astype(np.float32), eager32, truth, EXACT)
    assert EXACT.passes(stage) and stage["error_ratio"] < 8
    bad = good.copy()
    bad[3, 7] += 1e-2  # one logit off by far more than rounding: a real bug at one position
    stage = compare_to_float64(bad.astype(np.float32), eager32, truth, EXACT)
    assert not EXACT.passes(stage) and stage["error_ratio"] > 50


def test_top1_must_hold_where_the_margin_is_safe():
    truth = np.array([[10.0, 0.0, 0.0], [5.0, 4.999999, 0.0]])
    eager32 = truth + 1e-6
    flipped_tie = np.array([[10.0, 0.0, 0.0], [4.999999, 5.0, 0.0]], dtype=np.float32)  # a near-tie: allowed
    stage = compare_to_float64(flipped_tie, eager32, truth, EXACT)
    assert stage["margin_safe_positions"] == 1 and stage["top1_agreement"] == 0.5
    assert stage["top1_agreement_margin_safe"] == 1.0


def test_non_finite_logits_fail():
    truth = np.zeros((2, 3))
    stage = compare_to_float64(np.full((2, 3), np.nan, dtype=np.float32), truth + 1e-6, truth, EXACT)
    assert not EXACT.passes(stage)


def test_float64_forward_is_exact_float64_and_restores_the_model():
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[3, 9, 27, 14, 5]])
    with torch.no_grad():
        with float64_forward(model):
            ours = model(input_ids=ids).logits
        double = copy.deepcopy(model).double()
        with _KeepFloat64():  # RMSNorm's and rotary's float32 casts kept in float64 too
            expected = double(input_ids=ids).logits
    assert ours.dtype == torch.float64 and torch.equal(ours, expected)
    assert all(torch.equal(v, model.state_dict()[k]) and v.dtype == torch.float32 for k, v in state.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives


def test_greedy_comparison_tolerates_near_ties_only():
    margins = {2: 1e-6, 3: 0.5}
    assert compare_greedy([1, 2, 3], [1, 2, 3], None, 1e-4)["passed"]
    tie = compare_greedy([1, 2, 3, 4], [1, 2, 9, 9], lambda i, a, b: margins[i], 1e-4)
    assert tie["passed"] and tie["near_tie"] and tie["diverged_at"] == 2
    real = compare_greedy([1, 2, 3, 4], [1, 2, 3, 9], lambda i, a, b: margins[i], 1e-4)
    assert not real["passed"] and not real["near_tie"]
    assert not compare_greedy([1, 2, 3], [1, 2], None, 1e-4)["passed"]  # stopped early: a missed or extra eos
