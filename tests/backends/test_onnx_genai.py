"""ONNX Runtime GenAI on the exported folder: greedy tokens equal eager transformers, eos handling, padded batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.backends.onnx import genai, genai_verify
from exporter.backends.onnx.runtime import OnnxSession
from exporter.generation import eager_greedy, eager_logits, eager_margin
from exporter.verification.plan import RUNNER_PROMPTS

RUNNER_PROMPT = RUNNER_PROMPTS[0]

THREADS = 1
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory) -> Path:
    """``builtin:tiny-llama`` exported to ONNX once for this module (in process, quiet)."""
    from exporter import recipes
    from exporter.pipeline import ExportRequest, run_export
    from exporter.progress import Progress

    output = tmp_path_factory.mktemp("genai") / "tiny-llama-onnx"
    request = ExportRequest(model="builtin:tiny-llama", recipes=[recipes.load("onnx-fp32")], output=output)
    result = run_export(request, Progress(quiet=True))
    assert result.passed, json.dumps(result.verification)[:3000]
    return result.output


@pytest.fixture(scope="module")
def reference(builtin_checkpoint):
    """The same built-in checkpoint (deterministic) with transformers' default attention, and its tokenizer."""
    from transformers import AutoTokenizer

    source = builtin_checkpoint("tiny-llama")
    return source.load_model(), AutoTokenizer.from_pretrained(source.folder)


