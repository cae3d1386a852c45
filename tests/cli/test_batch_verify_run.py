"""CI use: batch exports (sharded and merged), re-verification, run, corruption, reproducible bytes, interruption,
--force, the memory check and builds in processes of their own."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    assert result.returncode == 2 and "the cache holds 512" in result.stderr
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
    for manifest in (first, second):  # when it was made, and how long each stage took
        manifest.pop("created"), manifest.pop("stages")
    assert first == second


def start_export(output, *extra, env=None):
    # SIGINT back to its default first: a test run started in the background (``cmd &``, as CI scripts do) inherits
    # SIGINT ignored, and Python then never installs its KeyboardInterrupt handler; a user's Ctrl-C is never ignored.
    return subprocess.Popen([sys.executable, "-m", "exporter.cli", "--model", "builtin:tiny-llama", "--target",
                             "all", "--output", str(output), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**os.environ, **(env or {})})


def wait_for_staging(output, process, timeout=600):
    """Wait until the export has written into its staging folder (so an interrupt hits real work); fail if it
    never does or if the process ends first: the tests below must not pass on an export that did nothing."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if list(output.parent.glob(f".{output.name}.partial-*/*")):
            return
        time.sleep(0.2)
    pytest.fail(f"the export wrote nothing to its staging folder (exit status {process.poll()})")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_export_leaves_nothing_under_the_output_name(tmp_path, sig):
    output = tmp_path / "out"
    process = start_export(output)
    wait_for_staging(output, process)
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


# ------------------------------------------------------------------------------------------ sharded batches
def batch_file(path: Path) -> Path:
    """Five entries: three cheap exports and two that fail at once (so every shard has work and errors)."""
    entries = [("builtin:tiny-llama", "onnx", "a"), ("./missing-b", "executorch", "b"),
               ("builtin:tiny-qwen2", "onnx", "c"), ("./missing-d", "onnx", "d"),
               ("builtin:tiny-llama", "executorch", "e")]
    path.write_text("".join(f'[[export]]\nmodel = "{m}"\ntarget = "{t}"\nname = "{n}"\nmax_seq_len = 32\n\n'
                            for m, t, n in entries))
    return path


def without_timings(summary: dict) -> dict:
    return {**summary, "entries": [{k: v for k, v in e.items() if k != "seconds"} for e in summary["entries"]]}


def table_rows(stdout: str) -> list[list[str]]:
    """The summary table's rows without the seconds column."""
    lines = stdout.strip().splitlines()
    rows = lines[2:lines.index("")] if "" in lines else lines[2:]
    return [[cell for i, cell in enumerate(re.split(r"\s{2,}", row)) if i != 2] for row in rows]


@pytest.mark.slow  # 76 s: six exports, twice
def test_sharded_batch_runs_every_entry_once_and_merges_to_the_unsharded_summary(tmp_path):
    jobs = batch_file(tmp_path / "jobs.toml")
    whole = run_cli("batch", jobs, "--output", tmp_path / "whole", "--quiet")
    assert whole.returncode == 1, whole.stderr[-2000:]  # two entries cannot run
    shards = [tmp_path / f"shard-{i}" for i in (1, 2, 3)]
    for index, folder in enumerate(shards, 1):
        result = run_cli("batch", jobs, "--output", folder, "--shard", f"{index}/3", "--quiet")
        failed = [e for e in read_json(folder / "summary.json")["entries"] if e["status"] != "passed"]
        assert result.returncode == (1 if failed else 0), result.stderr[-2000:]  # exit 1 iff an entry failed
        assert f"(shard {index}/3)" in result.stdout
    ran = [e["name"] for folder in shards for e in read_json(folder / "summary.json")["entries"]]
    assert sorted(ran) == ["a", "b", "c", "d", "e"]  # each entry in exactly one shard
    exported = [p.parent.name for folder in shards for p in folder.glob("*/manifest.json")]
    assert sorted(exported) == ["a", "c", "e"]
    merged = run_cli("batch-merge", *shards, "--output", tmp_path / "merged")
    assert merged.returncode == 1, merged.stderr[-2000:]
    assert without_timings(read_json(tmp_path / "merged" / "summary.json")) == \
        without_timings(read_json(tmp_path / "whole" / "summary.json"))
    assert table_rows(merged.stdout) == table_rows(whole.stdout) and len(table_rows(whole.stdout)) == 5
    for name in ("a", "c", "e"):  # the folders came along, intact
        assert read_json(tmp_path / "merged" / name / "manifest.json")["files"] == \
            read_json(tmp_path / "whole" / name / "manifest.json")["files"]


