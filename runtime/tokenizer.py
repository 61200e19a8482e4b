"""The bundle's tokenizer (Hugging Face tokenizers format): encode, decode and incremental detokenisation."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import BundleError, InvalidInputError

REPLACEMENT_CHAR = "\ufffd"
GPT2_VOCAB_SIZE = 50257
# GPT-2's own tokenizer (the vocabulary and merges published with GPT-2), shipped as package data: data/gpt2/README.md.
GPT2_TOKENIZER = Path(str(resources.files(__package__).joinpath("data", "gpt2", "tokenizer.json")))


class Tokenizer:
    """Byte-level BPE tokenizer of the bundle: text <-> token ids, with no special tokens added."""

    def __init__(self, path: str | Path) -> None:
        try:
            self._tokenizer = _HFTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises its own exception type
            raise BundleError(f"tokenizer file {path} cannot be read: {str(error).splitlines()[0]}") from None
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, exactly as transformers' GPT-2 tokenizer gives them."""
        if not isinstance(text, str):
            raise InvalidInputError(f"a prompt must be a string, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        for text in texts:
            if not isinstance(text, str):
                raise InvalidInputError(f"a prompt must be a string, got {type(text).__name__}")
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids (special tokens such as <|endoftext|> kept unless skip_special_tokens)."""
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text, as the course notebook's |token| -> id table shows it."""
        return [self._tokenizer.decode([token]) for token in token_ids]

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns tokens arriving one by one into text pieces, never splitting a multi-byte UTF-8 character.

    Decodes a short window of recent tokens (as text-generation-inference does), so each step costs O(1).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token: int) -> str:
        """Add one token; return the text that is now complete (possibly empty)."""
        self._tokens.append(int(token))
        prefix = self._tokenizer.decode(self._tokens[self._prefix_offset : self._read_offset], self._skip)
        text = self._tokenizer.decode(self._tokens[self._prefix_offset :], self._skip)
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever text is still held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix = self._tokenizer.decode(self._tokens[self._prefix_offset : self._read_offset], self._skip)
        text = self._tokenizer.decode(self._tokens[self._prefix_offset :], self._skip)
        self._prefix_offset = self._read_offset = len(self._tokens)
        return text[len(prefix) :]
