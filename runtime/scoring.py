"""Teacher forcing: the log-probability of each token of a sequence given the ones before it, in one pass per chunk."""

from __future__ import annotations

import numpy as np

from .processors import log_softmax
from .session import DecoderSession

CHUNK = 256  # tokens per run: logits of every position of a chunk are [CHUNK, vocab] (51 MB for GPT-2's vocabulary)


def token_logprobs(session: DecoderSession, ids: np.ndarray) -> np.ndarray:
    """log p(ids[i + 1] | ids[: i + 1]) for every i, float64 [len(ids) - 1]: the sequence runs through the model in
    chunks over one cache, with the logits of every position kept."""
    cache = session.empty_cache(1, capacity=len(ids))
    found = []
    for start in range(0, len(ids) - 1, CHUNK):
        end = min(start + CHUNK, len(ids) - 1)  # the last token predicts nothing
        logits, cache = session.forward(
            ids[None, start:end], np.ones((1, end), np.int64), np.arange(start, end)[None], cache, logits_to_keep=0
        )
        logprobs = log_softmax(logits[0].astype(np.float64))
        found.append(logprobs[np.arange(end - start), ids[start + 1 : end + 1]])
    return np.concatenate(found)
