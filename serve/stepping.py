"""A request's choices, step by step: one Generator for all its rows, and per step each choice's new piece of text
(never part of a stop string, never a split character) with its log-probabilities. Streamed answers send these as
they come; whole answers join them: both from the same single generation (the scheduler steps it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpt2onnx.runtime.generator import Generator
from gpt2onnx.runtime.stop_strings import StopStringFilter
from gpt2onnx.runtime.tokenizer import StreamDecoder, Tokenizer

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


class ChoiceTracker:
    """A request's choices (the rows of its generator) after each step: what text each new token releases."""

    def __init__(self, generator: Generator, tokenizer: Tokenizer) -> None:
        self.generator = generator
        self.tokenizer = tokenizer
        self.texts = [_ChoiceText(tokenizer, generator.options.stop) for _ in range(generator.rows)]
        self.running = [True] * generator.rows
        self.with_logprobs = generator.options.records_logprobs

    def updates(self) -> list[ChoiceUpdate]:
        """The updates of the step just made, for the choices that were still running before it."""
        generator, tokenizer = self.generator, self.tokenizer
        tokens = generator.get_next_tokens().tolist()
        reasons = generator.finish_reasons()
        logprobs = generator.get_logprobs() if self.with_logprobs else None
        updates = []
        for index, (token, reason) in enumerate(zip(tokens, reasons, strict=True)):
            if not self.running[index]:
                continue
            text, offset = self.texts[index].push(token, last=reason is not None)
            piece = TokenPiece(text, offset, "")
            if logprobs is not None:  # the token's own text is shown with its log-probabilities only
                piece.token = tokenizer.token_strings([token])[0]
                piece.logprob, piece.top = _logprobs(tokenizer, logprobs, index, piece.token)
            updates.append(ChoiceUpdate(index, piece, reason))
            self.running[index] = reason is None
        return updates


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


def join_choices(steps: list[list[ChoiceUpdate]], count: int) -> list[Choice]:
    """The whole answer: every choice's pieces joined, from the same updates a stream sends."""
    choices = [Choice(index, "", None, 0) for index in range(count)]
    for updates in steps:
        for update in updates:
            choice = choices[update.index]
            choice.text += update.piece.text
            choice.pieces.append(update.piece)
            choice.completion_tokens += 1
            choice.finish_reason = update.finish_reason
    return choices
