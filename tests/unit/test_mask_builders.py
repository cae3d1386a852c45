"""Property tests: the export-safe mask builders against transformers' own reference code path, element for element.

The reference is always transformers' code: ``sdpa_mask(..., use_vmap=True, allow_is_causal_skip=False)`` for
boolean masks and ``eager_mask(..., use_vmap=True)`` for additive masks, evaluated on transformers' own mask
functions. Our builders are called with the exact keyword arguments transformers' mask creators pass (including
``use_vmap=True``, ``allow_is_causal_skip=True``, ``local_size``), on transformers' mask functions and on ours.

The second half goes through transformers' public creators (``create_causal_mask`` & co.) with a config whose
``_attn_implementation`` is "export_safe", against the same calls with "sdpa", "eager" and a vmap reference.

``MASK_PROPERTY_EXAMPLES`` (environment) raises the example counts for a deeper local run.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import Gemma3TextConfig, LlamaConfig, Llama4TextConfig, MistralConfig
from transformers import masking_utils as mu
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.models.gemma3.modeling_gemma3 import _bidirectional_window_overlay as gemma3_window_overlay

import attention
import masks
from exporter.checkpoint import LayerSpec
from exporter.cli.masks import SlotCache, SlotLayer
from tests.conftest import vmap_reference

EXAMPLES = int(os.environ.get("MASK_PROPERTY_EXAMPLES", "0")) or None
SETTINGS = settings(
    max_examples=EXAMPLES or 200, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
FULL_PATH_SETTINGS = settings(
    max_examples=EXAMPLES or 150, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
NAME = "export_safe"
VMAP_REFERENCE = "test_vmap_reference"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module", autouse=True)
def registered():
    masks.register(NAME)
    attention.register(NAME)
    mu.AttentionMaskInterface.register(VMAP_REFERENCE, vmap_reference)
    assert mu.ALL_MASK_ATTENTION_FUNCTIONS[NAME] is masks.bool_mask


def reference_bool(batch, q_len, kv_len, q_offset, kv_offset, fn, attention_mask):
    return mu.sdpa_mask(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=q_offset, kv_offset=kv_offset,
                        mask_function=fn, attention_mask=attention_mask, allow_is_causal_skip=False, use_vmap=True)


def reference_float(batch, q_len, kv_len, q_offset, kv_offset, fn, attention_mask, dtype):
    return mu.eager_mask(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=q_offset, kv_offset=kv_offset,
                         mask_function=fn, attention_mask=attention_mask, dtype=dtype, use_vmap=True)


# ---------------------------------------------------------------- random cases


@st.composite
def padding_masks(draw, batch: int, length: int):
    """A [batch, length] bool mask, each row left- and/or right-padded, or (rarely) with arbitrary holes."""
    rows = []
    for _ in range(batch):
        if draw(st.integers(0, 9)) == 0:
            rows.append(draw(st.lists(st.booleans(), min_size=length, max_size=length)))
            continue
        left = draw(st.integers(0, length))
        right = draw(st.integers(0, length - left))
        rows.append([False] * left + [True] * (length - left - right) + [False] * right)
    return torch.tensor(rows, dtype=torch.bool).view(batch, length)


PATTERNS = ("causal", "sliding", "chunked", "bidirectional", "bidirectional_sliding", "blocks_or_causal",
            "gemma3_sliding_blocks", "gemma3_bidirectional_window", "constant_or", "chunked_blocks")


@st.composite
def mask_cases(draw, patterns=PATTERNS):
    """Sizes, offsets (int or tensor), a padding mask (or none) and a pattern as (transformers fn, our predicate)."""
    batch = draw(st.integers(1, 3))
    q_len = draw(st.integers(1, 6))
    q_start = draw(st.integers(0, 8))
    kv_offset = draw(st.integers(0, 4))
    kv_len = draw(st.integers(1, 12))
    positions = max(q_start + q_len, kv_offset + kv_len)  # every absolute position a query or key can hold
    mask_len = draw(st.integers(1, kv_offset + kv_len + 2))  # shorter (static cache) or longer than the keys
    attention_mask = draw(padding_masks(batch, mask_len)) if draw(st.booleans()) else None
    window, chunk = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    pattern = draw(st.sampled_from(patterns))
    block_len = draw(st.integers(1, positions))
    block_ids = torch.tensor(draw(st.lists(st.integers(-1, 2), min_size=batch * block_len,
                                           max_size=batch * block_len))).view(batch, block_len)
    theirs, ours = pattern_functions(pattern, window, chunk, attention_mask, batch, block_ids, positions)
    q_offset = torch.tensor(q_start) if draw(st.booleans()) else q_start
    kv_off = torch.tensor(kv_offset) if draw(st.booleans()) else kv_offset
    return dict(batch=batch, q_len=q_len, kv_len=kv_len, q_offset=q_offset, kv_offset=kv_off, theirs=theirs,
                ours=ours, attention_mask=attention_mask, pattern=pattern, window=window, chunk=chunk)


def pattern_functions(pattern, window, chunk, attention_mask, batch, block_ids, positions):
    """(transformers' mask function, the predicate our builder is given) for one pattern, built as the creators
    build it. transformers passes its own predicates to the registered builder, so both are the same function:
    what is tested is the builder (broadcast evaluation, padding, offsets), not a copy of the predicates."""
    if attention_mask is not None:  # exactly how create_chunked_causal_mask counts left padding
        left_padding = (attention_mask.cumsum(dim=-1) == torch.zeros_like(attention_mask)).sum(dim=-1)
    else:
        left_padding = torch.zeros(batch, dtype=torch.long)
    # transformers right-pads block ids with -1 up to the cache length (maybe_pad_block_sequence_ids)
    padded_ids = F.pad(block_ids, (0, positions - block_ids.shape[-1]), value=-1)
    blocks = mu.blockwise_overlay(padded_ids)
    functions = {
        "causal": lambda: mu.causal_mask_function,
        "sliding": lambda: mu.sliding_window_causal_mask_function(window),
        "chunked": lambda: mu.chunked_causal_mask_function(chunk, left_padding),
        "bidirectional": lambda: mu.bidirectional_mask_function,
        "bidirectional_sliding": lambda: mu.sliding_window_bidirectional_mask_function(window),
        # create_causal_mask(block_sequence_ids=...)
        "blocks_or_causal": lambda: mu.or_masks(mu.causal_mask_function, blocks),
        # Gemma 3 image tokens on sliding layers: AND(window, OR(causal, blocks))
        "gemma3_sliding_blocks": lambda: mu.and_masks(mu.or_masks(mu.causal_mask_function, blocks),
                                                      mu.sliding_window_overlay(window)),
        # Gemma 3 use_bidirectional_attention, sliding layers
        "gemma3_bidirectional_window": lambda: mu.or_masks(mu.sliding_window_causal_mask_function(window),
                                                           gemma3_window_overlay(window)),
        # Gemma 3 use_bidirectional_attention, full layers: OR(causal, tensor(True))
        "constant_or": lambda: mu.or_masks(mu.causal_mask_function, lambda *args: torch.tensor(True, dtype=torch.bool)),
        # create_chunked_causal_mask(block_sequence_ids=...)
        "chunked_blocks": lambda: mu.or_masks(mu.chunked_causal_mask_function(chunk, left_padding), blocks),
    }
    function = functions[pattern]()
    return function, function


def interface_kwargs(case, **extra):
    """The keyword arguments a transformers mask creator passes to the registered mask interface."""
    local_size = {"sliding": case["window"], "chunked": case["chunk"], "bidirectional_sliding": case["window"]}
    kwargs = dict(batch_size=case["batch"], q_length=case["q_len"], kv_length=case["kv_len"],
                  q_offset=case["q_offset"], kv_offset=case["kv_offset"], attention_mask=case["attention_mask"],
                  allow_is_causal_skip=True, allow_is_bidirectional_skip=True,
                  local_size=local_size.get(case["pattern"]), dtype=torch.float32, config=None, use_vmap=True,
                  device=torch.device("cpu"))
    kwargs.update(extra)
    return kwargs


def sizes(case):
    return case["batch"], case["q_len"], case["kv_len"], case["q_offset"], case["kv_offset"]


# ---------------------------------------------------------------- builders vs transformers' reference


@SETTINGS
@given(case=mask_cases())
def test_registered_bool_mask_matches_transformers(case):
    """The registered interface, called as the creators call it, on transformers' mask functions and on ours."""
    expected = reference_bool(*sizes(case), case["theirs"], case["attention_mask"])
    builder = mu.ALL_MASK_ATTENTION_FUNCTIONS[NAME]
    for use_vmap in (True, False):
        got = builder(mask_function=case["theirs"], **interface_kwargs(case, use_vmap=use_vmap))
        assert got is not None and got.dtype == torch.bool
        assert got.shape == expected.shape == (case["batch"], 1, case["q_len"], case["kv_len"])
        assert torch.equal(got, expected)
    ours = masks.bool_mask(*sizes(case), mask_function=case["ours"], attention_mask=case["attention_mask"])
    assert torch.equal(ours, expected)


@SETTINGS
@given(case=mask_cases(), dtype=st.sampled_from(DTYPES))
def test_additive_mask_matches_eager_mask(case, dtype):
    """Float masks: 0 where attending, finfo(dtype).min elsewhere, exactly as transformers' eager_mask."""
    expected = reference_float(*sizes(case), case["theirs"], case["attention_mask"], dtype)
    for fn in (case["theirs"], case["ours"]):
        got = masks.additive_mask(mask_function=fn, **interface_kwargs(case, dtype=dtype))
        assert got.dtype == dtype and torch.equal(got, expected)
    as_bool = masks.bool_mask(*sizes(case), mask_function=case["ours"], attention_mask=case["attention_mask"])
    assert torch.equal(masks.to_additive(as_bool, dtype), expected)
    assert torch.isfinite(expected).all()


@st.composite
def ring_cases(draw):
    """A ring-buffer layout: KV slots each holding one absolute position (any order, possibly repeated)."""
    case = draw(mask_cases())
    span = case["kv_len"] + int(case["kv_offset"])  # positions 0 .. span-1 exist in the reference
    span = max(span, int(case["q_offset"]) + case["q_len"])
    slots = draw(st.integers(1, 8))
    slot_positions = torch.tensor(draw(st.lists(st.integers(0, span - 1), min_size=slots, max_size=slots)))
    return case, span, slot_positions


@SETTINGS
@given(ring=ring_cases(), dtype=st.sampled_from(DTYPES))
def test_ring_buffer_kv_offset(ring, dtype):
    """1D ``kv_offset [KV]``: slot i holds position i + kv_offset[i]; the mask is the reference's column for it."""
    case, span, slot_positions = ring
    batch, q_len, q_offset = case["batch"], case["q_len"], case["q_offset"]
    absolute = reference_bool(batch, q_len, span, q_offset, 0, case["theirs"], case["attention_mask"])
    expected = absolute[..., slot_positions]
    kv_offset = slot_positions - torch.arange(len(slot_positions))
    for fn in (case["theirs"], case["ours"]):
        got = masks.bool_mask(batch, q_len, len(slot_positions), q_offset, kv_offset, fn, case["attention_mask"],
                              allow_is_causal_skip=True, use_vmap=True)
        assert torch.equal(got, expected)
    additive = masks.additive_mask(batch, q_len, len(slot_positions), q_offset, kv_offset, case["ours"],
                                   case["attention_mask"], dtype=dtype)
    assert torch.equal(additive, reference_float(batch, q_len, span, q_offset, 0, case["theirs"],
                                                 case["attention_mask"], dtype)[..., slot_positions])


def _refuse(*args, **kwargs):
    raise AssertionError("a mask builder read tensor data in Python")


@settings(max_examples=EXAMPLES or 40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mask_cases(), dtype=st.sampled_from(DTYPES))
def test_builders_never_read_tensor_values(case, dtype):
    """No .item()/.all()/.any()/.tolist()/bool()/int() on data anywhere in the builders or our predicates."""
    expected = reference_bool(*sizes(case), case["theirs"], case["attention_mask"])
    patches = [mock.patch.object(torch.Tensor, name, _refuse)
               for name in ("item", "all", "any", "tolist", "__bool__", "__int__", "__float__", "nonzero")]
    for patch in patches:
        patch.start()
    try:
        got = masks.bool_mask(mask_function=case["ours"], **interface_kwargs(case))
        got_theirs = masks.bool_mask(mask_function=case["theirs"], **interface_kwargs(case))
        additive = masks.additive_mask(mask_function=case["ours"], **interface_kwargs(case, dtype=dtype))
    finally:
        for patch in patches:
            patch.stop()
    assert torch.equal(got, expected) and torch.equal(got_theirs, expected)
    assert torch.equal(additive, masks.to_additive(expected, dtype))


def test_pure_causal_is_materialised_where_sdpa_skips():
    """Where transformers' sdpa_mask returns None (is_causal skip), the builder still returns the full mask."""
    for q_len, kv_len in ((1, 1), (4, 4), (1, 7)):
        assert mu.sdpa_mask(1, q_len, kv_len, q_offset=kv_len - q_len, mask_function=mu.causal_mask_function) is None
        got = masks.bool_mask(1, q_len, kv_len, q_offset=kv_len - q_len, allow_is_causal_skip=True, use_vmap=False)
        expected = reference_bool(1, q_len, kv_len, kv_len - q_len, 0, mu.causal_mask_function, None)
        assert torch.equal(got, expected)
    assert mu.sdpa_mask(1, 3, 3, mask_function=mu.bidirectional_mask_function, allow_is_bidirectional_skip=True) is None
    assert masks.bool_mask(1, 3, 3, mask_function=mu.bidirectional_mask_function,
                           allow_is_bidirectional_skip=True).all()


def test_padding_reads_positions_outside_the_mask_as_padding():
    """Ring-buffer slots carry absolute positions, some before 0 (never written) or past the 2D mask: the padding
    predicate must treat them as padding, where transformers' ``padding_mask_function`` would index out of range."""
    attention_mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    kv_offset = torch.tensor([-3, -3, 1, 1, 1, 1])  # slots hold positions -3, -2, 3, 4, 5, 6
    got = masks.bool_mask(1, 2, 6, q_offset=3, kv_offset=kv_offset, attention_mask=attention_mask)
    # queries at positions 3 and 4; only position 3 is both real (inside the mask) and causal for both
    assert got[0, 0].tolist() == [[False, False, True, False, False, False], [False, False, True, False, False, False]]


# ---------------------------------------------------------------- full path: transformers' mask creators

SMALL = dict(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=16,
             intermediate_size=8)


def make_config(family: str, window: int, chunk: int):
    """A tiny real config of a family whose layers use the mask pattern under test."""
    if family == "llama":
        return LlamaConfig(num_hidden_layers=2, **SMALL)
    if family == "gemma3":  # sliding + full layers (hybrid cache)
        return Gemma3TextConfig(num_hidden_layers=2, sliding_window=window,
                                layer_types=["sliding_attention", "full_attention"], **SMALL)
    if family == "llama4":  # chunked + full layers, chunks start at each row's first real token
        return Llama4TextConfig(num_hidden_layers=2, attention_chunk_size=chunk,
                                layer_types=["chunked_attention", "full_attention"], **SMALL)
    if family == "mistral":  # every layer sliding, no layer_types
        return MistralConfig(num_hidden_layers=2, sliding_window=window, **SMALL)
    raise AssertionError(family)


CREATORS = {
    "llama": (mu.create_causal_mask, mu.create_bidirectional_mask),
    "gemma3": (mu.create_causal_mask, mu.create_sliding_window_causal_mask, mu.create_bidirectional_mask,
               mu.create_bidirectional_sliding_window_mask),
    "llama4": (mu.create_causal_mask, mu.create_chunked_causal_mask, mu.create_bidirectional_mask),
    "mistral": (mu.create_sliding_window_causal_mask, mu.create_bidirectional_sliding_window_mask),
}
BIDIRECTIONAL = (mu.create_bidirectional_mask, mu.create_bidirectional_sliding_window_mask)


INVALID_POSITION = -(1 << 30)  # a never-written ring slot


class RingLayer(SlotLayer):
    """A ring of ``window`` slots (the positions before this forward, slot ``p % window``) followed by this
    forward's keys; ``get_mask_sizes`` gives per-key offsets (1D ``kv_offset``), as a ring-buffer export does."""

    def __init__(self, window: int, positions: torch.Tensor):
        super().__init__(window + len(positions), positions, sliding=True)
        self.window = window

    def key_positions(self) -> torch.Tensor:
        ring = masks.ring_slot_positions(self.positions[0], self.window, INVALID_POSITION)
        return torch.cat([ring, self.positions])

    def get_mask_sizes(self, query_length: int):
        length = self.window + query_length
        return length, self.key_positions() - torch.arange(length)


def make_cache(kind, config, batch, past, max_len, q_len, window=None):
    """A cache holding ``past`` tokens: none, transformers' dynamic or static cache, static slots or a ring."""
    if kind == "none":
        return None
    positions = torch.arange(past, past + q_len)
    layer_types = ["sliding_attention"] * config.num_hidden_layers
    if kind == "slots":  # what the exported programs use for full layers: every slot in the mask, tensor q_offset
        types = getattr(config, "layer_types", None) or layer_types
        return SlotCache(tuple(LayerSpec(kind, kind, window) for kind in types), max_len, positions)
    if kind == "ring":
        return Cache(layers=[RingLayer(window, positions) for _ in layer_types])
    cache = DynamicCache(config=config) if kind == "dynamic" else StaticCache(config=config, max_cache_len=max_len)
    if past:
        for layer in range(config.num_hidden_layers):
            cache.update(torch.zeros(batch, 1, past, 4), torch.zeros(batch, 1, past, 4), layer)
    return cache


def call(config, implementation, creator, **kwargs):
    config._attn_implementation = implementation
    return creator(config=config, **kwargs)


@st.composite
def creator_cases(draw):
    family = draw(st.sampled_from(sorted(CREATORS)))
    config = make_config(family, window=draw(st.integers(1, 5)), chunk=draw(st.integers(1, 5)))
    creator = draw(st.sampled_from(CREATORS[family]))
    batch, q_len = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    cache_kind = draw(st.sampled_from(["none", "dynamic", "static", "slots"]))
    past = 0 if cache_kind == "none" else draw(st.integers(0, 6))
    max_len = past + q_len + draw(st.integers(0, 3))
    cache = make_cache(cache_kind, config, batch, past, max_len, q_len)
    positions = torch.arange(past, past + q_len)
    kwargs = dict(inputs_embeds=torch.zeros(batch, q_len, 1, dtype=draw(st.sampled_from(DTYPES))), cache=cache)
    packed = cache is None and creator not in BIDIRECTIONAL and draw(st.integers(0, 3)) == 0
    if packed:  # several sequences in one row (no cache, no 2D mask): transformers remaps positions
        starts = sorted(draw(st.sets(st.integers(1, max(q_len - 1, 1)), max_size=2)))
        bounds = zip([0, *starts], [*starts, q_len])
        pos = torch.cat([torch.arange(end - start) for start, end in bounds if end > start])
        kwargs.update(attention_mask=None, position_ids=pos[None].expand(batch, -1))
    else:
        use_mask = draw(st.booleans())
        kwargs["attention_mask"] = draw(padding_masks(batch, past + q_len)).long() if use_mask else None
        if creator not in BIDIRECTIONAL:
            kwargs["position_ids"] = positions[None].expand(batch, -1)
    overlay = draw(st.sampled_from(["none", "or", "and", "blocks"]))
    if overlay == "or":  # Gemma 3 style bidirectional window on top of the base pattern
        kwargs["or_mask_function"] = gemma3_window_overlay(draw(st.integers(1, 3)))
    elif overlay == "and":
        kwargs["and_mask_function"] = mu.sliding_window_overlay(draw(st.integers(1, 4)))
    elif overlay == "blocks" and creator not in BIDIRECTIONAL:
        ids = draw(st.lists(st.integers(-1, 1), min_size=past + q_len, max_size=past + q_len))
        kwargs["block_sequence_ids"] = torch.tensor([ids] * batch)
    return family, config, creator, kwargs


@FULL_PATH_SETTINGS
@given(case=creator_cases())
def test_transformers_creators_with_export_safe(case):
    """create_*_mask with "export_safe" == the same call with "sdpa" (materialised where it skips) and "eager"."""
    family, config, creator, kwargs = case
    ours = call(config, NAME, creator, **kwargs)
    reference = call(config, VMAP_REFERENCE, creator, **kwargs)
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.bool and ours.ndim == 4
    assert reference is not None and ours.shape == reference.shape
    assert torch.equal(ours, reference), f"{family} {creator.__name__}"

    sdpa = call(config, "sdpa", creator, **kwargs)
    event(f"{creator.__name__}: sdpa {'skipped' if sdpa is None else 'materialised'}")
    if sdpa is not None:
        assert torch.equal(ours, sdpa)
    else:  # what SDPA then computes: no mask (one query / bidirectional) or is_causal's upper-left triangle
        _, _, q_len, kv_len = ours.shape
        if creator in BIDIRECTIONAL or q_len == 1:
            implied = torch.ones(q_len, kv_len, dtype=torch.bool)
        else:
            implied = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
        assert torch.equal(ours, implied.expand_as(ours))

    eager = call(config, "eager", creator, **kwargs)
    dtype = kwargs["inputs_embeds"].dtype
    event(f"{creator.__name__}: eager {'skipped' if eager is None else 'materialised'}")
    if eager is None:  # plain bidirectional without padding: eager adds no bias at all
        assert creator in BIDIRECTIONAL and ours.all()
    else:
        assert eager.dtype == dtype and torch.equal(masks.to_additive(ours, dtype), eager)


def test_creators_under_a_static_cache_get_a_tensor_q_offset():
    """The static-cache path really hands the builder a tensor ``q_offset`` (and the builder copes)."""
    config = make_config("llama", 2, 2)
    cache = make_cache("static", config, 1, 3, 8, 2)
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return masks.bool_mask(**kwargs)

    mu.AttentionMaskInterface.register("test_spy", spy)
    mask = call(config, "test_spy", mu.create_causal_mask, inputs_embeds=torch.zeros(1, 2, 1), attention_mask=None,
                cache=cache, position_ids=torch.arange(3, 5)[None])
    assert isinstance(seen["q_offset"], torch.Tensor) and int(seen["q_offset"]) == 3
    assert mask.shape == (1, 1, 2, 8)
    assert torch.equal(mask[0, 0].sum(-1), torch.tensor([4, 5]))


@st.composite
def ring_creator_cases(draw):
    family = draw(st.sampled_from(["gemma3", "mistral", "llama4"]))
    config = make_config(family, window=draw(st.integers(1, 5)), chunk=draw(st.integers(1, 5)))
    creator = mu.create_chunked_causal_mask if family == "llama4" else mu.create_sliding_window_causal_mask
    batch, q_len, past = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(0, 8))
    ring = make_cache("ring", config, batch, past, None, q_len, window=draw(st.integers(1, 6)))
    kwargs = dict(inputs_embeds=torch.zeros(batch, q_len, 1), position_ids=torch.arange(past, past + q_len)[None])
    kwargs["attention_mask"] = draw(padding_masks(batch, past + q_len)).long() if draw(st.booleans()) else None
    overlay = draw(st.sampled_from(["none", "or", "and"]))
    if overlay == "or":
        kwargs["or_mask_function"] = gemma3_window_overlay(draw(st.integers(1, 3)))
    elif overlay == "and":
        kwargs["and_mask_function"] = mu.sliding_window_overlay(draw(st.integers(1, 4)))
    return config, creator, ring, past, q_len, kwargs


