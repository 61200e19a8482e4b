"""The bundle tokenizer with the real GPT-2 files gives the course's ids and round-trips any text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2onnx.runtime.tokenizer import Tokenizer

UNICODE_SAMPLES = [
    "naïve café, déjà vu — Ünïcödé",
    "emoji 🤖🧠✨ and flags 🇫🇷🇯🇵 and a family 👨‍👩‍👧‍👦",
    "中文字符和日本語のテキスト、한국어",
    "math ∑∫√∞ ≠ ≤ and arrows → ⇒",
    "tabs\tand\nnew lines\r\n  spaces   ",
    "<|endoftext|> is a special token",
]


def test_course_encodings(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("ArtificCial intElliGence") == [8001, 811, 34, 498, 493, 36, 15516, 38, 594]
    assert tokenizer.encode("Artificial intelligence") == [8001, 9542, 4430]
    assert tokenizer.decode([8001, 9542, 4430, 318]) == "Artificial intelligence is"
    assert tokenizer.token_strings([8001, 9542, 4430]) == ["Art", "ificial", " intelligence"]
    assert tokenizer.vocab_size == 50257


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_unicode_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_any_text_round_trips(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_stream_decoder_joins_to_the_whole_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    decoder = tokenizer.stream_decoder(skip_special_tokens=False)
    pieces = [decoder.push(token) for token in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in text


def test_stream_decoder_never_splits_a_multibyte_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🤖")
    assert len(ids) > 1, "the robot emoji takes several byte-level tokens"
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(token) for token in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🤖"
