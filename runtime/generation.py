"""The token loop: prefill, then per step [logits processors -> choose a token -> extend the cache -> stop checks]."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .session import DecoderSession, KVCache

TokenChooser = Callable[[np.ndarray], np.ndarray]
ScoresProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
# (sequences [rows, capacity], columns written, the rows to check) -> bool per checked row: stop these rows
StoppingCriterion = Callable[[np.ndarray, int, np.ndarray], np.ndarray]


@dataclass
class PaddedBatch:
    """Prompts left-padded to one length, as transformers pads a decoder-only batch."""

    input_ids: np.ndarray  # [batch, length] int64
    attention_mask: np.ndarray  # [batch, length] int64, 0 on padding

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]], pad_token_id: int) -> PaddedBatch:
        length = max(len(row) for row in rows)
        input_ids = np.full((len(rows), length), pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for index, row in enumerate(rows):
            if row:
                input_ids[index, length - len(row) :] = row
                attention_mask[index, length - len(row) :] = 1
        return cls(input_ids, attention_mask)

    def pad_lengths(self) -> np.ndarray:
        """Each row's count of left-padding positions."""
        return (self.attention_mask == 0).sum(axis=1)

    def repeat(self, times: int) -> PaddedBatch:
        """Each row repeated `times` times in place (row 0, row 0, ..., row 1, ...), as for beams."""
        return PaddedBatch(np.repeat(self.input_ids, times, axis=0), np.repeat(self.attention_mask, times, axis=0))


def is_eos(tokens: np.ndarray, eos_token_ids: np.ndarray) -> np.ndarray:
    """Which tokens are one of the EOS ids (any shape; a plain comparison: np.isin costs more for a few ids)."""
    if len(eos_token_ids) == 1:
        return tokens == eos_token_ids[0]
    return (tokens[..., None] == eos_token_ids).any(axis=-1)


def growing_mask(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """The prompt's attention mask followed by `new_tokens` columns of ones: step k attends [:, :prompt + k + 1]."""
    rows, length = attention_mask.shape
    mask = np.ones((rows, length + new_tokens), dtype=np.int64)
    mask[:, :length] = attention_mask
    return mask


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Positions counted over real tokens only (cumsum - 1), 0 on padding, as transformers computes them."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    return np.where(attention_mask == 0, 0, positions).astype(np.int64)


@dataclass
class Prefill:
    """The prompts after their one pass through the model, copied to `repeat` rows each (return sequences, beams)."""

    logits: np.ndarray  # [rows, vocab] at each row's last prompt position
    past: KVCache
    attention_mask: np.ndarray  # [rows, prompt + max_new_tokens]: step k attends [:, :prompt + k + 1]
    next_positions: np.ndarray  # [max_new_tokens, rows, 1]: the position ids of step k's token, contiguous per step


def prefill(session: DecoderSession, prompts: PaddedBatch, repeat: int, max_new_tokens: int) -> Prefill:
    """Run each prompt once, then copy its logits and key/values to its `repeat` rows (rows of a prompt are
    adjacent), with a cache of room for max_new_tokens more positions."""
    batch_size, prompt_length = prompts.input_ids.shape
    positions = position_ids_from_mask(prompts.attention_mask)
    cache = session.empty_cache(batch_size, capacity=prompt_length + max_new_tokens)
    logits, past = session.forward(prompts.input_ids, prompts.attention_mask, positions, cache)
    rows = np.repeat(np.arange(batch_size), repeat)
    if repeat > 1:
        past = past.select(rows)
    next_positions = (positions[rows, -1] + np.arange(1, max_new_tokens + 1)[:, None])[:, :, None]
    return Prefill(logits[rows, -1], past, growing_mask(prompts.attention_mask[rows], max_new_tokens), next_positions)


@dataclass
class Step:
    """One decode step's outcome for the whole batch."""

    tokens: np.ndarray  # [batch] chosen tokens (pad for rows already finished)
    scores: np.ndarray  # [batch, vocab] processed scores the tokens were chosen from
    finished: np.ndarray  # [batch] rows that have ended (this step's EOS included)


def token_steps(
    session: DecoderSession,
    prompts: PaddedBatch,
    repeat: int,
    max_new_tokens: int,
    processors: ScoresProcessor,
    choose: TokenChooser,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    stopping: StoppingCriterion | None = None,
) -> Iterator[Step]:
    """Yield one Step per generated token for `repeat` rows per prompt (each prompt runs through the model once)
    until every row has hit EOS (or `stopping`) or max_new_tokens is reached.

    Finished rows keep being fed the pad token with attention 1, exactly as transformers' generate does, so that
    every row's tokens equal what transformers produces for the same batch.
    """
    prompt_length = prompts.input_ids.shape[1]
    start = prefill(session, prompts, repeat, max_new_tokens)
    logits, past, attention_mask = start.logits[:, None, :], start.past, start.attention_mask
    batch_size = len(logits)
    sequences = np.empty((batch_size, prompt_length + max_new_tokens), dtype=np.int64)
    sequences[:, :prompt_length] = np.repeat(prompts.input_ids, repeat, axis=0)
    eos = np.asarray(list(eos_token_ids), dtype=np.int64)
    finished = np.zeros(batch_size, dtype=bool)
    any_finished = False
    # Kept to few numpy calls per step: between two runs of the graph every call starts from cold caches.
    for step in range(max_new_tokens):
        length = prompt_length + step
        scores = logits[:, -1, :]
        if processors:
            scores = processors(sequences[:, :length], scores)
        tokens = choose(scores)
        if any_finished:
            tokens[finished] = pad_token_id
        sequences[:, length] = tokens
        finished = finished | is_eos(tokens, eos)  # a new array: the Steps already yielded keep theirs
        if stopping is not None:
            active = np.flatnonzero(~finished)
            finished[active] |= stopping(sequences, length + 1, active)
        any_finished = bool(finished.any())
        yield Step(tokens, scores, finished)
        if step + 1 == max_new_tokens or (any_finished and finished.all()):
            return
        logits, past = session.forward(
            tokens[:, None], attention_mask[:, : length + 1], start.next_positions[step], past
        )
