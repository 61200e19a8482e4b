"""The workload every benchmark script times (run.py's workers, profile_decode.py, gpu_check.py): same prompts,
same per-token formula, so their numbers compare. Standard library only: peers' venvs import it too."""

from __future__ import annotations

import math

PROMPT = [8001, 811, 34, 498, 493, 36, 15516, 38, 594]  # 'ArtificCial intElliGence'
EOS = 50256  # GPT-2's end of text, also the pad token of batches


def long_prompt(length: int) -> list[int]:
    """A prompt of `length` tokens: PROMPT over and over."""
    return (PROMPT * math.ceil(length / len(PROMPT)))[:length]


def decode_ms_per_token(one_token_s: float, all_tokens_s: float, new_tokens: int) -> float:
    """(time for N new tokens - time for 1) / (N - 1), in ms: the prompt's prefill cancels out."""
    return (all_tokens_s - one_token_s) * 1000 / (new_tokens - 1)
