"""Streaming joins to exactly the generated text, and stop strings end generation and are cut from the text."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2onnx
from conftest import RandomGPT2, middle_piece
from gpt2onnx.runtime.model import GPT2Model
from gpt2onnx.runtime.stop_strings import StopStringCriterion, StopStringFilter, cut_at_stop
from gpt2onnx.runtime.tokenizer import Tokenizer

PROMPTS = ["Café crème brûlée 🎉", "naïve 日本語 😀 emoji", "Ünïcödé → ∑", "Hello"]
SAMPLING = [{}, {"do_sample": True, "seed": 3}, {"do_sample": True, "seed": 4, "temperature": 1.5, "top_k": 0}]


@pytest.fixture(scope="module")
def model(tiny_gpt2: RandomGPT2) -> GPT2Model:
    return gpt2onnx.load(tiny_gpt2.bundle, provider="cpu")


def test_stream_joins_to_the_generated_text(model: GPT2Model) -> None:
    texts = []
    for prompt in PROMPTS:
        for options in SAMPLING:
            pieces = list(model.stream(prompt, max_new_tokens=40, **options))
            generated = model.generate(prompt, max_new_tokens=40, **options).sequences[0].generated_text
            assert "".join(pieces) == generated, (prompt, options)
            assert all(pieces)
            texts.append(generated)
    non_ascii = "".join(char for text in texts for char in text if ord(char) > 127 and char != "\ufffd")
    assert non_ascii, "some output should hold multi-byte characters, or this test shows nothing about them"


def test_stream_takes_input_ids_and_refuses_beams_at_the_call(model: GPT2Model) -> None:
    ids = model.tokenizer.encode("Café 🎉")
    assert (
        "".join(model.stream(input_ids=ids, max_new_tokens=10)) == model.generate(input_ids=ids, max_new_tokens=10).text
    )
    with pytest.raises(gpt2onnx.InvalidInputError, match="beam"):
        model.stream("Hello", num_beams=2)  # no iteration needed: the call itself refuses
    with pytest.raises(gpt2onnx.InvalidInputError, match="num_return_sequences"):
        model.stream("Hello", do_sample=True, num_return_sequences=2)
    for batch in ({"prompt": ["a", "b"]}, {"input_ids": [[1], [2]]}):
        with pytest.raises(gpt2onnx.InvalidInputError, match="not a batch"):
            model.stream(**batch)


@pytest.mark.parametrize("options", SAMPLING)
def test_stop_string_ends_generation_and_is_cut_in_generate_and_stream(model: GPT2Model, options: dict) -> None:
    prompt = PROMPTS[0]
    free = model.generate(prompt, max_new_tokens=40, **options).sequences[0]
    stop = middle_piece(free.generated_text)
    cut = free.generated_text[: free.generated_text.find(stop)]
    stopped = model.generate(prompt, max_new_tokens=40, stop=[stop], **options).sequences[0]
    assert stopped.generated_text == cut and stopped.text == prompt + cut
    assert stopped.finish_reason == "stop"
    tokens = stopped.generated_token_ids
    assert len(tokens) < len(free.generated_token_ids) and free.generated_token_ids[: len(tokens)] == tokens
    assert stop in model.tokenizer.decode(tokens) and stop not in model.tokenizer.decode(tokens[:-1])
    assert "".join(model.stream(prompt, max_new_tokens=40, stop=[stop], **options)) == cut
    later = middle_piece(free.generated_text[free.generated_text.find(stop) + len(stop) :])
    both = model.generate(prompt, max_new_tokens=40, stop=[later, stop], **options).sequences[0]
    assert both.generated_text == cut


def test_stop_strings_act_per_row_and_on_beams(model: GPT2Model) -> None:
    prompts = PROMPTS[:2]
    free = model.generate(prompts, max_new_tokens=30).sequences
    stop = middle_piece(free[0].generated_text)
    assert stop not in free[1].generated_text
    stopped = model.generate(prompts, max_new_tokens=30, stop=stop).sequences
    assert stopped[0].finish_reason == "stop" and stopped[1].finish_reason == "length"
    assert stopped[1].generated_token_ids == free[1].generated_token_ids
    beams = model.generate(PROMPTS[0], max_new_tokens=30, num_beams=3, num_return_sequences=3)
    stop = middle_piece(beams.text)
    cut_beams = model.generate(PROMPTS[0], max_new_tokens=30, num_beams=3, num_return_sequences=3, stop=[stop])
    assert any(sequence.finish_reason == "stop" for sequence in cut_beams.sequences)
    for sequence in cut_beams.sequences:
        decoded = model.tokenizer.decode(sequence.generated_token_ids)
        assert stop not in sequence.generated_text
        if sequence.finish_reason == "stop":
            assert sequence.generated_text == decoded[: decoded.find(stop)]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab\n\u00e9\U0001f389", max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=8),
    stops=st.lists(st.text(alphabet="ab\n\u00e9\U0001f389", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_string_filter_emits_exactly_the_text_before_the_first_stop(text: str, cuts: list, stops: list) -> None:
    bounds = [0, *sorted(min(cut, len(text)) for cut in cuts), len(text)]
    held = StopStringFilter(stops)
    emitted = "".join(held.push(text[start:end]) for start, end in itertools.pairwise(bounds))
    emitted += held.flush()
    # Generation ends with the piece that completes a stop string; its text is cut at the first stop in it (a stop
    # that would complete later, even if it starts earlier, was never generated).
    ends = [end for end in bounds[1:] if any(stop in text[:end] for stop in stops)]
    generated = text[: ends[0]] if ends else text
    first = min((generated.find(stop) for stop in stops if stop in generated), default=len(generated))
    assert emitted == generated[:first]


def test_cut_at_stop_cuts_at_the_earliest_stop_whatever_its_place_in_the_list() -> None:
    assert cut_at_stop("one two three", ["three", "two"]) == ("one ", True)
    assert cut_at_stop("one two", ["three"]) == ("one two", False)


def test_stop_string_filter_holds_back_a_possible_start() -> None:
    held = StopStringFilter(["\n\n", "END"])
    assert held.push("Hello\n") == "Hello"
    assert held.push("wor") == "\nwor"
    assert held.push("ld E") == "ld "
    assert held.push("N") == ""
    assert held.push("D and more") == ""
    assert held.stopped and held.flush() == ""


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_stop_criterion_fires_at_the_token_that_completes_the_stop_string(tokenizer: Tokenizer, data) -> None:
    text = data.draw(st.text(alphabet=st.sampled_from("ab \n\u00e9\u65e5\U0001f389"), min_size=2, max_size=30))
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start : start + data.draw(st.integers(1, 4))]
    tokens = [17, *tokenizer.encode(text)]  # a one-token prompt, left out of the search
    criterion = StopStringCriterion(tokenizer, [stop], prompt_length=1)
    row = np.array([tokens + tokenizer.encode(stop)])  # columns past `end` (here: the stop itself) are not read
    fired = [bool(criterion(row, end, np.array([0]), None)[0]) for end in range(2, len(tokens) + 1)]
    expected = [stop in tokenizer.decode(tokens[1:end]) for end in range(2, len(tokens) + 1)]
    assert fired.index(True) == expected.index(True)


def test_text_stream_reports_how_it_ended(tiny_gpt2) -> None:
    import gpt2onnx

    model = gpt2onnx.load(tiny_gpt2.bundle)
    full = model.generate("Artificial intelligence", max_new_tokens=10).results[0].sequences[0]
    stream = model.stream("Artificial intelligence", max_new_tokens=10)
    assert stream.finish_reason is None
    assert "".join(stream) == full.generated_text
    assert (stream.token_ids, stream.finish_reason) == (full.generated_token_ids, "length")
    eos = full.generated_token_ids[3]
    stopped = model.stream("Artificial intelligence", max_new_tokens=10, eos_token_id=eos)
    list(stopped)
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.generated_token_ids[:4]
