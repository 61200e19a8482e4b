"""Every documented bad input gets InvalidInputError (a ValueError) from the API and exit code 2 from the CLI."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpt2onnx
from conftest import RandomGPT2, run_generate

# (API keyword arguments or None where only the CLI can go wrong, CLI arguments or None where the CLI cannot express
# it, the message, and the CLI's message where it words it differently: in its own flags, or from argument parsing)
BAD_INPUTS: list[tuple[dict[str, Any], list[str] | None, str] | tuple[dict[str, Any], list[str], str, str]] = [
    (
        {"input_ids": [11] * 1000, "max_new_tokens": 30},
        ["--input-ids", ",".join(["11"] * 1000), "--max-new-tokens", "30"],
        "exceeds the model's context of 1024 tokens by 6",
    ),
    (
        {"max_new_tokens": 0},
        ["--max-new-tokens", "0"],
        "max_new_tokens must be >= 1, got 0",
        "argument --max-new-tokens: expected an integer >= 1, got 0",
    ),
    (
        {"max_new_tokens": -3},
        ["--max-new-tokens", "-3"],
        "max_new_tokens must be >= 1, got -3",
        "argument --max-new-tokens: expected an integer >= 1, got -3",
    ),
    (
        {"max_new_tokens": 2.5},
        ["--max-new-tokens", "2.5"],
        "max_new_tokens must be an integer, got 2.5",
        "argument --max-new-tokens: expected an integer, got '2.5'",
    ),
    (
        {"min_new_tokens": -1},
        ["--min-new-tokens", "-1"],
        "min_new_tokens must be >= 0, got -1",
        "argument --min-new-tokens: expected an integer >= 0, got -1",
    ),
    (
        {"min_new_tokens": 30, "max_new_tokens": 20},
        ["--min-new-tokens", "30"],
        "min_new_tokens (30) must not exceed max_new_tokens (20)",
        "--min-new-tokens (30) must not exceed --max-new-tokens (20)",
    ),
    (
        {"do_sample": True, "temperature": 0.0},
        ["--do-sample", "--temperature", "0"],
        "temperature must be > 0",
        "error: --temperature must be > 0",
    ),
    (
        {"do_sample": True, "temperature": -1.0},
        ["--do-sample", "--temperature", "-1"],
        "temperature must be > 0",
        "error: --temperature must be > 0",
    ),
    ({"top_p": 0.0}, ["--top-p", "0"], "top_p must be > 0", "error: --top-p must be > 0"),
    ({"top_p": 1.5}, ["--top-p", "1.5"], "top_p must be <= 1", "error: --top-p must be <= 1.0, got 1.5"),
    (
        {"top_k": -1},
        ["--top-k", "-1"],
        "top_k must be >= 0, got -1",
        "argument --top-k: expected an integer >= 0, got -1",
    ),
    (
        {"num_beams": 0},
        ["--num-beams", "0"],
        "num_beams must be >= 1, got 0",
        "argument --num-beams: expected an integer >= 1, got 0",
    ),
    (
        {"num_beams": 2, "num_return_sequences": 3},
        ["--num-beams", "2", "--num-return-sequences", "3"],
        "num_return_sequences (3) must not exceed num_beams (2)",
        "--num-return-sequences (3) must not exceed --num-beams (2)",
    ),
    ({"input_ids": [1, 2, 50257]}, ["--input-ids", "1,2,50257"], "token id 50257 is outside the vocabulary"),
    ({"input_ids": [-1]}, ["--input-ids", "-1"], "token id -1 is outside the vocabulary"),
    ({"prompt": "bad \udcff bytes"}, ["bad \udcff bytes"], "not valid UTF-8"),
    ({"prompt": "nul \x00 byte"}, ["nul \x00 byte"], "NUL character"),
    ({"prompt": 42}, None, "a prompt must be a string or a list of strings, got int"),
    ({"prompt": ["ok", 7]}, None, "a prompt must be a string, got int"),
    ({"prompt": []}, None, "the list of prompts is empty"),
    ({"input_ids": []}, None, "input_ids must be a non-empty list"),
    ({"input_ids": [1.5]}, None, "input_ids must hold integers"),
    ({"prompt": "a", "input_ids": [1]}, None, "give either a prompt"),
    (
        {"repetition_penalty": 0.0},
        ["--repetition-penalty", "0"],
        "repetition_penalty must be > 0",
        "error: --repetition-penalty must be > 0",
    ),
    (
        {"early_stopping": "sometimes"},
        ["--early-stopping", "sometimes"],
        "early_stopping must be True, False or 'never', got 'sometimes'",
        "argument --early-stopping: expected true, false or never, got 'sometimes'",
    ),
    ({"no_such_option": 1}, None, "unknown generation option(s): no_such_option"),
    ({"top_pp": 0.5}, None, "unknown generation option(s): top_pp; did you mean top_p?"),
    ({"stop": [""]}, ["--stop", ""], "stop strings must be non-empty", "error: --stop strings must be non-empty"),
    (
        {"input_ids": [11], "max_length": 1},
        ["--input-ids", "11", "--max-length", "1"],
        "max_length must be >= 2, got 1",
        "error: --max-length must be >= 2, got 1",
    ),
    (
        {"input_ids": [11, 12, 13], "max_length": 3},
        ["--input-ids", "11,12,13", "--max-length", "3"],
        "max_length (3) counts the prompt, so it must exceed the prompt's 3 tokens",
        "error: --max-length (3) counts the prompt, so it must exceed the prompt's 3 tokens",
    ),
    (
        {"input_ids": [11], "max_new_tokens": 1024},
        ["--input-ids", "11", "--max-new-tokens", "1024"],
        "prompt of 1 token plus max_new_tokens=1024 exceeds the model's context of 1024 tokens by 1",
        "prompt of 1 token plus --max-new-tokens=1024 exceeds",
    ),
    ({"max_new_tokens": 3, "max_length": 9}, None, "give max_new_tokens or max_length (prompt included), not both"),
    (None, ["--input-ids", "1,,2"], None, "argument --input-ids: expected comma-separated token ids"),
    (None, ["--input-ids", "1,2,"], None, "argument --input-ids: expected comma-separated token ids"),
    (None, ["--max-length", "9", "--max-new-tokens", "3"], None, "give --max-new-tokens or --max-length, not both"),
    ({"eos_token_id": 10**6}, None, "token id 1000000 is outside the vocabulary"),
]


def call_api(model, kwargs: dict[str, Any]):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", None if "input_ids" in kwargs else "Artificial intelligence")
    return model.generate(prompt, **kwargs)


@pytest.fixture(scope="module")
def model(tiny_gpt2: RandomGPT2):
    return gpt2onnx.load(tiny_gpt2.bundle)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[str(case[0] or case[1])[:60] for case in BAD_INPUTS])
def test_bad_input(model, tiny_gpt2: RandomGPT2, case: tuple) -> None:
    kwargs, cli, fragment = case[:3]
    if kwargs is not None:
        with pytest.raises(gpt2onnx.InvalidInputError) as caught:
            call_api(model, kwargs)
        assert isinstance(caught.value, ValueError)
        assert fragment in str(caught.value) and "\n" not in str(caught.value)
    if cli is not None:
        if (
            not any(arg.startswith("--input-ids") for arg in cli)
            and not cli[0].startswith("bad")
            and "nul" not in cli[0]
        ):
            cli = ["Artificial intelligence", *cli]
        code, _, stderr = run_generate([*cli, "--model", str(tiny_gpt2.bundle)])
        assert code == 2, stderr
        assert stderr.count("\n") == 1 and stderr.startswith("gpt2-generate: error: ")
        assert case[-1] in stderr


def test_empty_prompt_starts_from_bos(model) -> None:
    output = model.generate("", max_new_tokens=3)
    assert output.results[0].prompt_token_ids == [model.manifest.bos_token_id]
    assert output.results[0].prompt == ""


OPTION_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.sampled_from(["never", True, False, [1, 2], [[3]], 0.5, 1, 2]),
)
OPTION_NAMES = [option.name for option in dataclasses.fields(gpt2onnx.GenerationOptions)]  # every option


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    options=st.dictionaries(st.sampled_from(OPTION_NAMES), OPTION_VALUES, max_size=5),
    prompt=st.one_of(
        st.text(max_size=30), st.binary(max_size=20).map(lambda raw: raw.decode("utf-8", "surrogateescape"))
    ),
)
def test_random_options_and_prompts_give_results_or_the_documented_error(model, options: dict, prompt: str) -> None:
    if "max_length" not in options:
        options.setdefault("max_new_tokens", 3)
    try:
        limit = model.options(**options).max_new_tokens
        output = model.generate(prompt, **options)
    except gpt2onnx.InvalidInputError as error:
        assert "\n" not in str(error)
        return
    for sequence in output.sequences:
        assert 1 <= len(sequence.generated_token_ids) <= limit


# A value of every option that is valid whatever the other options are: any mix of them must generate.
VALID_OPTION_VALUES = {
    "max_new_tokens": st.integers(1, 4),
    "min_new_tokens": st.integers(0, 1),
    "do_sample": st.booleans(),
    "temperature": st.floats(0.05, 4.0),
    "top_k": st.integers(0, 80),
    "top_p": st.floats(0.01, 1.0),
    "min_p": st.none() | st.floats(0.0, 1.0),
    "typical_p": st.floats(0.01, 1.0),
    "repetition_penalty": st.floats(0.5, 3.0),
    "no_repeat_ngram_size": st.integers(0, 3),
    "bad_words_ids": st.lists(st.lists(st.integers(0, 50256), min_size=1, max_size=3), max_size=3),
    "num_beams": st.integers(1, 3),
    "length_penalty": st.floats(-2.0, 2.0),
    "early_stopping": st.sampled_from([True, False, "never"]),
    "eos_token_id": st.integers(0, 50256) | st.lists(st.integers(0, 50256), min_size=1, max_size=2),
    "pad_token_id": st.integers(0, 50256),
    "seed": st.integers(0, 2**32),
    "stop": st.lists(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=3), max_size=2),
    "output_scores": st.booleans(),
    "top_logprobs": st.integers(0, 3),
}
# Options whose valid values depend on others: num_return_sequences (<= num_beams, or sampling), max_length (the
# prompt's length, and not with max_new_tokens); the table above must cover every other option.
DEPENDENT_OPTIONS = {"num_return_sequences", "max_length"}


def test_every_option_has_valid_draws() -> None:
    assert set(VALID_OPTION_VALUES) | DEPENDENT_OPTIONS == set(OPTION_NAMES)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    options=st.fixed_dictionaries({}, optional=VALID_OPTION_VALUES),
    prompt=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30),
)
def test_valid_options_and_prompts_always_generate(model, options: dict, prompt: str) -> None:
    limit = options.setdefault("max_new_tokens", 3)
    output = model.generate(prompt, **options)
    assert len(output.sequences) == 1
    assert 1 <= len(output.sequences[0].generated_token_ids) <= limit


CLI_WORDS = [
    "--max-new-tokens",
    "--top-k",
    "--top-p",
    "--temperature",
    "--num-beams",
    "--do-sample",
    "--seed",
    "--json",
    "--stream",
    "--input-ids",
    "--stop",
    "3",
    "0",
    "-1",
    "1.5",
    "nan",
    "1,2",
    "x",
    "é🤖",
    "",
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(CLI_WORDS), max_size=7))
def test_random_command_lines_give_results_or_exit_2(tiny_gpt2: RandomGPT2, words: list[str]) -> None:
    code, _, stderr = run_generate([*words, "--max-new-tokens", "2", "--model", str(tiny_gpt2.bundle)])
    assert code in (0, 2), stderr
    if code == 2:
        assert stderr.count("\n") == 1 and "Traceback" not in stderr


VALID_FLAGS = {
    "--temperature": st.floats(0.05, 4.0).map(str),
    "--top-k": st.integers(0, 80).map(str),
    "--top-p": st.floats(0.01, 1.0).map(str),
    "--num-beams": st.integers(1, 3).map(str),
    "--seed": st.integers(0, 2**32).map(str),
    "--stop": st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=3),
    "--repetition-penalty": st.floats(0.5, 3.0).map(str),
    "--no-repeat-ngram-size": st.integers(0, 3).map(str),
}
VALID_SWITCHES = ["--do-sample", "--json", "--show-tokens"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flags=st.fixed_dictionaries({}, optional=VALID_FLAGS),
    switches=st.lists(st.sampled_from(VALID_SWITCHES), unique=True),
    prompt=st.sampled_from(["Artificial intelligence", "naïve café 🤖", "a"]),
)
def test_valid_command_lines_exit_0(tiny_gpt2: RandomGPT2, flags: dict, switches: list, prompt: str) -> None:
    words = [prompt, *(f"{flag}={value}" for flag, value in flags.items()), *switches]  # = : a value may start with -
    code, stdout, stderr = run_generate([*words, "--max-new-tokens", "2", "--model", str(tiny_gpt2.bundle)])
    assert code == 0, stderr
    assert stdout


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": "5"}, "max_new_tokens"),
        ({"min_new_tokens": 9, "max_new_tokens": 3}, "min_new_tokens"),
        ({"num_return_sequences": 2}, "num_return_sequences"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_option_errors_name_their_option(options: dict, option: str) -> None:
    """The server reports an option error under its own field name, from this attribute (not from the wording)."""
    with pytest.raises(gpt2onnx.InvalidInputError) as caught:
        gpt2onnx.GenerationOptions.create({}, **options)
    assert caught.value.option == option and str(caught.value).startswith(option)
