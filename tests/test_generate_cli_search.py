"""gpt2-generate's decoding options: each reaches generate(), combinations are checked, errors are one line."""

from __future__ import annotations

import json

import pytest

import gpt2onnx
from conftest import RandomGPT2, middle_piece, run_generate
from gpt2onnx.cli.generate_command import build_parser, generation_options

PROMPTS = ["Café 🎉 and", "Hello"]
CASES = [
    (
        ["--do-sample", "--seed", "7", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9"],
        {"do_sample": True, "seed": 7, "temperature": 0.8, "top_k": 20, "top_p": 0.9},
    ),
    (
        ["--do-sample", "--seed", "1", "--min-p", "0.01", "--typical-p", "0.9", "--num-return-sequences", "2"],
        {"do_sample": True, "seed": 1, "min_p": 0.01, "typical_p": 0.9, "num_return_sequences": 2},
    ),
    (
        ["--num-beams", "3", "--length-penalty", "0.6", "--early-stopping", "never", "--num-return-sequences", "2"],
        {"num_beams": 3, "length_penalty": 0.6, "early_stopping": "never", "num_return_sequences": 2},
    ),
    (["--num-beams", "2", "--early-stopping"], {"num_beams": 2, "early_stopping": True}),
    (["--num-beams", "2", "--do-sample", "--seed", "3"], {"num_beams": 2, "do_sample": True, "seed": 3}),
    (
        ["--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2", "--min-new-tokens", "4"],
        {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 4},
    ),
    (["--stop", "the", "--stop", "\n"], {"stop": ("the", "\n")}),
]


@pytest.mark.parametrize(("arguments", "options"), CASES)
def test_each_option_reaches_generate(tiny_gpt2: RandomGPT2, arguments: list, options: dict) -> None:
    base = ["--model", str(tiny_gpt2.bundle), "--max-new-tokens", "6", "--provider", "cpu", "--threads", "1"]
    assert generation_options(build_parser().parse_args([*PROMPTS, *base, *arguments])) == {
        "max_new_tokens": 6,
        **options,
    }
    code, out, err = run_generate([*PROMPTS, *base, "--no-verify", "--json", *arguments])
    assert code == 0, err
    document = json.loads(out)
    expected = gpt2onnx.load(tiny_gpt2.bundle, provider="cpu").generate(PROMPTS, max_new_tokens=6, **options)
    assert [[s["generated_token_ids"] for s in r["sequences"]] for r in document["results"]] == [
        [s.generated_token_ids for s in r.sequences] for r in expected.results
    ]
    for entry, result in zip(document["results"], expected.results, strict=True):
        for sequence, reference in zip(entry["sequences"], result.sequences, strict=True):
            assert sequence["generated_text"] == reference.generated_text
            assert sequence["score"] == reference.score and sequence["finish_reason"] == reference.finish_reason
    assert all(
        (s["score"] is not None) == ("num_beams" in options) for r in document["results"] for s in r["sequences"]
    )


def test_stream_with_sampling_and_a_stop_string(tiny_gpt2: RandomGPT2) -> None:
    model = gpt2onnx.load(tiny_gpt2.bundle, provider="cpu")
    free = model.generate(PROMPTS[0], max_new_tokens=30, do_sample=True, seed=2).text
    stop = middle_piece(free, 2)
    arguments = [PROMPTS[0], "--model", str(tiny_gpt2.bundle), "--max-new-tokens", "30", "--do-sample"]
    code, out, err = run_generate([*arguments, "--seed", "2", "--stop", stop, "--stream"])
    assert code == 0, err
    assert out == PROMPTS[0] + free[: free.find(stop)] + "\n"


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["x", "--stream", "--num-beams", "2"], "--stream works with greedy search and sampling, not beam search"),
        (
            ["x", "--stream", "--do-sample", "--num-return-sequences", "2"],
            "--stream yields one sequence: --num-return-sequences must be 1",
        ),
        (["x", "y", "--stream"], "--stream takes one prompt"),
        (["x", "--stream", "--json"], "cannot be combined"),
        (
            ["x", "--num-return-sequences", "2"],
            "--num-return-sequences (2) > 1 needs sampling (--do-sample) or --num-beams >= 2",
        ),
        (["x", "--num-beams", "2", "--num-return-sequences", "3"], "must not exceed --num-beams (2)"),
        (["x", "--num-beams", "2", "--do-sample", "--num-return-sequences", "3"], "must not exceed --num-beams (2)"),
        (
            ["x", "--min-new-tokens", "9", "--max-new-tokens", "3"],
            "--min-new-tokens (9) must not exceed --max-new-tokens (3)",
        ),
        (["x", "--early-stopping", "sometimes"], "expected true, false or never"),
        (["x", "--stop", ""], "--stop strings must be non-empty"),
        (["x", "--temperature", "0"], "--temperature must be > 0"),
        (["x", "--top-k", "-1"], "--top-k"),
        (["x", "--typical-p", "0"], "--typical-p must be > 0"),
        (["x", "--threads", "0"], "--threads"),
    ],
)
def test_bad_combinations_exit_2_with_one_line(tiny_gpt2: RandomGPT2, arguments: list, fragment: str) -> None:
    code, out, err = run_generate([*arguments, "--model", str(tiny_gpt2.bundle)])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gpt2-generate: error: ") and fragment in err
