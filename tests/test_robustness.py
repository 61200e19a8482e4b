"""Interrupted exports, interrupted streams and long loops: no crash, no hang, no half-written files.

Threads sharing one model: tests/test_thread_safety.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import psutil

import gpt2onnx
from conftest import RandomGPT2


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_export(target: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2onnx.cli.export_command", "--random-init", "small", "--output", str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def staging_folders(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{target.name}.partial-*"))


def test_killed_export_leaves_no_bundle_and_the_next_export_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    process = start_export(target)
    try:
        wait_for(lambda: any(folder.glob("model.onnx") for folder in staging_folders(target)), 300, "the graph file")
        process.kill()  # SIGKILL: no cleanup code runs
        process.wait(timeout=60)
    finally:
        process.kill()
    assert not (target / "bundle.json").exists() and not target.exists()
    assert staging_folders(target), "the killed export's staging folder is expected to remain until the next export"
    from gpt2onnx.export.exporter import export_bundle

    export_bundle(output=tmp_path / "bundle", random_init="tiny")
    assert not staging_folders(target) and (target / "bundle.json").exists()


def test_interrupted_export_cleans_up_and_exits_130(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    process = start_export(target)
    try:
        wait_for(lambda: bool(staging_folders(target)), 300, "the staging folder")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not target.exists() and not staging_folders(target)


def test_ctrl_c_during_stream_stops_promptly_keeping_the_text(tiny_gpt2: RandomGPT2) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-u",
            "-m",
            "gpt2onnx.cli.generate_command",
            "Artificial intelligence",
            "--stream",
            "--model",
            str(tiny_gpt2.bundle),
            "--max-new-tokens",
            "1000",
            "--min-new-tokens",
            "1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # os.read, not process.stdout.read: a buffered read may pull more bytes than it returns, and communicate()
        # reads the pipe itself, past that buffer, so those bytes would be lost from the text checked below.
        first = b""
        while len(first) <= len("Artificial intelligence"):
            first += os.read(process.stdout.fileno(), 4096)
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    text = (first + rest).decode("utf-8")
    assert text.startswith("Artificial intelligence")
    model = gpt2onnx.load(tiny_gpt2.bundle)
    full = model.generate("Artificial intelligence", max_new_tokens=1000, min_new_tokens=1000).results[0].sequences[0]
    printed = text.rstrip("\n")
    assert full.text.startswith(printed) and len(printed) < len(full.text), "the text printed so far is intact"


LEAK_BOUND = 1 << 20  # bytes of numpy and Python memory 200 calls may keep; one cache kept per call is ~2.8 MB


def memory_growth(model: gpt2onnx.GPT2Model, calls: int = 200) -> tuple[int, int]:
    """(traced, rss): what `calls` more generate + stream calls keep, after a warm-up, in bytes. traced counts numpy
    arrays and Python objects (tracemalloc: exact, whatever onnxruntime's arenas do); rss the whole process."""
    process = psutil.Process(os.getpid())

    def run(count: int) -> None:
        for index in range(count):
            model.generate(["Artificial intelligence", "a"][index % 2], max_new_tokens=24)
            list(model.stream("b", max_new_tokens=4))

    run(50)  # warm up allocators and onnxruntime's arenas
    tracemalloc.start()
    try:
        traced, rss = tracemalloc.get_traced_memory()[0], process.memory_info().rss
        run(calls)
        return tracemalloc.get_traced_memory()[0] - traced, process.memory_info().rss - rss
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_over_many_calls(tiny_gpt2: RandomGPT2) -> None:
    traced, rss = memory_growth(gpt2onnx.load(tiny_gpt2.bundle))
    assert traced < LEAK_BOUND, f"numpy/Python memory grew by {traced / 2**20:.2f} MiB over 200 calls"
    assert rss < 16 * 2**20, f"RSS grew by {rss / 2**20:.1f} MiB over 200 calls"


def test_the_memory_check_catches_a_leak_of_one_cache_per_call(tiny_gpt2: RandomGPT2) -> None:
    """The same measurement with every call's cache kept alive (a leak) must exceed the bound."""
    model = gpt2onnx.load(tiny_gpt2.bundle)
    kept = []
    empty_cache = model.session.empty_cache

    def leaking_empty_cache(*args, **kwargs):
        kept.append(empty_cache(*args, **kwargs))
        return kept[-1]

    model.session.empty_cache = leaking_empty_cache
    traced, _ = memory_growth(model)
    assert len(kept) >= 400 and traced > LEAK_BOUND, f"a leaked cache per call added only {traced / 2**20:.2f} MiB"


def test_session_threads_stop_spinning_when_a_run_returns(tiny_gpt2: RandomGPT2) -> None:
    """onnxruntime's threads spin only while a run is in progress, so an idle model takes no CPU (measured by
    benchmarks/profile_decode.py as idle_cpu_ms_after_generate: ~0.1 ms in 0.5 s, against ~40 ms with onnxruntime's
    default spinning)."""
    options = gpt2onnx.load(tiny_gpt2.bundle, threads=2).session.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.intra_op_num_threads == 2


def test_generating_to_the_full_context(tiny_gpt2: RandomGPT2) -> None:
    model = gpt2onnx.load(tiny_gpt2.bundle)
    prompt = model.tokenizer.encode("Artificial intelligence")
    room = model.context_length - len(prompt)
    output = model.generate(input_ids=prompt, max_new_tokens=room, min_new_tokens=room)
    assert len(output.results[0].sequences[0].token_ids) == model.context_length
