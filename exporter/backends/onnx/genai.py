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
from exporter.generation import EagerSession, greedy_generate
from exporter.verification.plan import RUNNER_PROMPTS, runner_prompt_ids


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


def verify_genai(folder, reference_model, tokenizer, eos_ids, max_new_tokens: int, session_factory,
                 threads: int | None = None, batch_window: int | None = None) -> dict:
    """Greedy generation with ONNX Runtime GenAI vs eager greedy tokens of ``reference_model``, token for token.

    Each prompt runs alone (batch 1), then all together as one right-padded batch. Both sides stop after an eos:
    eager after any of ``eos_ids``, GenAI after its ``genai_config.json`` eos (a mismatch between the two fails).
    The prompt ids are the transformers tokenizer's; ``genai_tokenizer`` reports (without grading) whether GenAI's
    own tokenizer produces the same ids.

    A float16 graph, or one whose MatMulNBits quantize activations to int8 (``accuracy_level`` 4), is graded against
    its own greedy tokens through plain onnxruntime (``session_factory(path)``, a step session) instead: such rounding breaks near-ties
    differently from any eager model (measured: tiny-qwen2 float16 diverged from float16-rounded eager at the 8th
    token while every teacher-forced logit agreed to 2e-3; tiny-gemma2 int4 at the 11th token, one activation on an
    int8 rounding boundary), so this checks GenAI's loop on the verified graph; the logits were graded against the
    matched reference.

    ``batch_window``: the model's sliding window / chunk, if any. The padded-batch check is then skipped (and
    says so): GenAI right-pads shorter rows, and the cache applies windows over slots, so a padded row's window
    holds fewer real tokens than eager's; batch-1 generation is exact.
    """
    model = GenAIModel(folder, threads)
    vocab_size = reference_model.config.get_text_config().vocab_size
    # at most half the context, so every prompt leaves room to generate
    prompts = [p[: max(1, model.context_length // 2)] for p in runner_prompt_ids(tokenizer, vocab_size)]
    eos = set(int(t) for t in eos_ids)
    expected_from = "eager greedy of the reference model"
    graph = Path(folder) / model.config["model"]["decoder"]["filename"]
    rounding = _rounding_kernels(graph)
    if rounding:
        session = session_factory(graph)
        expected_from = f"greedy of the same graph through plain onnxruntime ({rounding})"
    else:
        session = EagerSession(reference_model)

    def greedy(ids, budget):
        return greedy_generate(session, ids, budget, eos)["tokens"]
    expected, actual, timings = [], [], []
    for ids in prompts:
        budget = min(max_new_tokens, model.context_length - len(ids))
        expected.append(greedy(ids, budget))
        result = model.generate(ids, budget)
        actual.append(result["tokens"])
        timings.append({k: result[k] for k in ("prefill_s", "prefill_tokens_per_s", "decode_s",
                                               "decode_tokens_per_s")})
    stage = {"stage": "genai_generate", "prompts": prompts, "expected": expected, "actual": actual,
             "expected_from": expected_from, "timings": timings, "load_s": model.load_s}
    passed = actual == expected
    if len(prompts) > 1 and batch_window is not None:
        stage["batch"] = {"skipped": f"windowed layers ({batch_window}): padded rows would see fewer real tokens "
                                     "in their window than eager"}
    elif len(prompts) > 1:
        width = max(len(p) for p in prompts)
        budget = min(max_new_tokens, model.context_length - width)
        try:
            batch = model.generate_batch(prompts, budget)
            batch_expected = [e[:budget] for e in expected]
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
