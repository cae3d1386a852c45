"""Built-in demo models: small configs with seeded random weights and a locally built byte-level tokenizer.

``materialize(name, directory)`` writes a ``save_pretrained`` folder (config, safetensors, tokenizer files) that
is byte-identical on every run, so the rest of the tool loads it exactly as it would load a user's checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import AutoConfig, AutoModelForCausalLM

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3; printable ASCII and merged pairs follow
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

SEED = 20261129


def vocab_size() -> int:
    """Size of the demo tokenizer's vocabulary (specials + newline + printable ASCII + merges)."""
    return len(SPECIAL_TOKENS) + 1 + 95 + len(MERGES)


def _common(**overrides) -> dict:
    base = dict(
        vocab_size=vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
        initializer_range=0.1,
    )
    base.update(overrides)
    return base


def _config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **_common(**overrides))


WINDOW = 8  # sliding window / attention chunk of the built-ins that have one: small, so tests decode past it

# name -> (model_type, config overrides). Shapes are tiny but keep each family's structure: GQA, biases, norms,
# sliding / chunked layer patterns, softcapping, no-rope layers, learned positions, MoE, sinks.
BUILTIN_CONFIGS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("llama", {}),
    "tiny-qwen2": ("qwen2", dict(attention_bias=True)),
    "tiny-qwen3": ("qwen3", {}),
    "tiny-mistral": ("mistral", dict(sliding_window=WINDOW)),
    "tiny-gemma": ("gemma", dict(hidden_act="gelu_pytorch_tanh")),
    "tiny-gemma2": ("gemma2", dict(num_hidden_layers=4, sliding_window=WINDOW, attn_logit_softcapping=50.0,
                                   final_logit_softcapping=30.0, query_pre_attn_scalar=16)),
    "tiny-gemma3": ("gemma3_text", dict(num_hidden_layers=6, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                        layer_types=["sliding_attention"] * 5 + ["full_attention"])),
    "tiny-cohere2": ("cohere2", dict(num_hidden_layers=4, sliding_window=WINDOW,
                                     layer_types=["sliding_attention"] * 3 + ["full_attention"])),
    "tiny-llama4": ("llama4_text", dict(num_hidden_layers=4, attention_chunk_size=WINDOW, num_local_experts=2,
                                        num_experts_per_tok=1, interleave_moe_layer_step=2,
                                        intermediate_size_mlp=128, no_rope_layers=[1, 1, 1, 0])),
    "tiny-smollm3": ("smollm3", dict(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0])),
    "tiny-phi3": ("phi3", {}),
    "tiny-gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "tiny-olmo2": ("olmo2", {}),
    "tiny-granite": ("granite", dict(embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0,
                                     attention_multiplier=0.25)),
    "tiny-starcoder2": ("starcoder2", dict(hidden_act="gelu_pytorch_tanh", sliding_window=None)),
    "tiny-qwen3-moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         decoder_sparse_step=1)),
    "tiny-gpt-oss": ("gpt_oss", dict(num_hidden_layers=4, sliding_window=WINDOW, num_local_experts=4,
                                     num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"] * 2)),
}


def _builder(model_type: str, overrides: dict) -> Callable:
    return lambda: _config(model_type, **overrides)


BUILTINS: dict[str, Callable] = {name: _builder(*spec) for name, spec in BUILTIN_CONFIGS.items()}


def names() -> list[str]:
    """Names accepted after ``builtin:``."""
    return sorted(BUILTINS)


# Common English pairs merged into one token, so the demo tokenizer has multi-character tokens too.
MERGES = [
    ("Ġ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("r", "e"), ("o", "n"), ("Ġ", "a"),
    ("e", "n"), ("a", "t"), ("o", "u"), ("e", "d"), ("h", "a"), ("t", "o"), ("o", "r"), ("i", "t"),
    ("i", "s"), ("h", "i"), ("e", "s"), ("n", "g"), ("Ġt", "he"), ("Ġ", "s"), ("Ġ", "w"), ("l", "l"),
]


def build_tokenizer_json() -> str:
    """A byte-level BPE tokenizer over printable ASCII (plus newline), with a few merges, <pad>/<s>/</s>/<unk>.

    Every token decodes to valid UTF-8 on its own (ExecuTorch's runner hands decoded pieces to Python as str),
    other characters map to <unk>. The post-processor prepends <s>.
    """
    byte_to_char = {b: ch for ch, b in ((c, _byte_of(c)) for c in pre_tokenizers.ByteLevel.alphabet())}
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte in [10, *range(32, 127)]:
        vocab[byte_to_char[byte]] = len(vocab)
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=list(MERGES), unk_token="<unk>", fuse_unk=True))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tokenizer.to_str(pretty=True)


def _byte_of(ch: str) -> int:
    """Inverse of the GPT-2 byte-to-unicode table used by ByteLevel (printable bytes map to themselves)."""
    code = ord(ch)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def materialize(name: str, directory: Path, **config_overrides) -> Path:
    """Write builtin model ``name`` (its config changed by ``config_overrides``, e.g. ``tie_word_embeddings=True``)
    to ``directory`` in save_pretrained layout and return the directory."""
    config = BUILTINS[name]()
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text(build_tokenizer_json())
    tokenizer_config = {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "add_bos_token": True, "model_max_length": config.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return directory
