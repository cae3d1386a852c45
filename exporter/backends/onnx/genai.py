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
import onnxruntime_genai as og


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

        GenAI 0.18 never feeds a turn's last generated token to the model (its next step would). After an
        ordinary token its count already includes that token, so ``append_tokens`` would start one slot later and
        leave the slot unwritten but inside the attention mask; after an eos the count stops before it. Either way
        the next turn goes to the slot of that unfed token (rewinding when the count passed it) and appends the
        token again in front of its ids, so the model sees the whole conversation (measured: appending after an
        eos as-is drops the eos, tiny-smollm3's next token then differs from eager's by a 0.30 margin; rewinding
        after an eos drops the reply's last real token).

        State models (``genai_state_model``): GenAI's recurrent state rewinds only to a snapshot, and a snapshot
        taken after a generated token is labelled one token later than the state it holds (measured). So each turn
        snapshots right after its ``append_tokens`` (state and count agree there), and the next turn rewinds to
        that snapshot and appends the previous reply with its ids. LFM2's conv-only cache cannot rewind at all
        (``continuation_blocker``)."""
        generator = og.Generator(self.model, self._params(self.context_length))
        eos = _config_eos(self.config)
        state = genai_state_model(self.config)
        replies, mark, fed = [], 0, 0  # fed: tokens the model has seen
        for ids, budget in zip(turns, budgets):
            ids = [int(t) for t in ids]
            if replies and replies[-1] and state:
                generator.rewind_to(mark)
            elif replies and replies[-1]:
                fed += len(replies[-1]) - 1
                if generator.token_count() > fed:
                    generator.rewind_to(fed)
            if replies and replies[-1]:
                ids = next_turn_ids(replies[-1], ids, state)
            generator.append_tokens(np.asarray([ids], dtype=np.int32))
            fed += len(ids)
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


def next_turn_ids(reply: list[int], ids: list[int], state: bool) -> list[int]:
    """What ``GenAIModel.chat`` appends for a next turn ``ids`` after ``reply``: a state model (rewound to its
    snapshot after the previous prompt) gets the whole reply again, any other the reply's unfed last token."""
    return (reply if state else reply[-1:]) + ids


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
