"""Beam search and greedy search (with logits processors) equal transformers' generate token for token."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _search_fixtures import Pair, prompt_rows, random_pair, reference_beams, torch_step_logprobs
from gpt2onnx.runtime.outputs import GenerationOutput
from gpt2onnx.runtime.processors import kth_largest, top_k
from reference import reference_generate

NEW_TOKENS = 12
FULL_GRID = list(itertools.product((2, 4, 5), (0.6, 1.0, 2.0), (True, False, "never")))
# Latin squares: on each further model, every pair of values of two of the three settings comes up once.
LATIN = [
    (beams, penalty, (True, False, "never")[(i + j) % 3])
    for i, beams in enumerate((2, 4, 5))
    for j, penalty in enumerate((0.6, 1.0, 2.0))
]
CASES = [("narrow", *case) for case in FULL_GRID] + [(name, *case) for name in ("wide", "deep") for case in LATIN]


def eos_seen_midway(pair: Pair, rows: list[list[int]]) -> int:
    """A token that greedy search produces a few steps in, so that it ends some beams early when used as EOS."""
    free_run = pair.model.generate(input_ids=rows, max_new_tokens=NEW_TOKENS, eos_token_id=pair.vocab_size - 1)
    return free_run.results[0].sequences[0].generated_token_ids[3]


def assert_beams_equal_transformers(pair: Pair, rows: list[list[int]], pad: int, **options) -> GenerationOutput:
    """Beam search's returned sequences, scores and finish reasons are transformers' (which fills with pad)."""
    output = pair.model.generate(input_ids=rows, pad_token_id=pad, **options)
    expected_tokens, expected_scores = reference_beams(pair.torch_model, rows, pad, do_sample=False, **options)
    eos = options["eos_token_id"] if isinstance(options["eos_token_id"], list) else [options["eos_token_id"]]
    width = max(len(sequence.generated_token_ids) for sequence in output.sequences)
    for sequence, tokens, score in zip(output.sequences, expected_tokens, expected_scores, strict=True):
        generated = sequence.generated_token_ids
        assert generated + [pad] * (width - len(generated)) == tokens
        assert sequence.score == pytest.approx(score, abs=1e-4)
        ended_by_eos = generated[-1] in eos
        assert sequence.finish_reason == ("stop" if ended_by_eos else "length")
        assert ended_by_eos or len(generated) == options["max_new_tokens"]
    for result in output.results:
        scores = [sequence.score for sequence in result.sequences]
        assert scores == sorted(scores, reverse=True)
    return output


@pytest.mark.parametrize(("name", "num_beams", "length_penalty", "early_stopping"), CASES)
def test_beam_search_equals_transformers(name: str, num_beams: int, length_penalty: float, early_stopping) -> None:
    pair = random_pair(name)
    rows = prompt_rows(pair.vocab_size, (7, 3, 5), seed=len(name))
    eos, pad = eos_seen_midway(pair, rows), pair.vocab_size - 1
    options = {
        "max_new_tokens": NEW_TOKENS,
        "num_beams": num_beams,
        "length_penalty": length_penalty,
        "early_stopping": early_stopping,
        "num_return_sequences": min(num_beams, 3),
        "eos_token_id": eos,
    }
    assert_beams_equal_transformers(pair, rows, pad, **options)


def test_beam_grid_exercises_eos_and_early_stopping() -> None:
    """The grid above is not vacuous: beams end on EOS at various lengths, and early_stopping changes results."""
    pair = random_pair("narrow")
    rows = prompt_rows(pair.vocab_size, (7, 3, 5), seed=len("narrow"))
    eos = eos_seen_midway(pair, rows)
    lengths, outcomes = set(), {}
    for early_stopping in (True, False, "never"):
        output = pair.model.generate(
            input_ids=rows, max_new_tokens=NEW_TOKENS, num_beams=4, num_return_sequences=4, length_penalty=2.0,
            early_stopping=early_stopping, eos_token_id=eos, pad_token_id=pair.vocab_size - 1,
        )  # fmt: skip
        lengths |= {len(sequence.generated_token_ids) for sequence in output.sequences}
        outcomes[str(early_stopping)] = [sequence.generated_token_ids for sequence in output.sequences]
    assert len(lengths) >= 3 and NEW_TOKENS in lengths
    assert outcomes["True"] != outcomes["never"]


@pytest.mark.parametrize("name", ["narrow", "deep"])
def test_beam_search_with_processors_equals_transformers(name: str) -> None:
    pair = random_pair(name)
    rows = prompt_rows(pair.vocab_size, (4, 9), seed=3)
    eos, pad = eos_seen_midway(pair, rows), pair.vocab_size - 1
    options = {
        "max_new_tokens": NEW_TOKENS,
        "num_beams": 3,
        "num_return_sequences": 2,
        "eos_token_id": eos,
        "min_new_tokens": 4,
        "no_repeat_ngram_size": 2,
        "repetition_penalty": 1.3,
    }
    assert_beams_equal_transformers(pair, rows, pad, **options)


def test_beam_search_with_two_eos_ids_equals_transformers() -> None:
    """Two EOS ids widen each step's candidates to (1 + 2) * num_beams, as in transformers."""
    pair = random_pair("wide")
    rows = prompt_rows(pair.vocab_size, (7, 3, 5), seed=2)
    free = pair.model.generate(input_ids=rows, max_new_tokens=NEW_TOKENS, eos_token_id=pair.vocab_size - 1)
    eos = [free.sequences[0].generated_token_ids[3], free.sequences[1].generated_token_ids[6]]
    pad = pair.vocab_size - 1
    options = {"max_new_tokens": NEW_TOKENS, "num_beams": 3, "num_return_sequences": 3, "eos_token_id": eos}
    output = assert_beams_equal_transformers(pair, rows, pad, **options)
    ended = {sequence.generated_token_ids[-1] for sequence in output.sequences if sequence.finish_reason == "stop"}
    assert ended == set(eos)


