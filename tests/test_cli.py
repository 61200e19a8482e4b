"""The console scripts: the README's --json schema, tables, prompts from stdin and files, exit codes, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gpt2onnx
from conftest import RandomGPT2

TIMING_KEYS = {"prefill_ms", "decode_ms_per_token", "tokens_generated"}
SEQUENCE_KEYS = {"token_ids", "generated_token_ids", "text", "generated_text", "score"}


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    script = "gpt2onnx.cli.generate_command" if args[0] == "generate" else "gpt2onnx.cli.export_command"
    return subprocess.run(
        [sys.executable, "-m", script, *args[1:]], capture_output=True, text=True, input=stdin, timeout=300
    )


def test_json_output_matches_the_readme_schema(tiny_gpt2: RandomGPT2) -> None:
    result = run_cli(
        "generate",
        "Artificial intelligence",
        "Hello",
        "--model",
        str(tiny_gpt2.bundle),
        "--json",
        "--max-new-tokens",
        "5",
        "--provider",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"model", "provider", "results", "timing"}
    model = gpt2onnx.load(tiny_gpt2.bundle, provider="cpu")
    assert document["model"] == model.name and document["provider"] == "cpu"
    assert set(document["timing"]) == TIMING_KEYS and document["timing"]["tokens_generated"] == 10
    expected = model.generate(["Artificial intelligence", "Hello"], max_new_tokens=5)
    for entry, result_ in zip(document["results"], expected.results, strict=True):
        assert set(entry) == {"prompt", "prompt_token_ids", "sequences"}
        assert entry["prompt"] == result_.prompt and entry["prompt_token_ids"] == result_.prompt_token_ids
        sequence = entry["sequences"][0]
        assert set(sequence) >= SEQUENCE_KEYS
        assert sequence["generated_token_ids"] == result_.sequences[0].generated_token_ids
        assert sequence["text"] == result_.sequences[0].text
        assert sequence["generated_text"] == result_.sequences[0].generated_text
        assert sequence["token_ids"] == entry["prompt_token_ids"] + sequence["generated_token_ids"]


def test_input_ids_and_plain_text_output(tiny_gpt2: RandomGPT2) -> None:
    result = run_cli(
        "generate", "--input-ids", "8001,9542,4430", "--model", str(tiny_gpt2.bundle), "--json", "--max-new-tokens", "3"
    )
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)["results"][0]
    assert entry["prompt"] is None and entry["prompt_token_ids"] == [8001, 9542, 4430]
    plain = run_cli("generate", "Artificial intelligence", "--model", str(tiny_gpt2.bundle), "--max-new-tokens", "3")
    assert plain.returncode == 0 and plain.stdout.startswith("Artificial intelligence")


def test_show_tokens_and_top_probs_tables(tiny_gpt2: RandomGPT2) -> None:
    result = run_cli(
        "generate",
        "Artificial intelligence",
        "--model",
        str(tiny_gpt2.bundle),
        "--show-tokens",
        "--top-probs",
        "10",
        "--max-new-tokens",
        "2",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["|Art| -> 8001", "|ificial| -> 9542", "| intelligence| -> 4430"]
    table = [line.split(maxsplit=3) for line in lines if line.strip()[:2].strip().isdigit() and "%" in line]
    model = gpt2onnx.load(tiny_gpt2.bundle, provider="cpu")
    best = model.next_token_probs("Artificial intelligence", top=10)
    assert [int(rank) for rank, *_ in table] == list(range(1, 11))
    assert [int(token_id) for _, _, token_id, _ in table] == [entry.token_id for entry in best]
    assert [percent for _, percent, _, _ in table] == [f"{entry.probability:.4%}" for entry in best]


def test_top_probs_bars_follow_the_probabilities(tiny_gpt2: RandomGPT2) -> None:
    result = run_cli("generate", "Artificial intelligence", "--model", str(tiny_gpt2.bundle), "--top-probs", "5")
    rows = [line for line in result.stdout.splitlines() if "%" in line]
    bars = [line.rsplit("|", 1)[1].strip() for line in rows]
    assert len(bars) == 5 and bars[0] == "█" * 30, "the most likely token's bar is full width"
    widths = [len(bar) for bar in bars]
    assert widths == sorted(widths, reverse=True) and set("".join(bars)) <= set("█▏▎▍▌▋▊▉")


def test_several_prompts_label_their_token_tables(tiny_gpt2: RandomGPT2) -> None:
    args = ("generate", "Artificial intelligence", "Hello", "--model", str(tiny_gpt2.bundle), "--show-tokens")
    lines = run_cli(*args, "--max-new-tokens", "1").stdout.splitlines()
    assert lines[:6] == [
        "tokens of 'Artificial intelligence':",
        "|Art| -> 8001",
        "|ificial| -> 9542",
        "| intelligence| -> 4430",
        "tokens of 'Hello':",
        "|Hello| -> 15496",
    ]


def test_prompts_from_stdin_and_files(tiny_gpt2: RandomGPT2, tmp_path: Path) -> None:
    common = ("--model", str(tiny_gpt2.bundle), "--json", "--max-new-tokens", "3")
    (tmp_path / "prompt.txt").write_text("naïve café 🤖\n", encoding="utf-8")
    from_stdin = run_cli("generate", "-", *common, stdin="Artificial intelligence\n")
    from_file = run_cli("generate", "--prompt-file", str(tmp_path / "prompt.txt"), *common)
    both = run_cli(
        "generate", "-", "--prompt-file", str(tmp_path / "prompt.txt"), *common, stdin="Artificial intelligence"
    )
    expected = run_cli("generate", "Artificial intelligence", "naïve café 🤖", *common)
    results = [json.loads(result.stdout)["results"] for result in (from_stdin, from_file, both, expected)]
    assert results[0] == results[3][:1] and results[1] == results[3][1:] and results[2] == results[3]
    missing = run_cli("generate", "--prompt-file", str(tmp_path / "none.txt"), *common)
    assert missing.returncode == 2
    assert missing.stderr == f"gpt2-generate: error: --prompt-file {tmp_path / 'none.txt'}: No such file or directory\n"


def test_max_length_counts_the_prompt_as_transformers_does(tiny_gpt2: RandomGPT2) -> None:
    """max_length = padded prompt + new tokens: the same tokens as transformers' generate(max_length=...)."""
    from reference import reference_generate

    rows = [[8001, 9542, 4430], [464, 2068, 7586, 21831, 18045]]
    model = gpt2onnx.load(tiny_gpt2.bundle)
    ours = model.generate(input_ids=rows, max_length=12)
    expected = reference_generate(tiny_gpt2.torch_model(), rows, pad=50256, eos=[50256], max_length=12)
    assert [seq.generated_token_ids for seq in ours.sequences] == expected
    assert max(len(seq.generated_token_ids) for seq in ours.sequences) == 12 - 5
    cli = run_cli(
        "generate", "--input-ids", "8001,9542,4430", "--model", str(tiny_gpt2.bundle), "--json", "--max-length", "7"
    )
    assert len(json.loads(cli.stdout)["results"][0]["sequences"][0]["generated_token_ids"]) == 4


