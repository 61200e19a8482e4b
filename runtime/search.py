"""Choosing tokens from processed scores (greedy, sampling, exact top-k) and what a continuation records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .outputs import TokenLogprob
from .processors import FILTER_VALUE, LogitsProcessorChain, log_softmax, top_k

StepLogprobs = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]  # chosen [rows], top ids / values [rows, top]
TokenChooser = Callable[[np.ndarray], np.ndarray]  # processed scores [rows, vocab] -> one token per row


@dataclass
class Continuation:
    """One generated continuation before decoding: its tokens, why it ended, and what was asked for on the side."""

    tokens: np.ndarray  # generated ids
    stopped: bool  # ended by EOS or a stop string (else by the length limit)
    score: float | None = None  # beams: sum of log-probabilities / length ** length_penalty
    logprobs: np.ndarray | None = None  # [steps] log-probability of each chosen token under the processed scores
    top_ids: np.ndarray | None = None  # [steps, top] the best alternatives at each step
    top_logprobs: np.ndarray | None = None

    def token_logprobs(self) -> list[TokenLogprob] | None:
        """The per-step log-probabilities as TokenLogprob entries (None when they were not recorded)."""
        if self.logprobs is None:
            return None
        entries = []
        for step, (token, logprob) in enumerate(zip(self.tokens.tolist(), self.logprobs.tolist(), strict=True)):
            alternatives: list[tuple[int, float]] = []
            if self.top_ids is not None and self.top_logprobs is not None:
                alternatives = list(zip(self.top_ids[step].tolist(), self.top_logprobs[step].tolist(), strict=True))
            entries.append(TokenLogprob(int(token), float(logprob), alternatives))
        return entries


def is_eos(tokens: np.ndarray, eos_token_ids: np.ndarray) -> np.ndarray:
    """Which tokens are one of the EOS ids (any shape; a plain comparison: np.isin costs more for a few ids)."""
    if len(eos_token_ids) == 1:
        return tokens == eos_token_ids[0]
    return (tokens[..., None] == eos_token_ids).any(axis=-1)


def greedy_choice(scores: np.ndarray) -> np.ndarray:
    """The highest-scoring token of each row (first one on ties, as torch.argmax)."""
    return np.argmax(scores, axis=-1).astype(np.int64, copy=False)


class Sampler:
    """Draws tokens from softmax(scores) (torch.multinomial's distribution) with a seeded numpy Generator."""

    def __init__(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """One token per row."""
        # Only columns some row can draw take part (after top-k, a few dozen of the vocabulary): a filtered
        # column has probability 0 and adds exactly 0 to the running sum, so leaving it out changes no draw.
        columns = np.flatnonzero((scores > FILTER_VALUE).any(axis=0))
        probabilities = np.exp(log_softmax(scores[:, columns]))
        cumulative = np.cumsum(probabilities, axis=-1, dtype=np.float64)
        total = cumulative[:, -1]
        # The first column whose cumulative mass passes u * total (kept below total): probability-0 tokens never win.
        targets = np.minimum(self.rng.random(scores.shape[0]) * total, np.nextafter(total, 0))
        return columns[(cumulative <= targets[:, None]).sum(axis=-1)].astype(np.int64)

    def without_replacement(self, scores: np.ndarray, count: int) -> np.ndarray:
        """`count` distinct indices per row drawn without replacement from softmax(scores).

        The exponential race (largest p_i / E_i first, E_i ~ Exp(1)) is sequential weighted sampling without
        replacement, the distribution of torch.multinomial(..., replacement=False).
        """
        probabilities = np.exp(log_softmax(scores))
        keys = probabilities / self.rng.standard_exponential(probabilities.shape)  # float64: never 0 in practice
        return top_k(keys, count)[1]


class SamplerChain:
    """Logits processors, then the choice of a token (greedy or a seeded Sampler): llama.cpp's sampler chain, itself
    a sampler. A link with an `accept(tokens)` method is told the tokens chosen at each step (stateful links)."""

    def __init__(self, processors: LogitsProcessorChain, choose: TokenChooser) -> None:
        self.processors = processors
        self.choose = choose
        self.accepting = tuple(link for link in (*processors, choose) if hasattr(link, "accept"))
        self._processing = bool(processors)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [rows] chosen from scores [rows, vocab] after the processors, and the processed scores."""
        if self._processing:
            scores = self.processors(input_ids, scores)
        return self.choose(scores), scores

    def accept(self, tokens: np.ndarray) -> None:
        """Tell the stateful links (`accepting`) the tokens chosen at this step."""
        for link in self.accepting:
            link.accept(tokens)


def step_logprobs(scores: np.ndarray, tokens: np.ndarray, top: int) -> StepLogprobs:
    """Log-probabilities (log-softmax of the processed scores) of the chosen tokens, and the `top` best per row."""
    logprobs = log_softmax(scores)
    chosen = np.take_along_axis(logprobs, tokens[:, None], axis=1)[:, 0]
    if top == 0:
        return chosen, None, None
    best, best_ids = top_k(logprobs, top)
    return chosen, best_ids, best
