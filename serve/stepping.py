"""A request's choices, step by step: one Generator for all its rows, and per step each choice's new piece of text
(never part of a stop string, never a split character) with its log-probabilities. Streamed answers send these as
they come; whole answers join them: both from the same single generation."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from gpt2onnx.runtime.generator import Generator
from gpt2onnx.runtime.stop_strings import StopStringFilter
from gpt2onnx.runtime.tokenizer import StreamDecoder, Tokenizer

from .engine import Cancelled
from .protocol import Choice, TokenPiece


@dataclass
class ChoiceUpdate:
    """What one step added to one choice: a token's piece, and the finish reason if the choice ended there."""

    index: int
    piece: TokenPiece
    finish_reason: str | None


class _ChoiceText:
    """One choice's text so far: tokens through an incremental decoder, then a filter that holds back what could
    still become a stop string and cuts at one."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.decoder: StreamDecoder = tokenizer.stream_decoder()
        self.held = StopStringFilter(stop)
        self.length = 0

    def push(self, token: int, last: bool) -> tuple[str, int]:
        """The text this token releases (everything left when it is the last), and where it starts."""
        text = self.held.push(self.decoder.push(token))
        if last:
            text += self.held.push(self.decoder.flush()) + self.held.flush()
        offset, self.length = self.length, self.length + len(text)
        return text, offset


def choice_steps(generator: Generator, tokenizer: Tokenizer, stop: tuple[str, ...]) -> Iterator[list[ChoiceUpdate]]:
    """Run the generator to its end; yield, after each step, the updates of the choices that were still running."""
    texts = [_ChoiceText(tokenizer, stop) for _ in range(generator.rows)]
    running = [True] * generator.rows
    with_logprobs = generator.options.records_logprobs
    while not generator.is_done():
        generator.generate_next_token()
        tokens = generator.get_next_tokens().tolist()
        reasons = generator.finish_reasons()
        logprobs = generator.get_logprobs() if with_logprobs else None
        updates = []
        for index, (token, reason) in enumerate(zip(tokens, reasons, strict=True)):
            if not running[index]:
                continue
            text, offset = texts[index].push(token, last=reason is not None)
            name = tokenizer.token_strings([token])[0]
            piece = TokenPiece(text, offset, name)
            if logprobs is not None:
                piece.logprob, piece.top = _logprobs(tokenizer, logprobs, index, name)
            updates.append(ChoiceUpdate(index, piece, reason))
            running[index] = reason is None
        yield updates


def _logprobs(tokenizer: Tokenizer, logprobs: tuple, row: int, token: str) -> tuple[float, dict[str, float] | None]:
    """OpenAI's logprob of the chosen token and its top_logprobs entry: the best alternatives and always the chosen
    token; filtered-out ones (-inf) dropped."""
    chosen, top_ids, top_values = logprobs
    value = float(chosen[row])
    if top_ids is None:
        return value, None
    strings = tokenizer.token_strings(top_ids[row].tolist())
    top = {text: float(v) for text, v in zip(strings, top_values[row].tolist(), strict=True) if math.isfinite(v)}
    top.setdefault(token, value)
    return value, top


def collect_choices(steps: Iterator[list[ChoiceUpdate]], count: int, cancelled: threading.Event) -> list[Choice]:
    """The whole answer: every choice's pieces joined, from the same steps a stream would send (stopped at the next
    step once `cancelled` is set: the client left)."""
    choices = [Choice(index, "", None, 0) for index in range(count)]
    for updates in steps:
        if cancelled.is_set():
            raise Cancelled
        for update in updates:
            choice = choices[update.index]
            choice.text += update.piece.text
            choice.pieces.append(update.piece)
            choice.completion_tokens += 1
            choice.finish_reason = update.finish_reason
    return choices