def test_stream_prints_the_same_text(tiny_gpt2: RandomGPT2) -> None:
    args = ("generate", "Artificial intelligence", "--model", str(tiny_gpt2.bundle), "--max-new-tokens", "8")
    streamed = run_cli(*args, "--stream")
    plain = run_cli(*args)
    assert streamed.returncode == 0 and streamed.stdout == plain.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("x", "--model", "{missing}"), "bundle folder not found"),
        (("--input-ids", "{long_prompt}", "--max-new-tokens", "5"), "exceeds the model's context of 1024 tokens by"),
        (("x", "--max-new-tokens", "0"), "--max-new-tokens"),
        (("x", "--top-p", "1.5"), "error: --top-p must be <= 1.0, got 1.5"),
        (("x", "--temperature", "nan"), "--temperature"),
        (("--input-ids", "1,x,3"), "--input-ids"),
        (("--input-ids", "99999999"), "outside the vocabulary"),
        ((), "give a PROMPT"),
        (("x", "--provider", "cuda"), "provider 'cuda'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_gpt2: RandomGPT2, tmp_path: Path, args: tuple, fragment: str) -> None:
    values = {"missing": str(tmp_path / "nowhere"), "long_prompt": ",".join(["11"] * 1020)}
    args = tuple(arg.format(**values) for arg in args)
    if "--model" not in args:
        args = (*args, "--model", str(tiny_gpt2.bundle))
    result = run_cli("generate", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert fragment in result.stderr


def test_version_and_help() -> None:
    for command in ("generate", "export"):
        version = run_cli(command, "--version")
        assert version.returncode == 0 and gpt2onnx.__version__ in version.stdout
        help_text = run_cli(command, "--help")
        assert help_text.returncode == 0 and "usage:" in help_text.stdout


def test_export_refuses_existing_output_and_missing_checkpoint(tiny_gpt2: RandomGPT2, tmp_path: Path) -> None:
    existing = run_cli("export", "--model", str(tiny_gpt2.checkpoint), "--output", str(tiny_gpt2.bundle))
    assert existing.returncode == 2 and "already exists; pass --force" in existing.stderr
    missing = run_cli("export", "--model", str(tmp_path / "no-such-checkpoint"), "--output", str(tmp_path / "out"))
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "out").exists()
    assert not any(path.name.startswith(".out.partial") for path in tmp_path.iterdir())
