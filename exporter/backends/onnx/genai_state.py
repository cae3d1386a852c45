"""``genai_config.json`` for decoders with state layers: the contract ONNX Runtime GenAI 0.18's model builder
uses for the families it covers (``onnxruntime_genai/models/builders/{lfm2,qwen}.py``; see
``exporter.backends.onnx.genai``'s notes for what the runtime reads), and for the others no config but the reason
in the graph's metadata (``genai``).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from exporter.backends.onnx.genai import UNSUPPORTED_KEY, genai_config
from exporter.cache import has_state

# model types whose state layers follow a GenAI builder contract -> the genai_config ``model.type``
GENAI_STATE_FAMILIES = {"lfm2": "lfm2", "qwen3_5_text": "qwen3_5_text"}


def genai_unsupported(model_type: str, plan) -> str | None:
    """Why ONNX Runtime GenAI cannot run a folder of ``model_type`` with cache plan ``plan`` (None: it can)."""
    if not has_state(plan):
        return None
    if model_type not in GENAI_STATE_FAMILIES:
        return (f"ONNX Runtime GenAI 0.18 has no contract for the state layers of {model_type} (its model builder "
                f"covers {', '.join(sorted(GENAI_STATE_FAMILIES))}); the folder runs on plain onnxruntime with the "
                "graph I/O documented in docs/hybrids.md")
    return None


def write_genai_config(folder: Path, checkpoint, plan, max_seq_len: int, share_buffer: bool = True) -> dict:
    """Write ``folder/genai_config.json`` for the exported decoder with cache plan ``plan`` (``genai_config``,
    plus the state contract for GenAI's state families); for a folder GenAI cannot run, write the reason into the
    graph's metadata instead. Returns build details (``{}`` for attention-only plans)."""
    reason = genai_unsupported(checkpoint.model_type, plan)
    if reason is not None:
        graph_path = folder / "model.onnx"
        graph = onnx.load(str(graph_path), load_external_data=False)
        entry = next((p for p in graph.metadata_props if p.key == UNSUPPORTED_KEY), None) or graph.metadata_props.add()
        entry.key, entry.value = UNSUPPORTED_KEY, reason
        onnx.save(graph, str(graph_path))
        return {"genai": f"no genai_config.json: {reason}"}
    kv = next(layer for layer in plan if layer.has_kv)
    ids = checkpoint.special_ids
    config = genai_config(checkpoint.config, max_seq_len, len(plan), kv.key_shape[1], kv.key_shape[3], ids.bos,
                          ids.eos, ids.pad, share_buffer=share_buffer)
    details = {}
    if has_state(plan):
        _add_state_contract(config, checkpoint.model_type, plan)
        details["genai"] = f"genai_config.json, model.type {config['model']['type']} (GenAI's state contract)"
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return details


def _add_state_contract(config: dict, model_type: str, plan) -> None:
    """The state entries of GenAI's builder contract for ``model_type`` (see the module notes)."""
    model, decoder = config["model"], config["model"]["decoder"]
    model["type"] = GENAI_STATE_FAMILIES[model_type]
    states = [layer.state for layer in plan if layer.state is not None]
    kinds = ["conv"] + (["recurrent"] if any(state.recurrent_shape is not None for state in states) else [])
    for kind in kinds:
        decoder["inputs"][f"past_{kind}_names"] = f"past.%d.{kind}"
        decoder["outputs"][f"present_{kind}_names"] = f"present.%d.{kind}"
    if kinds == ["conv"]:  # GenAI's LFM2Cache
        decoder["layer_types"] = [layer.type for layer in plan]
        decoder["conv_cache_size"] = states[0].conv_shape[-1]
