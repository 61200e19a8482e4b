"""Stop strings: end a sequence once its generated text contains one, and cut the text there (also when streaming)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .tokenizer import Tokenizer


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string in it, and whether one was found."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return (text[: min(found)], True) if found else (text, False)


class StopStringCriterion:
    """Stopping criterion: which rows' generated tokens (after the prompt) now spell one of the stop strings.

    Only the last few tokens are decoded each step: every token holds at least one byte, so a stop string of b
    bytes that was completed by the newest token lies within its last b tokens.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.prompt_length = prompt_length
        self.window = max(len(stop.encode("utf-8")) for stop in self.stops)

    def __call__(self, sequences: np.ndarray, length: int, rows: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
        """Whether each of `rows` of sequences [all rows, capacity] (prompt included), whose first `length` columns
        are written, now ends in a stop string -> bool [len(rows)]. Only the window's columns are read."""
        start = max(self.prompt_length, length - self.window)
        tails = sequences[rows, start:length].tolist()
        return np.array(
            [
                any(stop in self.tokenizer.decode(tail, skip_special_tokens=True) for stop in self.stops)
                for tail in tails
            ],
            dtype=bool,
        )


class StopStringFilter:
    """Streams text through, holding back any tail that could still become a stop string, and cutting at one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.longest = max((len(stop) for stop in self.stops), default=0)
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """The part of the text so far that is now safe to emit (nothing more once a stop string was seen)."""
        if self.stopped:
            return ""
        text, self.stopped = cut_at_stop(self.held + piece, self.stops)
        if self.stopped:
            self.held = ""
            return text
        hold = self._possible_start(text)
        self.held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """What is still held at the end of generation (it never completed a stop string)."""
        held, self.held = self.held, ""
        return held

    def _possible_start(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        for length in range(min(len(text), self.longest - 1), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self.stops):
                return length
        return 0
