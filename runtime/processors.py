"""Logits processors: small numpy pieces over (input_ids [batch, cur_len], scores [batch, vocab]) -> scores.

Each one reproduces the transformers 5.x processor or warper of the same purpose, and `build_logits_processors`
chains them in the order and under the conditions of `GenerationMixin._get_logits_processor`. input_ids include
the prompt (left padding included), as transformers passes them. Scores stay float32 when given float32; filtered
entries become -inf. No processor modifies its inputs: each returns a new array (or the same one, untouched,
when it has nothing to do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .options import GenerationOptions

LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]

FILTER_VALUE = np.float32(-np.inf)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in the input's float dtype (a row of all -inf gives nan)."""
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in the input's float dtype (-inf stays -inf)."""
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _block_bounds(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row cut into min(width, 32 k) blocks: their starts, their maxima [rows, blocks], and the k-th largest
    maximum of each row, a lower bound of the row's k-th largest entry (k <= width)."""
    width = values.shape[1]
    blocks = min(width, 32 * k)
    starts = (np.arange(blocks) * width) // blocks
    maxima = np.maximum.reduceat(values, starts, axis=1)
    return starts, maxima, np.partition(maxima, blocks - k, axis=1)[:, blocks - k]


def top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row of a 2-D array and their indices, best first; ties go to the lower index.

    A few passes over the row, no sort of it: only the blocks whose maximum reaches the block bound (about k of
    them) are searched and sorted.
    """
    rows, width = values.shape
    k = min(k, width)
    starts, maxima, bound = _block_bounds(values, k)
    block_row, block = np.nonzero(maxima >= bound[:, None])
    sizes = np.diff(starts, append=width)[block]
    row = np.repeat(block_row, sizes)
    column = np.repeat(starts[block] - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())
    found = values[row, column]
    reached = found >= bound[row]
    row, column, found = row[reached], column[reached], found[reached]
    order = np.lexsort((column, -found, row))  # by row, then best first, then lower index
    counts = np.bincount(row, minlength=rows)
    take = (np.cumsum(counts) - counts)[:, None] + np.arange(k)
    return found[order][take], column[order][take]


def kth_largest(values: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest entry of each row of a 2-D array (1 <= k <= width), ties counted.

    Only the entries at or above the block bound (about k of them) are partitioned: a few numpy calls per row,
    where top_k needs a few dozen for its sorted indices.
    """
    bounds = _block_bounds(values, k)[2]
    kth = np.empty(len(values), values.dtype)
    for row, (entries, bound) in enumerate(zip(values, bounds, strict=True)):
        above = entries[entries >= bound]
        kth[row] = np.partition(above, above.size - k)[above.size - k]
    return kth


class RepetitionPenalty:
    """Divide positive / multiply negative scores of tokens already in the row, once each (padding skipped)."""

    def __init__(self, penalty: float, padding: np.ndarray | None = None) -> None:
        """padding: bool [rows, n], True where one of the first n positions holds padding (not a token)."""
        self.penalty = np.float32(penalty)
        self.padding = None if padding is None else np.asarray(padding, dtype=bool)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        counted = input_ids < scores.shape[-1]  # ids past the logits' width cannot be generated: nothing to penalise
        if self.padding is not None:
            width = min(self.padding.shape[1], input_ids.shape[1])
            counted[:, :width] &= ~self.padding[:, :width]
        rows = np.broadcast_to(np.arange(input_ids.shape[0])[:, None], input_ids.shape)[counted]
        tokens = input_ids[counted]
        out = scores.copy()
        seen = out[rows, tokens]
        out[rows, tokens] = np.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return out


class NoRepeatNGram:
    """Ban every token that would complete an n-gram already present in the row."""

    def __init__(self, ngram_size: int) -> None:
        self.ngram_size = ngram_size

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        cur_len = input_ids.shape[1]
        if cur_len < self.ngram_size:
            return scores
        windows = sliding_window_view(input_ids, self.ngram_size, axis=1)  # [batch, n_windows, ngram_size]
        prefix = input_ids[:, cur_len + 1 - self.ngram_size :]  # the last ngram_size - 1 tokens
        rows, starts = np.nonzero((windows[..., :-1] == prefix[:, None, :]).all(axis=-1))
        banned = windows[rows, starts, -1]
        inside = banned < scores.shape[-1]
        out = scores.copy()
        out[rows[inside], banned[inside]] = FILTER_VALUE
        return out


class BadWords:
    """Ban each bad word's last token where the row ends with the rest of it (a one-token word always)."""

    def __init__(self, bad_words_ids: Sequence[Sequence[int]], eos_token_ids: Sequence[int] = ()) -> None:
        words = {tuple(word) for word in bad_words_ids if not (len(word) == 1 and word[0] in eos_token_ids)}
        self.single = np.array(sorted(word[0] for word in words if len(word) == 1), dtype=np.int64)
        by_length: dict[int, list[tuple[int, ...]]] = {}
        for word in sorted(words):
            if len(word) > 1:
                by_length.setdefault(len(word) - 1, []).append(word)
        self.groups = [
            (
                np.array([word[:-1] for word in group], dtype=np.int64),
                np.array([word[-1] for word in group], dtype=np.int64),
            )
            for group in by_length.values()
        ]

    def __bool__(self) -> bool:
        return bool(self.single.size or self.groups)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = scores.copy()
        out[:, self.single] = FILTER_VALUE
        for prefixes, last_tokens in self.groups:
            length = prefixes.shape[1]
            if length > input_ids.shape[1]:
                continue
            rows, words = np.nonzero((input_ids[:, None, -length:] == prefixes[None]).all(axis=-1))
            out[rows, last_tokens[words]] = FILTER_VALUE
        return out


class MinNewTokens:
    """Set the EOS scores to -inf while fewer than min_new_tokens tokens follow the (padded) prompt."""

    def __init__(self, prompt_length: int, min_new_tokens: int, eos_token_ids: Sequence[int]) -> None:
        self.prompt_length = prompt_length
        self.min_new_tokens = min_new_tokens
        self.eos_token_ids = np.array(sorted(set(eos_token_ids)), dtype=np.int64)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if input_ids.shape[1] - self.prompt_length >= self.min_new_tokens:
            return scores
        out = scores.copy()
        out[:, self.eos_token_ids] = FILTER_VALUE
        return out


class Temperature:
    """Divide the scores by the temperature."""

    def __init__(self, temperature: float) -> None:
        self.temperature = np.float32(temperature)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return scores / self.temperature


class TopK:
    """Keep the scores at least as high as the k-th highest (ties kept), k = max(top_k, min_tokens_to_keep)."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1) -> None:
        self.top_k = max(top_k, min_tokens_to_keep)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        threshold = kth_largest(scores, min(self.top_k, scores.shape[-1]))
        return np.where(scores < threshold[:, None], FILTER_VALUE, scores)


class _SortingFilter:
    """Base of the filters that sort a row: they see only the columns some row has not already set to -inf."""

    def _drop(self, scores: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        filtered = scores == FILTER_VALUE
        width = max(scores.shape[-1] - int(filtered.sum(axis=-1).min()), 1)
        if width == scores.shape[-1]:
            return np.where(self._drop(scores), FILTER_VALUE, scores)
        # after top-k only a few columns are left: sort those alone (-inf entries would only be filtered again).
        # A stable sort of the booleans brings them first; numpy's partition is slow on that many equal -inf.
        columns = np.argsort(filtered, axis=-1, kind="stable")[:, :width]
        narrow = np.take_along_axis(scores, columns, axis=-1)
        out = np.full_like(scores, FILTER_VALUE)
        np.put_along_axis(out, columns, np.where(self._drop(narrow), FILTER_VALUE, narrow), axis=-1)
        return out


class TopP(_SortingFilter):
    """Drop the least likely tokens whose cumulative probability stays <= 1 - top_p (keep min_tokens_to_keep)."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1) -> None:
        self.threshold = np.float32(1 - top_p)
        self.min_tokens_to_keep = min_tokens_to_keep

    def _drop(self, scores: np.ndarray) -> np.ndarray:
        order = np.argsort(scores, axis=-1)
        drop_sorted = _cumulative_probs(np.take_along_axis(scores, order, axis=-1)) <= self.threshold
        drop_sorted[:, -self.min_tokens_to_keep :] = False
        return _unsort(drop_sorted, order)


class MinP:
    """Drop tokens less likely than min_p times the top token's probability (keep min_tokens_to_keep)."""

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1) -> None:
        self.min_p = np.float32(min_p)
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        probs = softmax(scores)
        drop = probs < self.min_p * probs.max(axis=-1, keepdims=True)  # never the top token: min_p <= 1
        if self.min_tokens_to_keep > 1:
            keep = min(self.min_tokens_to_keep, probs.shape[-1])
            np.put_along_axis(drop, np.argpartition(-probs, keep - 1, axis=-1)[:, :keep], False, axis=-1)
        return np.where(drop, FILTER_VALUE, scores)


