"""Sampling and beam sampling: reproducible with a seed, and drawing from exactly the processed distribution.

Frequency tests are Pearson chi-square tests at a false-alarm rate of 1e-3 each, with fixed seeds (so they give the
same verdict on every run); each also shows it has the power to reject a wrong distribution.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _search_fixtures import Pair, chi_square, chi_square_critical, prompt_rows, random_pair, torch_step_logprobs
from gpt2onnx.runtime.search import Sampler

DRAWS = 4000


def processed_distribution(pair: Pair, prompt: list[int], **options) -> tuple[np.ndarray, np.ndarray]:
    """softmax of transformers' processed scores for the first new token, and of its raw logits."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        output = pair.torch_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=1,
            do_sample=True,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=pair.vocab_size - 1,
            **options,
        )
    processed = torch.softmax(output.scores[0][0].double(), dim=-1).numpy()
    raw = torch.softmax(output.logits[0][0].double(), dim=-1).numpy()
    return processed, raw


def test_a_seed_makes_sampling_reproducible() -> None:
    pair = random_pair("wide")
    rows = prompt_rows(pair.vocab_size, (5, 8), seed=1)
    options = {"max_new_tokens": 16, "do_sample": True, "temperature": 1.5, "num_return_sequences": 2}

    def draw(seed: int) -> list[list[int]]:
        output = pair.model.generate(input_ids=rows, seed=seed, **options)
        return [sequence.generated_token_ids for sequence in output.sequences]

    first = draw(5)
    assert len(first) == 4 and draw(5) == first
    assert draw(6) != first
    assert len({tuple(tokens) for tokens in first}) > 1, "the sequences of one call are independent draws"


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0.7, "top_k": 20},
        {},  # transformers' default top_k=50 when sampling
        {"top_p": 0.8, "top_k": 0},
        {"min_p": 0.05, "temperature": 1.3},
        {"typical_p": 0.7, "repetition_penalty": 1.4},
    ],
)
def test_one_step_frequencies_match_the_processed_distribution(options: dict) -> None:
    pair = random_pair("narrow")
    prompt = prompt_rows(pair.vocab_size, (6,), seed=2)[0]
    expected, raw = processed_distribution(pair, prompt, **options)
    output = pair.model.generate(
        input_ids=prompt, max_new_tokens=1, do_sample=True, num_return_sequences=DRAWS, seed=123, **options
    )
    tokens = np.array([sequence.generated_token_ids[0] for sequence in output.sequences])
    counts = np.bincount(tokens, minlength=pair.vocab_size)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected > 0)), "a filtered-out token was drawn"
    statistic, degrees = chi_square(counts, expected)
    assert degrees >= 3, "the distribution should have several likely tokens"
    assert statistic < chi_square_critical(degrees)
    wrong_statistic, wrong_degrees = chi_square(counts, raw)
    assert wrong_statistic > chi_square_critical(wrong_degrees), "the test cannot tell the raw distribution apart"


def test_sampler_frequencies_and_zero_probability_tokens() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(scale=1.5, size=40).astype(np.float32)
    scores[::2] = -np.inf
    draws = Sampler(seed=9)(np.broadcast_to(scores, (20000, 40)))
    counts = np.bincount(draws, minlength=40)
    assert counts[::2].sum() == 0
    expected = np.exp(scores.astype(np.float64) - scores.max())
    expected /= expected.sum()
    statistic, degrees = chi_square(counts, expected)
    assert statistic < chi_square_critical(degrees)
    uniform = np.where(np.isinf(scores), 0.0, 1.0 / 20)
    assert chi_square(counts, uniform)[0] > chi_square_critical(degrees)


def test_sampling_without_replacement_follows_sequential_draws() -> None:
    weights = np.array([0.5, 0.3, 0.15, 0.05])
    rows = 20000
    drawn = Sampler(seed=11).without_replacement(np.broadcast_to(np.log(weights).astype(np.float32), (rows, 4)), 2)
    assert np.all(drawn[:, 0] != drawn[:, 1])
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    counts = np.array([np.sum((drawn[:, 0] == i) & (drawn[:, 1] == j)) for i, j in pairs])
    expected = np.array([weights[i] * weights[j] / (1 - weights[i]) for i, j in pairs])
    statistic, degrees = chi_square(counts, expected)
    assert statistic < chi_square_critical(degrees)
    with_replacement = np.array([weights[i] * weights[j] for i, j in pairs])
    assert chi_square(counts, with_replacement / with_replacement.sum())[0] > chi_square_critical(degrees)


def test_beam_sampling_is_reproducible_scores_its_beams_and_keeps_to_top_k() -> None:
    pair = random_pair("wide")
    prompt = prompt_rows(pair.vocab_size, (6,), seed=4)[0]
    options = {
        "max_new_tokens": 10,
        "do_sample": True,
        "num_beams": 3,
        "num_return_sequences": 3,
        "temperature": 0.7,
        "top_k": 8,
        "output_scores": True,
        "eos_token_id": pair.vocab_size - 1,
    }
    output = pair.model.generate(input_ids=prompt, seed=1, **options)

    def best(seed: int) -> list[int]:
        return pair.model.generate(input_ids=prompt, seed=seed, **options).sequences[0].generated_token_ids

    tokens = [sequence.generated_token_ids for sequence in output.sequences]
    assert best(1) == tokens[0]
    assert any(best(seed) != tokens[0] for seed in (2, 3, 4)), "different seeds should explore different beams"
    assert len({tuple(t) for t in tokens}) == 3
    scores = [sequence.score for sequence in output.sequences]
    assert scores == sorted(scores, reverse=True)
    for sequence in output.sequences:
        # Beam methods process log-probabilities: temperature divides them, top_k keeps the 8 best of each step.
        steps = torch_step_logprobs(pair.torch_model, prompt, sequence.generated_token_ids)
        chosen = steps[np.arange(len(steps)), sequence.generated_token_ids]
        ranks = (steps > chosen[:, None]).sum(axis=1)
        assert np.all(ranks < 8), "a token outside the top 8 was chosen"
        processed = chosen / np.float32(0.7)
        assert [entry.logprob for entry in sequence.logprobs] == pytest.approx(processed.tolist(), abs=1e-4)
        assert sequence.score == pytest.approx(float(processed.sum()) / len(processed), abs=1e-4)