def fake_shard(folder: Path, index: int, count: int, positions: list[int], sha: str = "ab" * 32) -> Path:
    folder.mkdir(parents=True)
    entries = [{"index": i, "name": f"e{i}", "folder": f"e{i}", "status": "passed", "seconds": 1.0}
               for i in positions]
    (folder / "summary.json").write_text(json.dumps({"batch": {"file": "jobs.toml", "sha256": sha, "entries": 4},
                                                     "shard": {"index": index, "count": count},
                                                     "entries": entries}))
    return folder


@pytest.mark.parametrize("shards,message", [
    ([(1, 2, [1, 3])], "shard 2/2 missing"),
    ([(1, 2, [1, 3]), (1, 2, [2, 4])], "are both shard 1/2"),
    ([(1, 2, [1, 3]), (2, 3, [2, 4])], "is one of 2"),
    ([(1, 2, [1, 3]), (2, 2, [2, 4], "cd" * 32)], "another batch file"),
    ([(1, 2, [1, 3]), (2, 2, [2])], "not each of the file's 4 entries once"),
])
def test_merge_refuses_shards_that_do_not_cover_one_file(tmp_path, shards, message):
    folders = [fake_shard(tmp_path / f"s{i}", *spec) for i, spec in enumerate(shards)]
    result = run_cli("batch-merge", *folders, "--output", tmp_path / "merged")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "merged").exists()


def test_merge_of_complete_fake_shards(tmp_path):
    folders = [fake_shard(tmp_path / "s1", 1, 2, [1, 3]), fake_shard(tmp_path / "s2", 2, 2, [2, 4])]
    result = run_cli("batch-merge", *folders, "--output", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    merged = read_json(tmp_path / "merged" / "summary.json")
    assert [e["index"] for e in merged["entries"]] == [1, 2, 3, 4] and "shard" not in merged


@pytest.mark.parametrize("shard", ["0/3", "4/3", "2", "a/b"])
def test_bad_shard_is_a_usage_error(tmp_path, shard):
    result = run_cli("batch", batch_file(tmp_path / "jobs.toml"), "--output", tmp_path / "out", "--shard", shard)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "--shard" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ memory
def test_export_that_cannot_fit_is_refused_before_it_starts(tmp_path):
    output = tmp_path / "out"
    args = ("--model", "builtin:tiny-llama", "--target", "onnx", "--max-seq-len", "32", "--output", output)
    small = {"EXPORT_MODEL_AVAILABLE_MEMORY": "100M"}
    refused = subprocess.run([sys.executable, "-m", "exporter.cli", *map(str, args)], capture_output=True, text=True,
                             env={**os.environ, **small}, timeout=300)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2, refused.stderr
    assert len(lines) == 1 and "estimated peak memory" in lines[0], lines
    assert "0.1 GiB available" in lines[0] and "--force-memory" in lines[0]
    assert not output.exists() and not list(tmp_path.glob(".out.partial-*"))
    forced = subprocess.run([sys.executable, "-m", "exporter.cli", *map(str, args), "--force-memory", "--quiet"],
                            capture_output=True, text=True, env={**os.environ, **small}, timeout=900)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (output / "model.onnx").is_file()


def test_builds_in_processes_of_their_own_give_the_same_bytes(tmp_path, tiny_export):
    """EXPORT_MODEL_ISOLATE=1 (the path large checkpoints take): each recipe built in its own process, the same
    files as in one process, and the build stages (with their peak memory) in the manifest."""
    output = tmp_path / "isolated"
    result = subprocess.run([sys.executable, "-m", "exporter.cli", "--model", "builtin:tiny-llama", "--target", "all",
                             "--output", str(output)], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "EXPORT_MODEL_ISOLATE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "each recipe is built in a process of its own" in result.stderr
    manifest = read_json(output / "manifest.json")
    assert manifest["files"] == read_json(tiny_export / "manifest.json")["files"]
    stages = [(s["stage"], s["what"]) for s in manifest["stages"]]
    for recipe in ("xnnpack-fp32", "onnx-fp32"):
        assert ("load", f"weights for {recipe} (fp32)") in stages
        assert any(stage == "lower" and recipe in what for stage, what in stages)
    assert all(s["peak_rss_mib"] > 0 for s in manifest["stages"])


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) \
                        == parent:
                    found.append(int(entry))
                    frontier.append(int(entry))
            except (OSError, IndexError):
                continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_export_stops_its_build_process_and_leaves_nothing(tmp_path, sig):
    output = tmp_path / "out"
    process = start_export(output, env={"EXPORT_MODEL_ISOLATE": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not descendants(process.pid):
        time.sleep(0.1)
    builders = descendants(process.pid)
    assert builders and process.poll() is None, "no build process was started"
    time.sleep(3)  # the build process is at work (importing, loading)
    process.send_signal(sig)
    process.wait(timeout=120)
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in builders):
        time.sleep(0.2)
    alive = [pid for pid in builders if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, "a build process outlived the export"
    assert not output.exists()
    if sig != signal.SIGKILL:
        assert not list(tmp_path.glob(".out.partial-*"))
