"""TextStream: the text pieces of one streamed generation, and how it ended."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .generation import Step
from .stop_strings import StopStringFilter
from .tokenizer import StreamDecoder


class TextStream(Iterator[str]):
    """Iterates over text pieces as tokens arrive; never splits a UTF-8 character or shows part of a stop string.

    Once exhausted, `token_ids` holds the generated ids and `finish_reason` is "stop" (EOS or a stop string) or
    "length" (max_new_tokens reached). close() ends the generation early.
    """

    def __init__(self, steps: Iterator[Step], decoder: StreamDecoder, stop: Sequence[str]) -> None:
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._pieces = self._generate(steps, decoder, StopStringFilter(stop))

    def _generate(self, steps: Iterator[Step], decoder: StreamDecoder, held: StopStringFilter) -> Iterator[str]:
        ended = False
        for step in steps:
            token = int(step.tokens[0])
            self.token_ids.append(token)
            ended = bool(step.finished[0])
            piece = held.push(decoder.push(token))
            if piece:
                yield piece
        tail = held.push(decoder.flush()) + held.flush()
        self.finish_reason = "stop" if ended else "length"
        if tail:
            yield tail

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()