@FULL_PATH_SETTINGS
@given(case=ring_creator_cases())
def test_transformers_creators_over_a_ring_buffer_cache(case):
    """Sliding/chunked creators over a ring cache whose ``get_mask_sizes`` gives per-key offsets ``[W + S]``:
    each key's column is transformers' mask at that key's absolute position; never-written slots are masked."""
    config, creator, ring, past, q_len, kwargs = case
    ours = call(config, NAME, creator, cache=ring, **kwargs)
    slots = make_cache("slots", config, 0, past, past + q_len, q_len)  # slot i = position i, all positions
    absolute = call(config, VMAP_REFERENCE, creator, cache=slots, **kwargs)
    key_positions = ring.layers[0].key_positions()
    expected = absolute[..., key_positions.clamp(min=0)] & (key_positions >= 0)
    assert ours.shape == expected.shape and torch.equal(ours, expected)


@SETTINGS
@given(next_position=st.integers(0, 40), window=st.integers(1, 9), as_tensor=st.booleans())
def test_ring_slot_positions(next_position, window, as_tensor):
    """Slot s of a ring holds the last written position p with p % window == s (never written: invalid)."""
    expected = [max((p for p in range(next_position) if p % window == slot), default=INVALID_POSITION)
                for slot in range(window)]
    start = torch.tensor(next_position) if as_tensor else next_position
    assert masks.ring_slot_positions(start, window, INVALID_POSITION).tolist() == expected