@pytest.mark.parametrize("name", ["narrow", "wide", "deep"])
@pytest.mark.parametrize(
    "processors",
    [
        {"repetition_penalty": 1.5},
        {"no_repeat_ngram_size": 2},
        {"min_new_tokens": 6, "repetition_penalty": 0.8, "no_repeat_ngram_size": 3},
        {"bad_words_ids": [[5], [7, 8]]},
    ],
)
def test_greedy_with_processors_equals_transformers(name: str, processors: dict) -> None:
    pair = random_pair(name)
    rows = prompt_rows(pair.vocab_size, (6, 2, 10), seed=4)
    eos, pad = eos_seen_midway(pair, rows), pair.vocab_size - 1
    output = pair.model.generate(
        input_ids=rows, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad, **processors
    )
    expected = reference_generate(
        pair.torch_model, rows, pad, [eos], max_new_tokens=NEW_TOKENS, do_sample=False, **processors
    )
    assert [result.sequences[0].generated_token_ids for result in output.results] == expected


def test_scores_and_top_logprobs_match_transformers_log_softmax() -> None:
    pair = random_pair("wide")
    prompt = prompt_rows(pair.vocab_size, (5,), seed=8)[0]
    greedy = pair.model.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, output_scores=True, top_logprobs=3)
    sequence = greedy.sequences[0]
    expected = torch_step_logprobs(pair.torch_model, prompt, sequence.generated_token_ids)
    assert sequence.logprobs is not None and len(sequence.logprobs) == NEW_TOKENS
    for step, entry in enumerate(sequence.logprobs):
        assert entry.logprob == pytest.approx(expected[step, entry.token_id], abs=1e-4)
        best = np.argsort(-expected[step], kind="stable")[:3].tolist()
        assert [token for token, _ in entry.top] == best
        assert [value for _, value in entry.top] == pytest.approx(expected[step, best].tolist(), abs=1e-4)
        assert entry.top[0][0] == entry.token_id  # greedy takes the best

    beams = pair.model.generate(
        input_ids=prompt, max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=3, length_penalty=0.6,
        top_logprobs=2,
    )  # fmt: skip
    for sequence in beams.sequences:
        expected = torch_step_logprobs(pair.torch_model, prompt, sequence.generated_token_ids)
        chosen = [entry.logprob for entry in sequence.logprobs]
        assert chosen == pytest.approx(expected[np.arange(len(chosen)), sequence.generated_token_ids], abs=1e-4)
        assert sum(chosen) / len(chosen) ** 0.6 == pytest.approx(sequence.score, abs=1e-4)
    assert greedy.sequences[0].score is None
    assert pair.model.generate(input_ids=prompt, max_new_tokens=3).sequences[0].logprobs is None


