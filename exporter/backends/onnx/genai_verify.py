"""ONNX Runtime GenAI verification: a GenAI folder driven like a chat app vs eager greedy tokens (turn 1, a
continued turn, a new sequence, a right-padded batch); folders GenAI cannot run go through plain onnxruntime.
What GenAI reads and how its generator behaves: ``exporter.backends.onnx.genai``."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from exporter.backends.onnx.genai import UNSUPPORTED_KEY, GenAIModel, genai_state_model, next_turn_ids
from exporter.errors import first_line
from exporter.generation import EagerSession, compare_greedy, greedy_generate
from exporter.verification.plan import RUNNER_PROMPTS, runner_prompt_ids, runner_texts


def verify_genai(folder, reference_model, tokenizer, eos_ids, max_new_tokens: int, session_factory, margin,
                 allowed: float, threads: int | None = None, batch_window: int | None = None) -> dict:
    """ONNX Runtime GenAI driven like a chat app vs greedy tokens of ``reference_model``, token ids compared.

    On one generator: turn 1 (``runner_texts``' first: a chat-formatted prompt when the tokenizer has a template),
    then turn 2 appended after turn 1's tokens (``GenAIModel.chat``: the whole conversation reaches the model);
    then turn 2's text as a new sequence on a new generator of the same loaded model; then the plain prompts as one
    right-padded batch. Both sides stop after
    an eos: eager after any of ``eos_ids``, GenAI after its ``genai_config.json`` eos (a mismatch fails). A
    difference at a near-tie (reference margin within ``2 * allowed``) passes, recorded
    (``exporter.generation.compare_greedy``). ``genai_tokenizer`` reports (without grading) whether GenAI's own
    tokenizer gives the transformers ids.

    A float16 graph, or one whose MatMulNBits quantize activations to int8 (``accuracy_level`` 4), is graded against
    its own greedy tokens through plain onnxruntime (``session_factory(path)``, a step session), exactly: such
    rounding breaks near-ties differently from any eager model (measured: tiny-qwen2 float16 diverged from
    float16-rounded eager at the 8th token while every teacher-forced logit agreed to 2e-3; tiny-gemma2 int4 at the
    11th token, one activation on an int8 rounding boundary), so this checks GenAI's loop on the verified graph.

    ``batch_window``: the model's sliding window / chunk, if any. The padded-batch check is then skipped (and
    says so): GenAI right-pads shorter rows, and the cache applies windows over slots, so a padded row's window
    holds fewer real tokens than eager's; batch-1 generation is exact. So it is for the float16 / int8-activation
    graphs: their rounding depends on the batch layout, and a padded row has no exact batch-1 expectation.
    """
    if not (Path(folder) / "genai_config.json").is_file():  # a state family GenAI has no contract for
        graph = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False)
        reason = {p.key: p.value for p in graph.metadata_props}.get(UNSUPPORTED_KEY, "no genai_config.json")
        return _onnxruntime_greedy(folder, reference_model, tokenizer, eos_ids, max_new_tokens, session_factory,
                                   margin, allowed, reason)
    model = GenAIModel(folder, threads)
    vocab_size = reference_model.config.get_text_config().vocab_size
    eos = set(int(t) for t in eos_ids)
    graph = Path(folder) / model.config["model"]["decoder"]["filename"]
    rounding = _rounding_kernels(graph)
    session = session_factory(graph) if rounding else EagerSession(reference_model)
    expected_from = (f"greedy of the same graph through plain onnxruntime ({rounding})" if rounding
                     else "eager greedy of the reference model")
    allowed = 0.0 if rounding else allowed

    def greedy(ids, budget, chunks=None):  # chunks: as GenAI fed them (only the rounding graphs depend on it)
        return greedy_generate(session, ids, budget, eos, chunks if rounding else None)["tokens"]

    if tokenizer is not None:
        first, second = runner_texts(tokenizer)
        turn_ids = [[int(t) for t in tokenizer(first)["input_ids"]],
                    [int(t) for t in tokenizer(second, add_special_tokens=False)["input_ids"]]]
        fresh_ids = [int(t) for t in tokenizer(second.lstrip())["input_ids"]]
    else:
        turn_ids = runner_prompt_ids(None, vocab_size)
        fresh_ids = turn_ids[1]
    turns, passed, first_reply = [], True, None
    runs = [("turn 1", [turn_ids[0]]), ("turn 2 (continued)", turn_ids), ("new sequence", [fresh_ids])]
    for name, inputs in runs:
        if len(inputs) > 1 and first_reply is None:
            continue  # turn 1 did not run
        if len(inputs) > 1 and model.continuation_blocker:
            turns.append({"turn": name, "skipped": model.continuation_blocker, "expected_skip": True})
            continue
        context = (inputs[0] + first_reply if len(inputs) > 1 else []) + inputs[-1]  # the whole conversation
        budget = min(max_new_tokens, model.context_length - len(context) - 1)
        if budget < 1:
            turns.append({"turn": name, "skipped": "no room left in the context"})
            continue
        chunks = None
        if len(inputs) > 1:  # as GenAIModel.chat feeds them: the prompt, the reply one token at a time, the turn
            state = genai_state_model(model.config)
            chunks = [inputs[0], *([] if state else [[t] for t in first_reply[:-1]]),
                      next_turn_ids(first_reply, inputs[-1], state)]
        expected = greedy(context, budget, chunks)
        budgets = ([len(first_reply)] if len(inputs) > 1 else []) + [budget]
        try:
            actual = model.chat(inputs, budgets)[-1]
        except Exception as exc:  # noqa: BLE001 - e.g. a generator that refuses tokens after its eos
            turns.append({"turn": name, "error": first_line(exc, 200), "passed": False})
            passed = False
            continue
        outcome = compare_greedy(expected, actual, lambda i, w, g: margin(context + expected[:i], w, g), allowed)
        turns.append({"turn": name, "start_pos": len(context) - len(inputs[-1]), "prompt_tokens": len(inputs[-1]),
                      "expected": expected, "actual": actual, **outcome})
        passed &= outcome["passed"]
        if name == "turn 1":
            first_reply = expected
        if outcome.get("near_tie"):
            turns.append({"turn": "later turns", "skipped": "the previous turn parted from eager at a near-tie"})
            break
    stage = {"stage": "genai_generate", "turns": turns, "expected_from": expected_from}
    prompts = [p[: max(1, model.context_length // 2)] for p in runner_prompt_ids(tokenizer, vocab_size)]
    if batch_window is not None:
        stage["batch"] = {"skipped": f"windowed layers ({batch_window}): padded rows would see fewer real tokens "
                                     "in their window than eager"}
    elif genai_state_model(model.config):
        stage["batch"] = {"skipped": "state layers: a right-padded row's pad tokens would run through its "
                                     "convolution / recurrent state, which eager never sees"}
    elif rounding:
        # measured: SmolLM2-135M onnx-int8 / onnx-int4 at cache 96, a padded row parted from the same graph's
        # batch-1 greedy at its 29th token (fp32 sums over a longer padded row round differently, and an int8
        # activation then lands on the other side of a rounding step); at cache 2048 the same rows agreed
        stage["batch"] = {"skipped": f"{rounding}: rounding depends on the batch layout, so a padded row has no "
                                     "exact batch-1 expectation (batch-1 generation above is exact)"}
    else:
        width = max(len(p) for p in prompts)
        budget = min(max_new_tokens, model.context_length - width)
        try:
            batch = model.generate_batch(prompts, budget)
            batch_expected = [greedy(p, budget) for p in prompts]
            stage["batch"] = {"actual": batch, "expected": batch_expected, "passed": batch == batch_expected}
            passed = passed and stage["batch"]["passed"]
        except ValueError as exc:
            stage["batch"] = {"skipped": str(exc)}
    if tokenizer is not None:
        stage["genai_tokenizer"] = _tokenizer_report(model, tokenizer)
    stage["passed"] = passed
    return stage


def _rounding_kernels(onnx_path: Path) -> str | None:
    """Why the graph's greedy tokens may differ from eager's at near-ties (float16 logits, int8 activations), or
    None."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    logits = next((o for o in graph.output if o.name == "logits"), None)
    if logits is not None and logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
        return "float16"
    for node in graph.node:
        if node.op_type == "MatMulNBits" and any(a.name == "accuracy_level" and helper.get_attribute_value(a) == 4
                                                 for a in node.attribute):
            return "MatMulNBits int8 activations"
    return None


