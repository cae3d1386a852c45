"""Bad input: one line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exporter.cli import main
from tests.conftest import run_cli


def run_main(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    # Bad input is refused before any work starts: the error is the only line on stderr.
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("export-model: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_written(output: Path) -> None:
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.partial-*"))


@pytest.fixture
def broken_model(tmp_path, tiny_llama_dir):
    """A copy of the tiny checkpoint that each test damages in its own way."""
    target = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, target)
    return target


@pytest.mark.parametrize("args,fragments", [
    (["--model", "builtin:tiny-llama", "--recipe", "no-such-recipe"], ["unknown recipe", "xnnpack-fp32"]),
    (["--model", "builtin:tiny-llama", "--target", "tflite"], ["invalid choice", "executorch"]),
    (["--model", "builtin:no-such-model"], ["unknown builtin model", "tiny-llama"]),
    (["--model", "./no/such/folder"], ["no such folder"]),
    (["--model", "builtin:tiny-llama", "--max-seq-len", "0"], ["--max-seq-len"]),
    (["--model", "builtin:tiny-llama", "--max-seq-len", "-3"], ["--max-seq-len"]),
    (["--model", "builtin:tiny-llama", "--max-seq-len", "100000"], ["position limit", "512"]),
    (["--model", "builtin:tiny-llama", "--target", "onnx", "--recipe", "xnnpack-fp32"], ["is for target executorch"]),
])
def test_bad_arguments(capsys, tmp_path, args, fragments):
    output = tmp_path / "out"
    code, err = run_main(capsys, *args, "--output", output)
    assert_one_line_error(code, err, *fragments)
    assert_nothing_written(output)


def test_missing_config(capsys, tmp_path, broken_model):
    (broken_model / "config.json").unlink()
    code, err = run_main(capsys, "--model", broken_model, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "no config.json")
    assert_nothing_written(tmp_path / "out")


def test_malformed_config(capsys, tmp_path, broken_model):
    (broken_model / "config.json").write_text("{ not json")
    code, err = run_main(capsys, "--model", broken_model, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "config.json", "not valid JSON")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("model_type,fragments", [("no_such_type", ["no_such_type", "not a causal language model"]),
                                                  ("vit", ["vit", "not a causal language model"]),
                                                  # a causal LM, but not the one these weights belong to
                                                  ("gpt2", ["could not load the weights", "lacks"])])
def test_unsupported_model_type(capsys, tmp_path, broken_model, model_type, fragments):
    config = json.loads((broken_model / "config.json").read_text())
    config["model_type"] = model_type
    (broken_model / "config.json").write_text(json.dumps(config))
    code, err = run_main(capsys, "--model", broken_model, "--output", tmp_path / "out")
    assert_one_line_error(code, err, *fragments)
    assert_nothing_written(tmp_path / "out")


def test_missing_weights(capsys, tmp_path, broken_model):
    (broken_model / "model.safetensors").unlink()
    code, err = run_main(capsys, "--model", broken_model, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "no weights")
    assert_nothing_written(tmp_path / "out")


def test_truncated_weights(capsys, tmp_path, broken_model):
    weights = broken_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = run_main(capsys, "--model", broken_model, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "model.safetensors", "truncated")
    assert_nothing_written(tmp_path / "out")


def test_existing_output_needs_force(capsys, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("previous release")
    code, err = run_main(capsys, "--model", "builtin:tiny-llama", "--output", output)
    assert_one_line_error(code, err, "already exists", "--force")
    assert (output / "keep.txt").read_text() == "previous release"


def test_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_main(capsys, "--model", "builtin:tiny-llama", "--output", blocker / "out")
    assert_one_line_error(code, err, "cannot create output folder")


def test_hub_id_offline_is_one_line(tmp_path):
    """A hub id goes through real huggingface_hub loading; offline it fails cleanly (fresh process, no traceback)."""
    import os

    env_backup = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        result = run_cli("--model", "some-org/some-model-that-is-not-cached", "--output", tmp_path / "out")
    finally:
        if env_backup is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = env_backup
    assert_one_line_error(result.returncode, result.stderr, "some-org/some-model-that-is-not-cached",
                          "could not download")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("body,fragment", [
    ("name = \"x\"\ntarget = [unclosed", "not valid TOML"),
    ("name = \"x\"\ntarget = \"executorch\"\nbackend = \"xnnpack\"\ndtype = \"float32\"\nquantization = \"none\"\n"
     "max_seq_len = 64\n", "missing [verify] table"),
    ("name = \"x\"\ntarget = \"executorch\"\nbackend = \"coreml\"\ndtype = \"float32\"\nquantization = \"none\"\n"
     "max_seq_len = 64\n[verify]\nmax_abs_diff = 1e-4\nmin_top1_agreement = 1.0\n", "backend 'coreml' is not one of"),
    ("name = \"x\"\ntarget = \"onnx\"\nbackend = \"onnxruntime\"\ndtype = \"float32\"\nquantization = \"none\"\n"
     "max_seq_len = \"long\"\n[verify]\nmax_abs_diff = 1e-4\nmin_top1_agreement = 1.0\n", "must be int"),
])
def test_invalid_recipe_file(capsys, tmp_path, body, fragment):
    recipe = tmp_path / "broken.toml"
    recipe.write_text(body)
    code, err = run_main(capsys, "--model", "builtin:tiny-llama", "--recipe", recipe, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "broken.toml", fragment)
    assert_nothing_written(tmp_path / "out")