@pytest.mark.parametrize("name", ["narrow", "wide"])
def test_generating_on_the_previous_output_continues_like_one_longer_call(name: str) -> None:
    pair = random_pair(name)
    prompt = prompt_rows(pair.vocab_size, (4,), seed=9)[0]
    options = {"eos_token_id": pair.vocab_size - 1}
    whole = pair.model.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, **options).sequences[0]
    ids = prompt
    for _ in range(NEW_TOKENS):  # the notebook's loop: one token at a time, appended to the input
        ids = pair.model.generate(input_ids=ids, max_new_tokens=1, **options).sequences[0].token_ids
    assert ids == whole.token_ids
    assert len(set(whole.generated_token_ids)) > 2, "the model should not repeat one token"
    halves = pair.model.generate(input_ids=prompt, max_new_tokens=5, **options).sequences[0].token_ids
    rest = pair.model.generate(input_ids=halves, max_new_tokens=NEW_TOKENS - 5, **options).sequences[0]
    assert rest.token_ids == whole.token_ids


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 4),
    width=st.integers(1, 2500),
    k=st.integers(1, 70),
    levels=st.sampled_from([3, 1000]),  # few distinct values: many ties
    neg_inf_share=st.sampled_from([0.0, 0.5, 0.99]),
    seed=st.integers(0, 2**32 - 1),
)
def test_top_k_equals_a_stable_sort(
    rows: int, width: int, k: int, levels: int, neg_inf_share: float, seed: int
) -> None:
    """The block search may skip blocks, never entries: any shape, ties and -inf give the stable sort's first k."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, levels, (rows, width)).astype(np.float32)
    values[rng.random((rows, width)) < neg_inf_share] = -np.inf
    found, indices = top_k(values, k)
    expected = np.argsort(-values, axis=1, kind="stable")[:, :k]
    assert np.array_equal(indices, expected)
    assert np.array_equal(found, np.take_along_axis(values, expected, axis=1))


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 4),
    width=st.integers(1, 2500),
    k=st.integers(1, 70),
    levels=st.sampled_from([3, 1000]),
    neg_inf_share=st.sampled_from([0.0, 0.5, 0.99]),
    seed=st.integers(0, 2**32 - 1),
)
def test_kth_largest_equals_a_sort(rows: int, width: int, k: int, levels: int, neg_inf_share: float, seed: int) -> None:
    """The threshold of the TopK processor: the k-th value of each row sorted in descending order, ties counted."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, levels, (rows, width)).astype(np.float32)
    values[rng.random((rows, width)) < neg_inf_share] = -np.inf
    k = min(k, width)
    assert np.array_equal(kth_largest(values, k), -np.sort(-values, axis=1)[:, k - 1])


def test_top_k_matches_torch_and_breaks_ties_by_index() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((6, 3000)).astype(np.float32)
    values[0, [10, 20, 30, 40]] = 9.0  # ties: the lower index first
    values[1, :] = -np.inf
    values[1, [7, 2999]] = 1.0
    found, indices = top_k(values, 5)
    expected_values, expected_indices = torch.topk(torch.from_numpy(values[2:]), 5)
    assert np.array_equal(found[2:], expected_values.numpy()) and np.array_equal(indices[2:], expected_indices.numpy())
    assert indices[0, :4].tolist() == [10, 20, 30, 40]
    assert indices[1, :2].tolist() == [7, 2999] and np.all(np.isneginf(found[1, 2:]))
    assert np.array_equal(top_k(values[:, :3], 10)[1], np.argsort(-values[:, :3], axis=1, kind="stable"))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_cache_rows_put_every_beam_on_its_parents_cache_within_its_prompt(data: st.DataObject) -> None:
    """Over several steps of random parents (each new beam continues a beam of its own prompt), the cache row of
    every beam holds its parent's cache, rows never leave their prompt's group, and only rows given to a second
    (third, ...) child of the same parent are copied."""
    from gpt2onnx.runtime.beam_search import CacheRows

    prompts, beams = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    count = prompts * beams
    rows = CacheRows(count)
    history = np.arange(count)  # what each cache row holds: the id of the beam lineage written there
    lineage = np.arange(count)  # the lineage each beam continues
    for _ in range(data.draw(st.integers(1, 6))):
        local = data.draw(st.lists(st.integers(0, beams - 1), min_size=count, max_size=count))
        parents = np.asarray(local) + np.repeat(np.arange(prompts), beams) * beams
        reorder = rows.follow(parents)
        copied = np.flatnonzero(reorder != np.arange(count))
        assert len(copied) == count - len(np.unique(parents))
        history = history[reorder]
        lineage = lineage[parents]
        assert sorted(rows.of_beam.tolist()) == list(range(count))
        assert (rows.of_beam // beams == np.arange(count) // beams).all()
        assert (history[rows.of_beam] == lineage).all()
