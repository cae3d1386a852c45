"""``export-model masks``: the per-layer-type grids are transformers' masks, bad input is one line and exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Gemma3TextConfig, Llama4TextConfig, MistralConfig
from transformers import masking_utils as mu

import masks
from exporter.cli.masks import NAME, cmd_masks, render_grid

SMALL = dict(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=16,
             intermediate_size=8)
ROW = re.compile(r"^\s*q(\d+)  (.*)$")


def parse(text: str, attend: str = "■") -> dict[str, tuple[list[int], torch.Tensor]]:
    """Section header -> (query positions, bool grid) from the printed view."""
    sections, current = {}, None
    for line in text.splitlines():
        match = ROW.match(line)
        if match and current is not None:
            cells = match.group(2).split(" ")
            sections[current][0].append(int(match.group(1)))
            sections[current][1].append([cell == attend for cell in cells])
        elif line and not line.startswith(" ") and "(layers" in line:
            current = line
            sections[current] = ([], [])
    return {name: (rows, torch.tensor(grid, dtype=torch.bool)) for name, (rows, grid) in sections.items()}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cmd_masks([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reference(fn, prompt_len, offset, attention_mask=None) -> torch.Tensor:
    """transformers' own mask (vmap path) over slots 0..offset+prompt_len-1, as the view lays it out."""
    total = offset + prompt_len
    mask = mu.sdpa_mask(1, prompt_len, total, q_offset=offset, mask_function=fn, attention_mask=attention_mask,
                        allow_is_causal_skip=False, use_vmap=True)
    return mask[0, 0]


@pytest.fixture()
def config_dir(tmp_path):
    """Write a config-only save_pretrained folder (the view needs no weights)."""

    def write(config) -> Path:
        folder = tmp_path / config.model_type
        config.save_pretrained(folder)
        return folder

    return write


def test_builtin_llama_causal_grid(capsys):
    code, out, err = run(capsys, "--model", "builtin:tiny-llama", "--prompt-len", 4, "--offset", 3)
    assert code == 0, err
    sections = parse(out)
    [(header, (rows, grid))] = sections.items()
    assert header.startswith("full_attention (layers 0-1) via create_causal_mask")
    assert rows == [3, 4, 5, 6] and grid.shape == (4, 7)
    assert torch.equal(grid, reference(mu.causal_mask_function, 4, 3))
    assert "matches transformers' eager mask" in out and "DIFFERS" not in out


def test_hybrid_sliding_and_full_layers(capsys, config_dir):
    config = Gemma3TextConfig(num_hidden_layers=3, sliding_window=3,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"], **SMALL)
    code, out, err = run(capsys, "--model", config_dir(config), "--prompt-len", 5, "--offset", 4)
    assert code == 0, err
    sections = parse(out)
    assert len(sections) == 2
    sliding = next(v for k, v in sections.items() if k.startswith("sliding_attention (layers 0, 2)"))
    full = next(v for k, v in sections.items() if k.startswith("full_attention (layers 1)"))
    assert "sliding_window=3" in out
    assert torch.equal(sliding[1], reference(mu.sliding_window_causal_mask_function(3), 5, 4))
    assert torch.equal(full[1], reference(mu.causal_mask_function, 5, 4))
    assert sliding[1].sum(-1).max() == 3  # the window really shows


def test_chunked_layers_with_left_padding(capsys, config_dir):
    config = Llama4TextConfig(num_hidden_layers=2, attention_chunk_size=3,
                              layer_types=["chunked_attention", "full_attention"], **SMALL)
    code, out, err = run(capsys, "--model", config_dir(config), "--prompt-len", 9, "--left-padding", 2)
    assert code == 0, err
    chunked = next(v for k, v in parse(out).items() if k.startswith("chunked_attention"))[1]
    padding = torch.tensor([[False, False] + [True] * 7])
    left = torch.tensor([2])  # chunks start at the first real token (Llama 4)
    fn = mu.chunked_causal_mask_function(3, left)
    assert torch.equal(chunked, reference(fn, 9, 0, padding))
    assert not chunked[:, :2].any() and chunked[4].tolist() == [False] * 2 + [True] * 3 + [False] * 4


def test_sliding_inferred_without_layer_types(capsys, config_dir):
    """Mistral has no layer_types: every layer is sliding when sliding_window is set (as transformers decides)."""
    config = MistralConfig(num_hidden_layers=2, sliding_window=2, **SMALL)
    code, out, err = run(capsys, "--model", config_dir(config), "--prompt-len", 4, "--offset", 1)
    assert code == 0, err
    [(header, (rows, grid))] = parse(out).items()
    assert header.startswith("sliding_attention (layers 0-1) via create_sliding_window_causal_mask")
    assert torch.equal(grid, reference(mu.sliding_window_causal_mask_function(2), 4, 1))


def test_a_mask_that_differs_from_transformers_exits_1(capsys, monkeypatch):
    """If the registered builder ever disagreed with transformers, the view says so and exits 1."""

    def broken(**kwargs):
        return ~masks.builders.bool_mask(**kwargs)

    monkeypatch.setattr(masks, "bool_mask", broken)
    try:
        code, out, _ = run(capsys, "--model", "builtin:tiny-llama", "--prompt-len", 3)
    finally:  # the view registered the broken builder globally: put the real one back for later tests
        monkeypatch.undo()
        masks.register(NAME)
    assert mu.ALL_MASK_ATTENTION_FUNCTIONS[NAME] is masks.bool_mask
    assert code == 1
    assert "DIFFERS from transformers' eager mask" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "builtin:no-such-model"], "unknown builtin model"),
    (["--model", "builtin:tiny-llama", "--prompt-len", "0"], "--prompt-len must be at least 1"),
    (["--model", "builtin:tiny-llama", "--offset", "-1"], "--offset must be >= 0"),
    (["--model", "builtin:tiny-llama", "--prompt-len", "100", "--offset", "100"], "at most 128"),
    (["--model", "builtin:tiny-llama", "--prompt-len", "3", "--left-padding", "3"], "--left-padding must be in"),
    (["--model", "/no/such/folder"], "no such folder"),
    (["--model", "builtin:tiny-llama", "--prompt-len", "x"], "invalid int value"),
    (["--prompt-len", "3"], "--model"),
    (["--model", "builtin:tiny-llama", "--frobnicate"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export-model: error: ") and message in lines[0], err


def test_folder_without_config_and_config_without_window(capsys, tmp_path, config_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "--model", empty)
    assert code == 2 and "no config.json" in err and len(err.strip().splitlines()) == 1
    broken = Gemma3TextConfig(num_hidden_layers=1, layer_types=["sliding_attention"], **SMALL)
    broken.sliding_window = None
    code, _, err = run(capsys, "--model", config_dir(broken))
    assert code == 2 and "sliding_window" in err and len(err.strip().splitlines()) == 1


def test_render_grid_layout():
    mask = torch.tensor([[True, False], [True, True]])
    assert render_grid(mask, 9, ("#", ".")) == ["      0 1", "  q9  # .", " q10  # #"]


def test_console_script_with_an_ascii_terminal():
    """The real console script, on a terminal that cannot print the squares: ASCII cells, no traceback."""
    script = Path(sys.executable).parent / "export-model"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "exporter.cli"]
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    result = subprocess.run([*command, "masks", "--model", "builtin:tiny-llama", "--prompt-len", "3"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    [(_, (rows, grid))] = parse(result.stdout, attend="#").items()
    assert rows == [0, 1, 2] and torch.equal(grid, reference(mu.causal_mask_function, 3, 0))
    assert "Traceback" not in result.stderr