def _tokenizer_report(model: GenAIModel, tokenizer) -> dict:
    """GenAI's tokenizer vs transformers' on ``RUNNER_PROMPTS`` (informational: generation is fed HF ids)."""
    try:
        genai_ids = [model.encode(text) for text in RUNNER_PROMPTS]
    except Exception as exc:  # noqa: BLE001 - an unsupported tokenizer.json must not hide the generation result
        return {"matches": False, "error": first_line(exc, 200)}
    hf_ids = [[int(t) for t in tokenizer(text)["input_ids"]] for text in RUNNER_PROMPTS]
    return {"matches": genai_ids == hf_ids, "genai": genai_ids, "transformers": hf_ids}


def _onnxruntime_greedy(folder, reference_model, tokenizer, eos_ids, max_new_tokens: int, session_factory, margin,
                        allowed: float, reason: str) -> dict:
    """For a folder GenAI cannot run: greedy generation through plain onnxruntime (the graph's documented I/O,
    ``session_factory``) vs eager greedy, on the first runner prompt and then a new sequence on the same session
    (the state must start afresh at position 0). GenAI itself is an expected skip with ``reason``."""
    vocab_size = reference_model.config.get_text_config().vocab_size
    eos = set(int(t) for t in eos_ids)
    session = session_factory(Path(folder) / "model.onnx")
    eager = EagerSession(reference_model)
    prompts = runner_prompt_ids(tokenizer, vocab_size)
    turns, passed = [], True
    for name, ids in (("turn 1", prompts[0]), ("new sequence", prompts[1])):
        budget = min(max_new_tokens, session.max_seq_len - len(ids) - 1)
        expected = greedy_generate(eager, ids, budget, eos)["tokens"]
        actual = greedy_generate(session, ids, budget, eos)["tokens"]
        outcome = compare_greedy(expected, actual, lambda i, w, g, ids=ids, e=expected: margin(ids + e[:i], w, g),
                                 allowed)
        turns.append({"turn": name, "prompt_tokens": len(ids), "expected": expected, "actual": actual, **outcome})
        passed &= outcome["passed"]
    return {"stage": "genai_generate", "skipped": reason, "expected_skip": True, "passed": passed,
            "onnxruntime_generate": {"turns": turns, "expected_from": "eager greedy of the reference model"}}