class TypicalP(_SortingFilter):
    """Keep the tokens whose surprisal is closest to the entropy, up to probability mass typical_p."""

    def __init__(self, mass: float, min_tokens_to_keep: int = 1) -> None:
        self.mass = np.float32(mass)
        self.min_tokens_to_keep = min_tokens_to_keep

    def _drop(self, scores: np.ndarray) -> np.ndarray:
        normalized = log_softmax(scores)
        with np.errstate(invalid="ignore"):  # -inf * 0 for filtered tokens: nan, skipped by nansum
            entropy = -np.nansum(normalized * np.exp(normalized), axis=-1, keepdims=True)
        shifted = np.abs(-normalized - entropy)
        order = np.argsort(shifted, axis=-1)
        sorted_shifted = np.take_along_axis(shifted, order, axis=-1)
        cumulative = _cumulative_probs(np.take_along_axis(scores, order, axis=-1))
        last = np.minimum((cumulative < self.mass).sum(axis=-1), scores.shape[-1] - 1)
        drop_sorted = sorted_shifted > np.take_along_axis(sorted_shifted, last[:, None], axis=-1)
        drop_sorted[:, : self.min_tokens_to_keep] = False
        return _unsort(drop_sorted, order)


def _cumulative_probs(sorted_scores: np.ndarray) -> np.ndarray:
    """Running sums of the softmax, accumulated in float64 and stored in the scores' dtype, as torch's cumsum does."""
    return softmax(sorted_scores).cumsum(axis=-1, dtype=np.float64).astype(sorted_scores.dtype)


