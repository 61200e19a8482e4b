"""TextStream: the text pieces of one streamed generation, and how it ended."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .generator import Generator
from .stop_strings import StopStringFilter
from .tokenizer import StreamDecoder


class TextStream(Iterator[str]):
    """Iterates over text pieces as tokens arrive; never splits a UTF-8 character or shows part of a stop string.

    Drives a Generator of one row. Once exhausted, `token_ids` holds the generated ids and `finish_reason` is "stop"
    (EOS, a stop string or criterion) or "length" (max_new_tokens reached). close() ends the generation early.
    """

    def __init__(self, generator: Generator, decoder: StreamDecoder, stop: Sequence[str]) -> None:
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._pieces = self._generate(generator, decoder, StopStringFilter(stop))

    def _generate(self, generator: Generator, decoder: StreamDecoder, held: StopStringFilter) -> Iterator[str]:
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            self.token_ids.append(token)
            piece = held.push(decoder.push(token))
            if piece:
                yield piece
        tail = held.push(decoder.flush()) + held.flush()
        self.finish_reason = generator.finish_reasons()[0]
        if tail:
            yield tail

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()
