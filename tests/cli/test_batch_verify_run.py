"""CI use: batch exports, re-verification, run, corruption, reproducible bytes, interruption and --force."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import read_json, run_cli


@pytest.fixture
def export_copy(tmp_path, tiny_export):
    """A private copy of the session's export (tests below damage it)."""
    target = tmp_path / "artifact"
    shutil.copytree(tiny_export, target)
    return target


def flip_byte(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_command_passes_on_intact_folder(export_copy):
    result = run_cli("verify", export_copy)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "every artifact verified" in result.stdout


@pytest.mark.parametrize("name", ["model.pte", "model.onnx.data", "tokenizer.json"])
def test_flipped_byte_is_reported_as_corruption(export_copy, name):
    flip_byte(export_copy / name)
    for command in (["verify", export_copy], ["run", export_copy, "--prompt", "Hi"]):
        result = run_cli(*command)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert f"{name} is corrupted" in result.stderr.strip().splitlines()[-1]


def test_run_generates_on_both_runtimes(tiny_export):
    result = run_cli("run", tiny_export, "--prompt", "Once upon a time", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model.pte (executorch)" in result.stdout and "model.onnx (onnxruntime-genai)" in result.stdout
    assert result.stdout.count("decode ") == 2 and "tokens/s" in result.stdout


def test_run_rejects_prompt_longer_than_cache(tiny_export):
    result = run_cli("run", tiny_export, "--prompt", "word " * 200)
    assert result.returncode == 2 and "the cache holds 128" in result.stderr
    assert "Traceback" not in result.stderr


def test_batch_runs_all_entries_and_reports_failures(tmp_path):
    batch = tmp_path / "jobs.toml"
    batch.write_text('[[export]]\nmodel = "builtin:tiny-llama"\ntarget = "onnx"\nmax_seq_len = 32\nname = "ok"\n\n'
                     '[[export]]\nmodel = "./missing-model-folder"\ntarget = "executorch"\nname = "broken"\n')
    output = tmp_path / "out"
    result = run_cli("batch", batch, "--output", output, "--quiet")
    assert result.returncode == 1  # one entry failed
    summary = read_json(output / "summary.json")["entries"]
    assert [e["name"] for e in summary] == ["ok", "broken"]
    assert summary[0]["status"] == "passed" and (output / "ok" / "model.onnx").is_file()
    assert summary[1]["status"] == "error" and "no such folder" in summary[1]["message"]
    assert not (output / "broken").exists()
    assert "1 of 2 exports verified" in result.stdout


def test_batch_rejects_invalid_file(tmp_path):
    batch = tmp_path / "jobs.toml"
    batch.write_text('[[export]]\nmodel = "builtin:tiny-llama"\ntarget = "tflite"\n')
    result = run_cli("batch", batch, "--output", tmp_path / "out")
    assert result.returncode == 2 and "target" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def test_example_batch_file_is_valid():
    from pathlib import Path

    from exporter.cli.batch import read_entries

    entries = read_entries(Path(__file__).resolve().parents[2] / "docs" / "batch-example.toml")
    assert len(entries) >= 2
    quantized = next(e for e in entries if e["name"] == "tiny-llama-8da4w-g64")
    recipe = quantized["recipes"][0]
    assert (recipe.quantization, recipe.group_size, recipe.embedding_quantization) == ("8da4w", 64, "4w")


@pytest.mark.parametrize("line,message", [
    ('group_size = "32"', "--group-size must be an integer"),
    ("group_size = 32", "--group-size does not apply"),  # the default fp32 recipe has no weight quantization
    ('qembedding = "4w"\ntarget_is = 1', "unknown keys target_is"),
])
def test_batch_options_are_validated_before_anything_runs(tmp_path, line, message):
    from exporter.cli.batch import read_entries
    from exporter.errors import UserError

    batch = tmp_path / "jobs.toml"
    batch.write_text(f'[[export]]\nmodel = "builtin:tiny-llama"\ntarget = "executorch"\n{line}\n')
    with pytest.raises(UserError, match=message):
        read_entries(batch)


def test_same_export_twice_gives_identical_bytes(tmp_path, tiny_export):
    output = tmp_path / "again"
    result = run_cli("--model", "builtin:tiny-llama", "--target", "all", "--output", output, "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = read_json(tiny_export / "manifest.json"), read_json(output / "manifest.json")
    assert first["files"] == second["files"]  # every file, artifacts and verification report included
    first.pop("created"), second.pop("created")
    assert first == second


def start_export(output, *extra):
    # SIGINT back to its default first: a test run started in the background (``cmd &``, as CI scripts do) inherits
    # SIGINT ignored, and Python then never installs its KeyboardInterrupt handler; a user's Ctrl-C is never ignored.
    return subprocess.Popen([sys.executable, "-m", "exporter.cli", "--model", "builtin:tiny-llama", "--target",
                             "all", "--output", str(output), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_staging(output, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(output.parent.glob(f".{output.name}.partial-*/*")) or process.poll() is not None:
            return
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_export_leaves_nothing_under_the_output_name(tmp_path, sig):
    output = tmp_path / "out"
    process = start_export(output)
    wait_for_staging(output, process)
    assert process.poll() is None, "export finished before it could be interrupted"
    process.send_signal(sig)
    process.wait(timeout=120)
    assert process.returncode != 0
    assert not output.exists()
    if sig != signal.SIGKILL:  # a graceful stop also removes its staging folder
        assert not list(tmp_path.glob(".out.partial-*"))


def test_interrupted_forced_export_keeps_previous_output(tmp_path, tiny_export):
    output = tmp_path / "out"
    shutil.copytree(tiny_export, output)
    before = (output / "manifest.json").read_bytes()
    process = start_export(output, "--force")
    wait_for_staging(output, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert (output / "manifest.json").read_bytes() == before
    # the next run cleans the dead process's staging folder and replaces the output once verified
    result = run_cli("--model", "builtin:tiny-llama", "--target", "onnx", "--output", output, "--force", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((output / "manifest.json").read_text())["artifacts"] == {"onnx": "model.onnx"}
    assert not list(tmp_path.glob(".out.partial-*"))
