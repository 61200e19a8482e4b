"""Greedy output and logits of exported bundles equal transformers' on the same random weights."""

from __future__ import annotations

import numpy as np
import pytest

import gpt2onnx
from conftest import RandomGPT2, build_random_gpt2
from gpt2onnx.runtime.padding import PaddedBatch, position_ids_from_mask
from reference import reference_generate, reference_logits

PROMPTS = ["Artificial intelligence", "The quick brown fox jumps over the lazy dog, and then", "Hello"]
NEW_TOKENS = 24


def bundle_greedy(model: gpt2onnx.runtime.model.GPT2Model, rows, **options) -> list[list[int]]:
    output = model.generate(input_ids=rows, max_new_tokens=NEW_TOKENS, **options)
    return [result.sequences[0].generated_token_ids for result in output.results]


@pytest.fixture(scope="module")
def tiny_wide(tmp_path_factory: pytest.TempPathFactory) -> RandomGPT2:
    """A second tiny shape: 3 layers, 4 heads, a 1000-token vocabulary, 128 positions."""
    return build_random_gpt2(tmp_path_factory.mktemp("tiny-wide"), "tiny-wide", seed=7)


@pytest.mark.parametrize("fixture_name", ["tiny_gpt2", "tiny_wide", "small_gpt2"])
def test_greedy_equals_transformers_single_and_batched(fixture_name: str, request: pytest.FixtureRequest) -> None:
    checkpoint: RandomGPT2 = request.getfixturevalue(fixture_name)
    model = gpt2onnx.load(checkpoint.bundle, provider="cpu")
    torch_model = checkpoint.torch_model()
    vocab = model.manifest.architecture.vocab_size
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, vocab, size=length).tolist() for length in (9, 3, 14)]
    eos = [model.manifest.eos_token_id if model.manifest.eos_token_id < vocab else vocab - 1]
    pad = eos[0]

    single = bundle_greedy(model, [rows[0]])
    assert single == reference_generate(torch_model, [rows[0]], pad, eos, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert len(single[0]) == NEW_TOKENS
    assert len(set(single[0])) > 1, "the test model should not just repeat one token"

    batched = bundle_greedy(model, rows)
    assert batched == reference_generate(torch_model, rows, pad, eos, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert batched[0] == single[0], "left padding must not change a row's output"


def test_per_row_eos_and_min_new_tokens_match_transformers(tiny_gpt2: RandomGPT2) -> None:
    model = gpt2onnx.load(tiny_gpt2.bundle, provider="cpu")
    torch_model = tiny_gpt2.torch_model()
    rows = [model.tokenizer.encode(text) for text in PROMPTS]
    free_run = bundle_greedy(model, rows)
    # Use a token that row 0 produces mid-way as EOS, so that row stops early while the others go on.
    eos = [free_run[0][5]]
    stopped = bundle_greedy(model, rows, eos_token_id=eos[0], pad_token_id=0)
    assert stopped == reference_generate(torch_model, rows, 0, eos, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert stopped[0][-1] == eos[0] and len(stopped[0]) < NEW_TOKENS
    delayed = bundle_greedy(model, rows, eos_token_id=eos[0], pad_token_id=0, min_new_tokens=12)
    expected = reference_generate(
        torch_model, rows, 0, eos, max_new_tokens=NEW_TOKENS, min_new_tokens=12, do_sample=False
    )
    assert delayed == expected
    assert len(delayed[0]) >= 12


def test_text_prompts_match_transformers(tiny_gpt2: RandomGPT2) -> None:
    model = gpt2onnx.load(tiny_gpt2.bundle, provider="cpu")
    output = model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    rows = [model.tokenizer.encode(text) for text in PROMPTS]
    expected = reference_generate(
        tiny_gpt2.torch_model(), rows, 50256, [50256], max_new_tokens=NEW_TOKENS, do_sample=False
    )
    for result, prompt, row, tokens in zip(output.results, PROMPTS, rows, expected, strict=True):
        sequence = result.sequences[0]
        assert result.prompt == prompt and result.prompt_token_ids == row
        assert sequence.generated_token_ids == tokens
        assert sequence.token_ids == row + tokens
        assert sequence.text == model.tokenizer.decode(row + tokens, skip_special_tokens=True)


@pytest.mark.parametrize("fixture_name", ["tiny_gpt2", "small_gpt2"])
def test_logits_within_1e_4_for_prompt_and_decode_steps(fixture_name: str, request: pytest.FixtureRequest) -> None:
    checkpoint: RandomGPT2 = request.getfixturevalue(fixture_name)
    model = gpt2onnx.load(checkpoint.bundle, provider="cpu")
    torch_model = checkpoint.torch_model()
    rng = np.random.default_rng(5)
    vocab = model.manifest.architecture.vocab_size
    tokens = rng.integers(0, vocab, size=(2, 16))
    expected = reference_logits(torch_model, tokens)
    session = model.session
    batch = PaddedBatch(tokens[:, :10], np.ones((2, 10), dtype=np.int64))
    logits, past = session.forward(
        batch.input_ids, batch.attention_mask, position_ids_from_mask(batch.attention_mask), session.empty_cache(2), 0
    )
    assert np.max(np.abs(logits - expected[:, :10])) < 1e-4
    for position in range(10, 16):  # decode steps, one token at a time, with the growing past
        mask = np.ones((2, position + 1), dtype=np.int64)
        step_logits, past = session.forward(tokens[:, position : position + 1], mask, mask[:, -1:] * position, past)
        assert step_logits.shape == (2, 1, vocab)
        assert np.max(np.abs(step_logits[:, 0] - expected[:, position])) < 1e-4
    validation = model.manifest.data["validation"]
    assert validation["passed"] and validation["max_abs_logits_diff"] < 1e-4