def _with_eos(folder: Path, target: Path, eos: int) -> Path:
    """A copy of the export folder whose genai_config.json stops at ``eos``."""
    shutil.copytree(folder, target)
    config = json.loads((target / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = eos
    (target / "genai_config.json").write_text(json.dumps(config))
    return target


def test_genai_config_matches_the_graph(onnx_export):
    import onnxruntime as ort

    config = json.loads((onnx_export / "genai_config.json").read_text())
    session = ort.InferenceSession(str(onnx_export / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    decoder = config["model"]["decoder"]
    cache_len = inputs["past_key_values.0.key"].shape[2]
    # GenAI sizes its shared buffer to the graph's fixed cache length and refuses max_length > context_length.
    assert config["model"]["context_length"] == cache_len == config["search"]["max_length"] == 512
    assert config["search"]["past_present_share_buffer"] is True
    assert inputs["attention_mask"].type == inputs["position_ids"].type == "tensor(int64)"
    for i in range(decoder["num_hidden_layers"]):
        for kind in ("key", "value"):
            assert decoder["inputs"][f"past_{kind}_names"] % i in inputs
            assert decoder["outputs"][f"present_{kind}_names"] % i in outputs
            shape = inputs[decoder["inputs"][f"past_{kind}_names"] % i].shape
            assert shape[1:] == [decoder["num_key_value_heads"], cache_len, decoder["head_size"]]


def verify(folder, model, tokenizer, eos):
    return genai_verify.verify_genai(folder, model, tokenizer, eos, MAX_NEW_TOKENS, OnnxSession, eager_margin(model),
                                     0.0, threads=THREADS)


def test_genai_greedy_tokens_equal_eager(onnx_export, reference):
    """A conversation on one generator (turn 2 appended after turn 1), a new sequence, a padded batch: GenAI's
    tokens equal eager greedy on the whole conversation."""
    model, tokenizer = reference
    stage = verify(onnx_export, model, tokenizer, {2})
    assert stage["stage"] == "genai_generate" and stage["passed"] is True, stage
    turns = {turn["turn"]: turn for turn in stage["turns"]}
    assert set(turns) == {"turn 1", "turn 2 (continued)", "new sequence"}
    assert all(t["matches"] and t["actual"] == t["expected"] for t in turns.values())
    assert turns["turn 2 (continued)"]["start_pos"] == turns["turn 1"]["prompt_tokens"] + MAX_NEW_TOKENS
    assert all(len(t["actual"]) == MAX_NEW_TOKENS for t in turns.values())  # the random model emits no eos here
    assert stage["batch"]["passed"] is True
    assert stage["genai_tokenizer"]["matches"] is True


def test_continuing_a_conversation_without_rewinding_leaves_a_hole(onnx_export, reference):
    """GenAI 0.18 never feeds a turn's last generated token; appending the next turn right away leaves that slot
    unwritten inside the mask. ``GenAIModel.chat`` rewinds one token and appends it again: without that, turn 2
    parts from eager (this is the measurement behind it)."""
    import onnxruntime_genai as og

    model, tokenizer = reference
    first = tokenizer(RUNNER_PROMPT)["input_ids"]
    second = tokenizer(" The old clockmaker repaired every clock in the valley", add_special_tokens=False)["input_ids"]
    runtime = genai.GenAIModel(onnx_export, threads=THREADS)
    reply, again = runtime.chat([first, second], [MAX_NEW_TOKENS, MAX_NEW_TOKENS])
    assert again == eager_greedy(model, first + reply + second, MAX_NEW_TOKENS, set())
    generator = og.Generator(runtime.model, runtime._params(runtime.context_length))
    generator.append_tokens(np.asarray([first], dtype=np.int32))
    for _ in range(MAX_NEW_TOKENS):
        generator.generate_next_token()
    generator.append_tokens(np.asarray([second], dtype=np.int32))  # no rewind
    naive = []
    for _ in range(MAX_NEW_TOKENS):
        generator.generate_next_token()
        naive.append(int(generator.get_next_tokens()[0]))
    assert naive != again


def test_a_turn_after_an_eos_reply_sees_the_eos(onnx_export, reference, tmp_path):
    """After a reply that ended with an eos, GenAI 0.18's count stops before that eos (it was never fed);
    ``GenAIModel.chat`` feeds it in front of the next turn, so the model sees what eager sees (the conversation
    with the eos). Appending the next turn as it is drops the eos: on tiny-smollm3 the next token then differed
    from eager's by a 0.30 logit margin."""
    import onnxruntime_genai as og

    model, tokenizer = reference
    first = tokenizer(RUNNER_PROMPT)["input_ids"]
    second = tokenizer(" The old clockmaker repaired every clock in the valley", add_special_tokens=False)["input_ids"]
    greedy = eager_greedy(model, first, MAX_NEW_TOKENS, set())
    index = next(i for i, t in enumerate(greedy) if i >= 1 and t not in greedy[:i])
    eos = greedy[index]
    folder = _with_eos(onnx_export, tmp_path / "eos", eos)
    runtime = genai.GenAIModel(folder, threads=THREADS)
    reply, again = runtime.chat([first, second], [MAX_NEW_TOKENS, MAX_NEW_TOKENS])
    assert reply == greedy[: index + 1] and reply[-1] == eos
    assert again == eager_greedy(model, first + reply + second, MAX_NEW_TOKENS, {eos})
    generator = og.Generator(runtime.model, runtime._params(runtime.context_length))
    generator.append_tokens(np.asarray([first], dtype=np.int32))
    for _ in reply:
        generator.generate_next_token()
    assert generator.token_count() == len(first) + len(reply) - 1  # the eos is not counted: it was never fed
    generator.append_tokens(np.asarray([second], dtype=np.int32))  # as it is: the eos is lost
    naive = []
    while len(naive) < MAX_NEW_TOKENS and not generator.is_done():
        generator.generate_next_token()
        naive.append(int(generator.get_next_tokens()[0]))
        if naive[-1] == eos:
            break
    assert naive != again


def test_genai_and_eager_stop_at_the_same_eos(onnx_export, reference, tmp_path):
    model, tokenizer = reference
    first = eager_greedy(model, tokenizer(RUNNER_PROMPT)["input_ids"], MAX_NEW_TOKENS, set())
    index = next(i for i, t in enumerate(first) if i >= 1 and t not in first[:i])  # first new token after #0
    eos = first[index]
    folder = _with_eos(onnx_export, tmp_path / "eos", eos)
    stage = verify(folder, model, tokenizer, {eos})
    turn = stage["turns"][0]
    assert turn["passed"] is True, stage
    assert turn["actual"] == first[: index + 1]  # stopped right after the eos, eos included
    # The check is not vacuous: with an eos the folder's GenAI config does not know, the runs diverge.
    mismatched = verify(onnx_export, model, tokenizer, {eos})
    assert mismatched["passed"] is False
    turn = mismatched["turns"][0]
    assert turn["expected"] == first[: index + 1] and len(turn["actual"]) == MAX_NEW_TOKENS


def test_generate_from_text_with_genai_tokenizer(onnx_export, reference):
    model, tokenizer = reference
    result = genai.generate_genai(onnx_export, RUNNER_PROMPT, 8, threads=THREADS)
    hf_ids = tokenizer(RUNNER_PROMPT)["input_ids"]
    assert result["prompt_ids"] == hf_ids and hf_ids[0] == tokenizer.bos_token_id  # BOS added like transformers
    assert result["tokens"] == eager_greedy(model, hf_ids, 8, {2})
    assert result["finish"] == "length" and result["prompt_tokens"] == len(hf_ids)
    assert result["text"] == tokenizer.decode(result["tokens"])
    assert result["prefill_s"] > 0 and result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0


def test_genai_refuses_prompts_without_room(onnx_export):
    model = genai.GenAIModel(onnx_export, threads=THREADS)
    with pytest.raises(ValueError, match="no room"):
        model.generate([5] * model.context_length, 4)
    assert len(model.generate([5] * (model.context_length - 3), 10)["tokens"]) == 3  # capped by the context


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_through_onnxruntime_matches_eager_per_prompt(onnx_export, reference, side):
    model, tokenizer = reference
    prompts = [tokenizer(text)["input_ids"] for text in (RUNNER_PROMPT, "Hi", "The quick brown fox jumps")]
    assert len({len(p) for p in prompts}) == 3
    stage = padded_batch_check(onnx_export / "model.onnx", model, prompts, pad_id=0, side=side,
                               decode_steps=4, max_abs_diff=1e-4)
    assert stage["passed"] is True, stage
    assert stage["prefill_max_abs_diff"] <= 1e-4 and stage["decode_max_abs_diff"] <= 1e-4
    assert stage["top1_agreement"] is True


def test_leading_pads_must_be_masked(onnx_export, reference):
    """What GenAI 0.18 feeds for leading pads given to ``append_tokens`` (mask 1 and positions counted through
    them) changes the short row's logits: batches must be right-padded (GenAI's ``encode_batch``) or masked."""
    import onnxruntime as ort

    model, tokenizer = reference
    long, short = tokenizer("The quick brown fox jumps")["input_ids"], tokenizer("Hi")["input_ids"]
    pads = len(long) - len(short)
    session = ort.InferenceSession(str(onnx_export / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {spec.name: np.zeros([2, *spec.shape[1:]], dtype=np.float32)
            for spec in session.get_inputs() if spec.name.startswith("past_key_values.")}
    ids = np.array([long, [0] * pads + short], dtype=np.int64)
    positions = np.tile(np.arange(len(long), dtype=np.int64), (2, 1))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([short])).logits[0].numpy()

    def short_row(mask):
        feeds = {"input_ids": ids, "attention_mask": np.array(mask, dtype=np.int64), "position_ids": positions}
        return session.run(["logits"], {**feeds, **past})[0][1, pads:]

    unmasked = short_row([[1] * len(long), [1] * len(long)])
    masked = short_row([[1] * len(long), [0] * pads + [1] * len(short)])
    assert np.abs(unmasked - expected).max() > 1e-2
    # Masked, a constant position offset is harmless (RoPE is relative), so only the mask matters here.
    assert np.abs(masked - expected).max() <= 1e-4


def padded_batch_check(onnx_path, reference_model, prompts: list[list[int]], pad_id: int, side: str = "left",
                       decode_steps: int = 4, max_abs_diff: float = 1e-4) -> dict:
    """One padded batch through plain onnxruntime on the exported graph vs eager transformers per prompt.

    ``side="left"``: leading pads (mask 0, position 0), real tokens at positions 0..n-1; ``side="right"``:
    GenAI's own layout (trailing pads). Then ``decode_steps`` single-token steps, teacher-forced on each row's
    eager greedy tokens: the mask grows by one 1 per step and each row's position is its own token count.
    Compares the logits of every real token (prefill) and of every decode step.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids = np.full((batch, width), pad_id, dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    positions = np.zeros((batch, width), dtype=np.int64)
    real_slots = []
    for row, prompt in enumerate(prompts):
        start = width - len(prompt) if side == "left" else 0
        ids[row, start:start + len(prompt)] = prompt
        mask[row, start:start + len(prompt)] = 1
        positions[row, start:start + len(prompt)] = np.arange(len(prompt))
        real_slots.append(slice(start, start + len(prompt)))
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values."):
            feeds[spec.name] = np.zeros([batch, *spec.shape[1:]], dtype=np.float32)

    outputs = session.run(None, feeds)
    prefill_diff, decode_diff, top1 = 0.0, 0.0, True
    sequences = [list(p) for p in prompts]
    next_tokens = []
    for row, prompt in enumerate(prompts):
        expected = eager_logits(reference_model, prompt)
        got = outputs[0][row, real_slots[row]]
        prefill_diff = max(prefill_diff, float(np.abs(got - expected).max()))
        top1 &= bool((got.argmax(-1) == expected.argmax(-1)).all())
        next_tokens.append(int(expected[-1].argmax()))
    for _ in range(decode_steps):
        for name, value in zip(output_names[1:], outputs[1:]):
            feeds[name.replace("present.", "past_key_values.")] = value
        for row in range(batch):
            sequences[row].append(next_tokens[row])
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        feeds["input_ids"] = np.array([[t] for t in next_tokens], dtype=np.int64)
        feeds["attention_mask"] = mask
        feeds["position_ids"] = np.array([[len(s) - 1] for s in sequences], dtype=np.int64)
        outputs = session.run(None, feeds)
        for row in range(batch):
            expected = eager_logits(reference_model, sequences[row])[-1]
            got = outputs[0][row, 0]
            decode_diff = max(decode_diff, float(np.abs(got - expected).max()))
            top1 &= int(got.argmax()) == int(expected.argmax())
            next_tokens[row] = int(expected.argmax())
    return {"stage": f"ort_batch_{side}_padding", "batch": batch, "prompt_lengths": [len(p) for p in prompts],
            "decode_steps": decode_steps, "prefill_max_abs_diff": prefill_diff, "decode_max_abs_diff": decode_diff,
            "top1_agreement": top1,
            "passed": max(prefill_diff, decode_diff) <= max_abs_diff and top1}