def _unsort(sorted_values: np.ndarray, order: np.ndarray) -> np.ndarray:
    values = np.empty_like(sorted_values)
    np.put_along_axis(values, order, sorted_values, axis=-1)
    return values


class LogitsProcessorChain:
    """Processors applied one after another; empty (falsy) when there is nothing to do."""

    def __init__(self, processors: Sequence[LogitsProcessor] = ()) -> None:
        self.processors = tuple(processors)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for processor in self.processors:
            scores = processor(input_ids, scores)
        return scores

    def __len__(self) -> int:
        return len(self.processors)

    def __iter__(self) -> Iterator[LogitsProcessor]:
        return iter(self.processors)

    def __repr__(self) -> str:
        return f"LogitsProcessorChain({', '.join(type(p).__name__ for p in self.processors)})"


def build_logits_processors(
    options: GenerationOptions,
    prompt_length: int,
    eos_token_ids: Sequence[int],
    padding: np.ndarray | None = None,
) -> LogitsProcessorChain:
    """The processors transformers' generate would use for these options, in its order.

    prompt_length is the padded prompt width (input_ids.shape[1] before generation); padding, bool [rows, n] for the
    rows the chain will see (beams and return sequences included), marks the padding among the first n positions
    (attention mask 0): transformers 5.x leaves left padding out of the repetition penalty. None means no padding.
    """
    eos = tuple(eos_token_ids)
    processors: list[LogitsProcessor] = []
    if options.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(options.repetition_penalty, padding))
    if options.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGram(options.no_repeat_ngram_size))
    if options.bad_words_ids is not None:
        bad_words = BadWords(options.bad_words_ids, eos)
        if bad_words:
            processors.append(bad_words)
    if options.min_new_tokens > 0 and eos:
        processors.append(MinNewTokens(prompt_length, options.min_new_tokens, eos))
    if options.do_sample:
        # beams keep one token more than there are EOS ids, so a non-EOS continuation survives the filters
        keep = (len(eos) + 1 if eos else 2) if options.num_beams > 1 else 1
        if options.temperature != 1.0:
            processors.append(Temperature(options.temperature))
        if options.top_k != 0:
            processors.append(TopK(options.top_k, keep))
        if options.top_p < 1.0:
            processors.append(TopP(options.top_p, keep))
        if options.min_p is not None:
            processors.append(MinP(options.min_p, keep))
        if options.typical_p < 1.0:
            processors.append(TypicalP(options.typical_p, keep))
    return LogitsProcessorChain(processors)
