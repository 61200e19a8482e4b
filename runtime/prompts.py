"""Prompts as token-id rows: text or ids in, checked rows out (an empty prompt starts from the BOS token)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError
from .tokenizer import Tokenizer

PromptInput = str | Sequence[str] | None
IdsInput = Sequence[int] | Sequence[Sequence[int]] | np.ndarray | None


@dataclass(frozen=True)
class EncodedPrompts:
    prompts: list[str | None]  # the texts (None for rows given as ids)
    rows: list[list[int]]


def encode_prompts(
    tokenizer: Tokenizer | None,
    prompt: PromptInput,
    input_ids: IdsInput,
    vocab_size: int,
    bos_token_id: int | None,
    no_tokenizer: str = "this model has no tokenizer: pass input_ids",
) -> EncodedPrompts:
    """Token ids of each prompt (text, list of texts, ids or list of id rows); InvalidInputError for anything else,
    an id outside the vocabulary, or an empty prompt without a BOS token to start from."""
    if (prompt is None) == (input_ids is None):
        raise InvalidInputError("give either a prompt (text or list of texts) or input_ids, not both or neither")
    if prompt is not None:
        if not isinstance(prompt, (str, list, tuple)):
            raise InvalidInputError(f"a prompt must be a string or a list of strings, got {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InvalidInputError("the list of prompts is empty")
        for text in prompts:
            check_text(text)
        if tokenizer is None:
            raise InvalidInputError(no_tokenizer)
        rows = tokenizer.encode_batch(prompts)
    else:
        rows = id_rows(input_ids)
        prompts = [None] * len(rows)
    check_ids(rows, vocab_size)
    if any(not row for row in rows):
        if bos_token_id is None:
            raise InvalidInputError("empty prompt, and this model has no BOS token to start from")
        rows = [row or [bos_token_id] for row in rows]
    return EncodedPrompts(prompts, rows)


def is_text(prompt: object) -> bool:
    """Whether a prompt is text (a string or a list of strings) rather than token ids."""
    return isinstance(prompt, str) or (
        isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], str)
    )


def check_ids(rows: list[list[int]], vocab_size: int) -> None:
    for row in rows:
        for token in row:
            if not 0 <= token < vocab_size:
                raise InvalidInputError(f"token id {token} is outside the vocabulary (0..{vocab_size - 1})")


def check_text(text: object) -> None:
    if not isinstance(text, str):
        raise InvalidInputError(f"a prompt must be a string, got {type(text).__name__}")
    if "\x00" in text:
        raise InvalidInputError("the prompt contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError("the prompt is not valid UTF-8 (it contains a lone surrogate)") from None


def id_rows(input_ids: IdsInput) -> list[list[int]]:
    """input_ids as a list of rows: a flat list of ints is one row; numpy arrays are accepted."""
    if isinstance(input_ids, np.ndarray):
        input_ids = input_ids.tolist()
    if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence) or len(input_ids) == 0:
        raise InvalidInputError("input_ids must be a non-empty list of token ids, or a list of such lists")
    rows = [input_ids] if not isinstance(input_ids[0], (Sequence, np.ndarray)) else list(input_ids)
    result = []
    for row in rows:
        row = row.tolist() if isinstance(row, np.ndarray) else row
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise InvalidInputError("input_ids must be a list of token ids, or a list of such lists")
        for token in row:
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
                raise InvalidInputError(f"input_ids must hold integers, got {token!r}")
        result.append([int(token) for token in row])
    return result
