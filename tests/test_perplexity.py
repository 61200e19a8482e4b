"""gpt2-perplexity and GPT2Model.perplexity: transformers' sliding-window perplexity of a text longer than the
context, to 1e-4; the comparison of two bundles (KL divergence, top-1 agreement, max |logits difference|)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpt2onnx
from conftest import random_gpt2
from gpt2onnx.cli import perplexity_command
from gpt2onnx.export.exporter import export_bundle
from gpt2onnx.runtime.scoring import Window, sliding_windows

# Tiny random weights have flat logits, so their top-1 agreement misses the quantised floors by chance; the floors'
# warning is tested on its own (test_quantisation_quality.py, test_int4.py).
pytestmark = pytest.mark.filterwarnings("ignore:int[48] weights fall below the quality floors:UserWarning")

CONTEXT = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 vocabulary (so that the export gives it the shipped tokenizer) and a context of 64 tokens."""
    folder = tmp_path_factory.mktemp("perplexity") / "checkpoint"
    random_gpt2(41, n_layer=2, n_head=2, n_embd=32, n_positions=CONTEXT, initializer_range=0.3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bundles(checkpoint: Path) -> dict[str, Path]:
    return {
        "fp32": export_bundle(str(checkpoint), checkpoint.parent / "fp32"),
        "int8": export_bundle(str(checkpoint), checkpoint.parent / "int8", quantize="int8"),
        "other": export_bundle(output=checkpoint.parent / "other", random_init="tiny"),  # a context of 1024
    }


def guide_perplexity(checkpoint: Path, ids: list[int], stride: int) -> float:
    """transformers' guide "Perplexity of fixed-length models", as written there."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    encodings = torch.tensor([ids])
    max_length, seq_len = model.config.n_positions, encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize(("length", "stride"), [(300, 24), (300, 64), (200, 7), (50, 16), (64, 32)])
def test_perplexity_equals_the_guide(checkpoint: Path, bundles: dict[str, Path], length: int, stride: int) -> None:
    ids = np.random.default_rng(length + stride).integers(0, 50256, size=length).tolist()
    report = gpt2onnx.load(bundles["fp32"]).perplexity(input_ids=ids, stride=stride)
    assert report.perplexity == pytest.approx(guide_perplexity(checkpoint, ids, stride), rel=1e-4)
    assert report.windows == len(sliding_windows(length, CONTEXT, stride)) and report.context == CONTEXT


def test_the_windows_score_every_token_once() -> None:
    assert sliding_windows(10, 4, 4) == [Window(0, 4, 4), Window(4, 8, 4), Window(8, 10, 2)]
    assert sliding_windows(10, 4, 2) == [Window(0, 4, 4), Window(2, 6, 2), Window(4, 8, 2), Window(6, 10, 2)]
    assert sliding_windows(3, 4, 2) == [Window(0, 3, 3)]
    for length, context, stride in [(100, 16, 5), (37, 8, 8), (1000, 64, 63)]:
        windows = sliding_windows(length, context, stride)
        assert sum(window.targets for window in windows) == length and windows[-1].end == length
        assert all(window.end - window.begin <= context for window in windows)


def test_a_model_compared_with_itself_and_with_its_fp32(bundles: dict[str, Path]) -> None:
    ids = np.random.default_rng(5).integers(0, 50256, size=150).tolist()
    fp32, int8 = gpt2onnx.load(bundles["fp32"]), gpt2onnx.load(bundles["int8"])
    itself = fp32.perplexity(input_ids=ids, stride=32, compare=fp32)
    assert itself.kl_divergence == pytest.approx(0.0, abs=1e-12)
    assert (itself.top1_agreement, itself.max_logits_diff) == (1.0, 0.0)
    quantised = int8.perplexity(input_ids=ids, stride=32, compare=fp32)
    assert 0 < quantised.kl_divergence < 0.05 and 0.5 < quantised.top1_agreement <= 1.0
    assert 0 < quantised.max_logits_diff < 1.0
    assert quantised.perplexity != itself.perplexity and quantised.tokens == itself.tokens
    seen: list[tuple[int, int]] = []
    fp32.perplexity(input_ids=ids, stride=32, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(index, len(seen)) for index in range(1, len(seen) + 1)] and len(seen) > 1


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gpt2onnx.cli.perplexity_command", *args]
    return subprocess.run(command, capture_output=True, text=True, input=stdin, timeout=300)


def test_the_command_line(bundles: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("Artificial intelligence is the future. " * 40, encoding="utf-8")
    model = gpt2onnx.load(bundles["fp32"])
    expected = model.perplexity(text.read_text(encoding="utf-8"), stride=32)
    assert expected.windows > 2
    result = run(str(text), "--model", str(bundles["fp32"]), "--json", "--stride", "32")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)
    assert document["tokens"] == expected.tokens and document["kl_divergence"] is None
    assert result.stderr == "", "no progress bar when stderr is not a terminal"
    plain = run("-", "--model", str(bundles["fp32"]), "--stride", "16", stdin=text.read_text(encoding="utf-8"))
    assert plain.returncode == 0 and plain.stdout.startswith("perplexity ") and "stride 16" in plain.stdout
    compared = run(str(text), "--model", str(bundles["int8"]), "--compare", str(bundles["fp32"]), "--json")
    document = json.loads(compared.stdout)
    assert compared.returncode == 0 and {"kl_divergence", "top1_agreement", "max_logits_diff"} <= set(document)
    assert document["kl_divergence"] > 0 and 0 < document["top1_agreement"] <= 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{missing}", "--model", "{fp32}"], "error: {missing}: No such file or directory"),
        (["{text}", "--model", "{fp32}", "--stride", "100"], "error: --stride must be from 1 to the context's 64"),
        (["{text}", "--model", "{fp32}", "--compare", "{other}"], "the compared models' contexts differ (64 and 1024"),
        (["{text}", "--model", "{fp32}", "--stride", "0"], "argument --stride: expected an integer >= 1, got 0"),
    ],
)
def test_bad_input_exits_2_with_one_line(bundles: dict[str, Path], tmp_path: Path, arguments, message: str) -> None:
    text = tmp_path / "ids.txt"
    text.write_text("ab" * 50, encoding="utf-8")
    values = {"missing": str(tmp_path / "none.txt"), "text": str(text), **{k: str(v) for k, v in bundles.items()}}
    result = run(*(argument.format(**values) for argument in arguments))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message.format(**values) in result.stderr


def test_the_progress_bar_on_a_terminal() -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        bar = perplexity_command.ProgressBar(True)
        bar(1, 4)
        bar(4, 4)
    assert stderr.getvalue() == (
        f"\rgpt2-perplexity: [{'#' * 8}{'.' * 22}] window 1/4\rgpt2-perplexity: [{'#' * 30}] window 4/4\n"
    )
