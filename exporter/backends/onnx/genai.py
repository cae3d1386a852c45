"""ONNX Runtime GenAI model folders: ``genai_config.json`` for the exported decoder, generation and verification.

Measured with onnxruntime-genai 0.18.0 on this project's graph (static cache: past/present ``[B, KVH, N, D]`` with
``N`` = ``max_seq_len`` fixed in the graph, new entries written at slots ``T-S .. T-1``):

- Required config: ``model.type`` (``decoder`` or ``llama``), ``model.context_length`` (GenAI refuses to start
  without it, and refuses a search ``max_length`` above it), ``vocab_size``, ``bos/eos/pad_token_id``,
  ``decoder.filename``, ``decoder.num_key_value_heads``, ``decoder.num_hidden_layers``; I/O names default to ours.
- GenAI detects the fixed cache length in the graph and allocates one shared past/present buffer of that length,
  whatever ``search.max_length`` and ``past_present_share_buffer`` say. ``context_length`` must therefore not
  exceed the graph's cache length: with a larger one, generation past the cache fails inside the graph
  ("ScatterND ... invalid indice found, indice = N").
- Inputs it feeds: ``input_ids``, ``attention_mask`` ``[B, total_len]`` and ``position_ids`` ``[B, S]``, all int64
  (the graph's dtype; int32 also accepted if mask and positions agree). ``append_tokens`` runs the whole prompt
  in one forward; the first ``generate_next_token`` only picks from those logits; each later one runs one token.
- Batches: ``Tokenizer.encode_batch`` right-pads with ``pad_token_id``; trailing pads get mask 0 and position 0,
  each row's next token gets position = its real length and is written at slot ``T-1`` of the common length.
  Leading pads passed to ``append_tokens`` are *not* detected (mask 1, positions counted through them).
- ``og.Tokenizer.encode`` adds no BOS for the demo tokenizer unless ``update_options(add_special_tokens="true")``.

State layers (``exporter.state_cache``; GenAI 0.18's builder contract, ``models/builders/{lfm2,qwen}.py``): state
handling is driven by ``past_conv_names`` / ``past_recurrent_names`` (``past.%d.conv`` / ``past.%d.recurrent``,
numbered by decoder layer, ``present.%d.*`` out), ``model.type`` must be one GenAI knows, and a conv-only model
(LFM2: GenAI's ``LFM2Cache``) also needs ``decoder.layer_types`` (one per decoder layer) and
``decoder.conv_cache_size`` (K-1). GenAI starts every generator's states at zero. Families its builder has no
contract for get no ``genai_config.json``: the graph's metadata ``genai`` says why, and the folder runs on plain
onnxruntime with the I/O of ``exporter.backends.onnx.lower``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime_genai as og
from onnx import helper

from exporter.errors import first_line
from exporter.generation import EagerSession, compare_greedy, greedy_generate
from exporter.verification.plan import RUNNER_PROMPTS, runner_prompt_ids, runner_texts


def genai_config(config, max_seq_len: int, num_layers: int, kv_heads: int, head_dim: int,
                 bos_id: int | None, eos_ids: list[int], pad_id: int | None, share_buffer: bool = True) -> dict:
    """``genai_config.json`` for ONNX Runtime GenAI: shared-buffer static cache of ``max_seq_len`` slots, or with
    ``share_buffer=False`` the concatenating contract (past ``[B, KVH, P, D]`` in, present ``[B, KVH, P+S, D]`` out).

    ``context_length`` and ``search.max_length`` equal the graph's cache length (see the module notes); for the
    dynamic cache they are the longest sequence the export was checked for.
    """
    text_config = config.get_text_config()
    eos = eos_ids[0] if len(eos_ids) == 1 else list(eos_ids)
    return {
        "model": {
            "type": "decoder",
            "context_length": max_seq_len,
            "vocab_size": int(text_config.vocab_size),
            "bos_token_id": bos_id if bos_id is not None else (eos_ids[0] if eos_ids else 0),
            "eos_token_id": eos,
            "pad_token_id": pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0),
            "decoder": {
                "filename": "model.onnx",
                "head_size": head_dim,
                "hidden_size": int(getattr(text_config, "hidden_size", kv_heads * head_dim)),
                "num_attention_heads": int(getattr(text_config, "num_attention_heads", kv_heads)),
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": num_layers,
                "inputs": {
                    "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value",
                },
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "max_length": max_seq_len, "min_length": 0,
            "past_present_share_buffer": share_buffer, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
            "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "num_return_sequences": 1, "diversity_penalty": 0.0,
        },
    }


UNSUPPORTED_KEY = "genai"  # graph metadata: why ONNX Runtime GenAI cannot run the folder (``genai_state``)


def genai_state_model(config: dict) -> bool:
    """Whether a ``genai_config.json`` describes a decoder with state layers."""
    return "past_conv_names" in config["model"]["decoder"]["inputs"]


class GenAIModel:
    """A GenAI model folder loaded once: greedy generation from token ids or text, with timings."""

    def __init__(self, folder: Path, threads: int | None = None):
        self.folder = Path(folder)
        self.config = json.loads((self.folder / "genai_config.json").read_text())
        self.context_length = int(self.config["model"]["context_length"])
        self.pad_id = int(self.config["model"]["pad_token_id"])
        start = time.perf_counter()
        og_config = og.Config(str(self.folder))
        if threads:
            og_config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(og_config)
        self.load_s = time.perf_counter() - start
        self._tokenizer = None

    @property
    def tokenizer(self):
        """GenAI's own tokenizer (onnxruntime-extensions, reading tokenizer.json / tokenizer_config.json)."""
        if self._tokenizer is None:
            self._tokenizer = og.Tokenizer(self.model)
        return self._tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` with GenAI's tokenizer; ``add_special_tokens`` as in transformers (adds BOS)."""
        self.tokenizer.update_options(add_special_tokens="true" if add_special_tokens else "false")
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32))

    def _params(self, max_length: int, batch_size: int = 1):
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, num_beams=1, max_length=max_length, batch_size=batch_size)
        return params

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> dict:
        """Greedy search (GenAI stops at its configured eos or ``max_new_tokens``); tokens include a final eos.

        ``prefill_s``: ``append_tokens`` (the prompt forward) plus the first pick; ``decode_s``: every later token.
        """
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("empty prompt")
        budget = min(max_new_tokens, self.context_length - len(prompt_ids))
        if budget < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the context "
                             f"({self.context_length})")
        generator = og.Generator(self.model, self._params(len(prompt_ids) + budget))
        start = time.perf_counter()
        generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
        generator.generate_next_token()
        tokens = [int(generator.get_next_tokens()[0])]
        prefill_s = time.perf_counter() - start
        decode_start = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        decode_s = time.perf_counter() - decode_start
        decode_steps = len(tokens) - 1
        return {
            "prompt_tokens": len(prompt_ids),
            "tokens": tokens,
            "finish": "eos" if tokens[-1] in _config_eos(self.config) else "length",
            "prefill_s": prefill_s,
            "prefill_tokens_per_s": len(prompt_ids) / prefill_s if prefill_s > 0 else None,
            "decode_s": decode_s,
            "decode_tokens_per_s": decode_steps / decode_s if decode_steps and decode_s > 0 else None,
        }

    def chat(self, turns: list[list[int]], budgets: list[int]) -> list[list[int]]:
        """Greedy turns on one generator, as a chat app drives GenAI: each turn's ids after the previous turn's
        generated tokens, then up to ``budgets[i]`` tokens (cut after an eos); the tokens per turn.

        GenAI 0.18 never feeds a turn's last generated token to the model (its next step would), and
        ``append_tokens`` after it starts one position later: that slot stays unwritten but inside the attention
        mask (measured: the next turn's tokens part from eager after a few steps). So a next turn first rewinds by
        one token and appends that token again in front of its ids: the model then sees the whole conversation.
        A reply that ended with an eos is different: the generator's count already stops before it and appending
        the next turn's ids as they are gives eager's tokens (measured on SmolLM2-135M: rewinding there drops the
        reply's last real token and the next turn parts from eager at its third token).

        State models (``genai_state_model``): GenAI's recurrent state rewinds only to a snapshot, and a snapshot
        taken after a generated token is labelled one token later than the state it holds (measured). So each turn
        snapshots right after its ``append_tokens`` (state and count agree there), and the next turn rewinds to
        that snapshot and appends the previous reply with its ids. LFM2's conv-only cache cannot rewind at all
        (``continuation_blocker``)."""
        generator = og.Generator(self.model, self._params(self.context_length))
        eos = _config_eos(self.config)
        state = genai_state_model(self.config)
        replies, mark = [], 0
        for ids, budget in zip(turns, budgets):
            ids = [int(t) for t in ids]
            if replies and replies[-1] and state:
                generator.rewind_to(mark)
                ids = replies[-1] + ids
            elif replies and replies[-1] and replies[-1][-1] not in eos:
                generator.rewind_to(generator.token_count() - 1)
                ids = [replies[-1][-1]] + ids
            generator.append_tokens(np.asarray([ids], dtype=np.int32))
            if state:
                generator.snapshot_state()
                mark = generator.token_count()
            reply = []
            while len(reply) < budget and not generator.is_done():
                generator.generate_next_token()
                reply.append(int(generator.get_next_tokens()[0]))
                if reply[-1] in eos:
                    break
            replies.append(reply)
        return replies

    @property
    def continuation_blocker(self) -> str | None:
        """Why this folder's GenAI cannot continue a conversation exactly (None: it can)."""
        if genai_state_model(self.config) and "past_recurrent_names" not in self.config["model"]["decoder"]["inputs"]:
            return ("ONNX Runtime GenAI 0.18 cannot rewind a conv-only (LFM2) cache ('RewindTo is currently not "
                    "supported'), and it never feeds a turn's last generated token, so a next turn on the same "
                    "generator starts one position late")
        if not self.config["search"].get("past_present_share_buffer", True):
            # measured on tiny-mistral with --onnx-cache dynamic: turn 1 and a new sequence equal eager's tokens
            return ("ONNX Runtime GenAI 0.18 cannot rewind a concatenating (dynamic) cache by the one token a next "
                    "turn needs ('Requested length of rewind is greater than the current length')")
        return None

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy search on a right-padded batch (GenAI's own padding convention); new tokens per row, each cut
        after its first eos. Refused when a prompt contains the pad id (GenAI would read it as padding)."""
        if any(self.pad_id in p for p in prompts):
            raise ValueError(f"a prompt contains the pad id {self.pad_id}")
        width = max(len(p) for p in prompts)
        budget = min(max_new_tokens, self.context_length - width)
        if budget < 1:
            raise ValueError(f"longest prompt ({width}) leaves no room in the context ({self.context_length})")
        batch = np.full((len(prompts), width), self.pad_id, dtype=np.int32)
        for row, ids in enumerate(prompts):
            batch[row, : len(ids)] = ids
        generator = og.Generator(self.model, self._params(width + budget, len(prompts)))
        generator.append_tokens(batch)
        while not generator.is_done():
            generator.generate_next_token()
        eos = _config_eos(self.config)
        rows = []
        for row in range(len(prompts)):
            new = [int(t) for t in generator.get_sequence(row)[width:]]
            cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
            rows.append(new[:cut])
        return rows


def _config_eos(config: dict) -> set[int]:
    eos = config["model"]["eos_token_id"]
    return set(eos) if isinstance(eos, list) else {int(eos)}


def generate_genai(folder: Path, prompt: str | list[int], max_new_tokens: int, threads: int | None = None,
                   add_special_tokens: bool = True) -> dict:
    """Greedy generation from a model folder with ONNX Runtime GenAI (for ``run`` and benchmarks).

    ``prompt``: token ids, or text encoded with GenAI's tokenizer (BOS added when ``add_special_tokens``).
    Returns tokens, decoded text, and load / prefill / decode timings.
    """
    model = GenAIModel(folder, threads)
    prompt_ids = model.encode(prompt, add_special_tokens) if isinstance(prompt, str) else list(prompt)
    result = model.generate(prompt_ids, max_new_tokens)
    result["prompt_ids"] = prompt_ids
    result["load_s"] = model.load_s
    eos = _config_eos(model.config)
    result["text"] = model.decode([t for t in result["tokens"] if t not in eos])
    return result


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
    holds fewer real tokens than eager's; batch-1 generation is exact.
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

    def greedy(ids, budget):
        return greedy_generate(session, ids, budget, eos)["tokens"]

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
        expected = greedy(context, budget)
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
