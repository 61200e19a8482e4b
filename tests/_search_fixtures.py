"""Small random GPT-2s for the search, sampling and streaming tests (built once per session), and reference helpers."""

from __future__ import annotations

import atexit
import functools
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import gpt2onnx
from conftest import build_random_gpt2
from gpt2onnx.runtime.model import GPT2Model
from reference import left_padded

# name -> (conftest shape, seed, config overrides). Small vocabularies so that a chosen EOS really turns up;
# a large initializer_range so that outputs vary instead of repeating one token.
MODELS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "narrow": ("tiny-wide", 11, {"vocab_size": 300, "n_layer": 2, "n_head": 2, "n_embd": 32, "initializer_range": 0.3}),
    "wide": ("tiny-wide", 12, {"vocab_size": 500, "n_layer": 3, "n_head": 4, "n_embd": 64, "initializer_range": 0.4}),
    "deep": ("tiny-wide", 13, {"vocab_size": 400, "n_layer": 4, "n_head": 2, "n_embd": 48, "initializer_range": 0.5}),
}


@dataclass(frozen=True)
class Pair:
    """The exported bundle, loaded by the runtime, and the same weights in transformers."""

    model: GPT2Model
    torch_model: Any

    @property
    def vocab_size(self) -> int:
        return self.model.manifest.architecture.vocab_size


@functools.cache
def random_pair(name: str) -> Pair:
    """The named random GPT-2, exported into a temporary folder that is removed when the session ends."""
    shape, seed, overrides = MODELS[name]
    root = Path(tempfile.mkdtemp(prefix=f"gpt2onnx-search-{name}-"))
    atexit.register(shutil.rmtree, root, True)
    checkpoint = build_random_gpt2(root, shape, seed, **overrides)
    return Pair(gpt2onnx.load(checkpoint.bundle, provider="cpu", threads=1), checkpoint.torch_model())


def prompt_rows(vocab_size: int, lengths: Sequence[int], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size - 1, size=length).tolist() for length in lengths]


def reference_beams(
    torch_model: Any, rows: Sequence[Sequence[int]], pad: int, **options: Any
) -> tuple[list[list[int]], list[float]]:
    """transformers' beam search on left-padded rows: every returned sequence's new tokens (fill included), scores."""
    import torch

    ids, mask = left_padded(rows, pad)
    with torch.no_grad():
        output = torch_model.generate(
            input_ids=ids,
            attention_mask=mask,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_scores=True,
            **options,
        )
    return output.sequences[:, ids.shape[1] :].tolist(), output.sequences_scores.tolist()


def torch_step_logprobs(torch_model: Any, prompt: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
    """log_softmax of transformers' logits at each generated position: [len(tokens), vocab]."""
    import torch

    with torch.no_grad():
        logits = torch_model(input_ids=torch.tensor([list(prompt) + list(tokens)])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].numpy()


def chi_square(counts: np.ndarray, expected_probabilities: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, pooling the bins expected fewer than 5 times into one."""
    expected = expected_probabilities * counts.sum()
    small = expected < 5
    observed_bins = np.append(counts[~small], counts[small].sum())
    expected_bins = np.append(expected[~small], expected[small].sum())
    if expected_bins[-1] == 0:
        observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
    statistic = float(((observed_bins - expected_bins) ** 2 / expected_bins).sum())
    return statistic, len(expected_bins) - 1


def chi_square_critical(degrees: int, false_alarm: float = 1e-3) -> float:
    """Upper quantile of the chi-square distribution (Wilson-Hilferty); false_alarm is 1e-3 or 1e-6."""
    z = {1e-3: 3.090232, 1e-6: 4.753424}[false_alarm]
    h = 2.0 / (9.0 * degrees)
    return degrees * (1.0 - h + z * math.sqrt(h)) ** 3
