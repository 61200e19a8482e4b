"""Teacher forcing: the log-probability of each token given the ones before it, and the perplexity of a text longer
than the context by a sliding window (the method of transformers' guide "Perplexity of fixed-length models").

A sequence runs through the model in chunks over one cache; only the chunks whose positions are scored ask for the
logits of every position (the others, which only fill the cache, keep one).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from .processors import log_softmax
from .session import DecoderSession

CHUNK = 256  # tokens per run: logits of every position of a chunk are [CHUNK, vocab] (51 MB for GPT-2's vocabulary)


def position_logits(session: DecoderSession, ids: np.ndarray, first: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(start, logits [n, vocab]) for the positions first .. len(ids) - 2, each predicting the token after it, chunk
    by chunk; the positions before `first` only fill the cache."""
    cache = session.empty_cache(1, capacity=len(ids))
    for start in range(0, len(ids) - 1, CHUNK):
        end = min(start + CHUNK, len(ids) - 1)  # the last token predicts nothing
        kept = 0 if end > first else 1
        logits, cache = session.forward(
            ids[None, start:end], np.ones((1, end), np.int64), np.arange(start, end)[None], cache, logits_to_keep=kept
        )
        if kept == 0:
            offset = max(first - start, 0)
            yield start + offset, logits[0, offset:]


def token_logprobs(session: DecoderSession, ids: np.ndarray) -> np.ndarray:
    """log p(ids[i + 1] | ids[: i + 1]) for every i, float64 [len(ids) - 1]."""
    found = []
    for start, logits in position_logits(session, ids):
        logprobs = log_softmax(logits.astype(np.float64))
        found.append(logprobs[np.arange(len(logits)), ids[start + 1 : start + 1 + len(logits)]])
    return np.concatenate(found)


@dataclass(frozen=True)
class Window:
    """One pass of the sliding window: ids[begin:end], of which the last `targets` tokens are scored."""

    begin: int
    end: int
    targets: int


def sliding_windows(length: int, context: int, stride: int) -> list[Window]:
    """The guide's windows: each `context` tokens long (the last may be shorter), starting `stride` tokens after the
    previous one, scoring the tokens the previous window did not reach."""
    windows, previous_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + context, length)
        windows.append(Window(begin, end, end - previous_end))
        previous_end = end
        if end == length:
            break
    return windows


@dataclass
class Agreement:
    """How far a model's next-token distributions are from a reference's at the same positions, summed chunk by
    chunk: the mean KL divergence KL(reference || model) per position, the share of positions whose most likely
    token is the same (top-1 agreement) and the largest |logits difference|."""

    kl_sum: float = 0.0
    agreeing: int = 0
    positions: int = 0
    max_logits_diff: float = 0.0

    def add(self, logprobs: np.ndarray, logits: np.ndarray, reference_logits: np.ndarray) -> None:
        """One chunk: the model's float64 log-probabilities and logits, and the reference's logits [n, vocab]."""
        reference_logprobs = log_softmax(reference_logits.astype(np.float64))
        self.kl_sum += float((np.exp(reference_logprobs) * (reference_logprobs - logprobs)).sum())
        self.agreeing += int((logits.argmax(axis=1) == reference_logits.argmax(axis=1)).sum())
        self.positions += len(logits)
        self.max_logits_diff = max(self.max_logits_diff, float(np.abs(logits - reference_logits).max()))

    @property
    def kl_divergence(self) -> float:
        return self.kl_sum / self.positions

    @property
    def top1_agreement(self) -> float:
        return self.agreeing / self.positions


@dataclass
class PerplexityReport:
    """gpt2-perplexity's result. With a reference model (compare): the mean KL divergence per scored token
    KL(reference || model), the share of scored positions where both models' most likely next token agree
    (teacher-forced top-1 agreement), and the largest |logits difference| anywhere."""

    perplexity: float
    tokens: int  # the tokens counted, as the guide counts them (each window's scored tokens, less one)
    windows: int
    stride: int
    context: int
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    max_logits_diff: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def perplexity(
    session: DecoderSession,
    ids: np.ndarray,
    stride: int,
    reference: DecoderSession | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityReport:
    """The perplexity of ids under the session's model by the guide's sliding window (exp of the summed negative
    log-likelihood over the tokens counted); with a reference session, how far the model's distributions are from
    the reference's at the same positions. progress(done, total) is told each window."""
    context = session.architecture.n_positions
    windows = sliding_windows(len(ids), context, stride)
    nll_sum, counted = 0.0, 0
    agreement = Agreement()
    for index, window in enumerate(windows):
        window_ids = ids[window.begin : window.end]
        first = max(len(window_ids) - window.targets, 1) - 1  # the position predicting the first scored token
        theirs_by_chunk = (
            position_logits(reference, window_ids, first) if reference is not None else itertools.repeat(None)
        )
        pairs = zip(position_logits(session, window_ids, first), theirs_by_chunk, strict=False)  # repeat() is endless
        window_nll, window_count = 0.0, 0
        for (start, logits), theirs in pairs:
            logprobs = log_softmax(logits.astype(np.float64))
            targets = window_ids[start + 1 : start + 1 + len(logits)]
            window_nll -= float(logprobs[np.arange(len(logits)), targets].sum())
            window_count += len(logits)
            if theirs is not None:
                agreement.add(logprobs, logits, theirs[1])
        weight = window.targets - 1  # the guide's count: the window's labels, less one for the shift
        nll_sum += window_nll / window_count * weight
        counted += weight
        if progress is not None:
            progress(index + 1, len(windows))
    report = PerplexityReport(math.exp(nll_sum / counted), counted, len(windows), stride, context)
    if reference is not None:
        report.kl_divergence, report.top1_agreement = agreement.kl_divergence, agreement.top1_agreement
        report.max_logits_diff = agreement.max_logits_diff
    return report
