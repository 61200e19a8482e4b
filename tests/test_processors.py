"""Each numpy logits processor against transformers' own, on the same scores and input ids."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from gpt2onnx.runtime.options import GenerationOptions
from gpt2onnx.runtime.processors import (
    BadWords,
    LogitsProcessorChain,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    build_logits_processors,
    log_softmax,
    softmax,
)

VOCAB = 512
EOS = VOCAB - 1
SEEDS = range(3)

TRANSFORMERS_NAMES = {
    RepetitionPenalty: "RepetitionPenaltyLogitsProcessor",
    NoRepeatNGram: "NoRepeatNGramLogitsProcessor",
    BadWords: "NoBadWordsLogitsProcessor",
    MinNewTokens: "MinNewTokensLengthLogitsProcessor",
    Temperature: "TemperatureLogitsWarper",
    TopK: "TopKLogitsWarper",
    TopP: "TopPLogitsWarper",
    MinP: "MinPLogitsWarper",
    TypicalP: "TypicalLogitsWarper",
}


def random_case(
    seed: int, batch: int = 3, length: int = 12, vocab: int = VOCAB, id_range: int = 40, scale: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """Input ids drawn from a small range (so tokens and n-grams repeat) and float32 scores of both signs."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, id_range, size=(batch, length), dtype=np.int64)
    scores = (rng.standard_normal((batch, vocab)) * scale).astype(np.float32)
    return input_ids, scores


def run_transformers(processor: LogitsProcessor, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return processor(torch.from_numpy(input_ids.copy()), torch.from_numpy(scores.copy())).numpy()


def assert_same_scores(ours: np.ndarray, expected: np.ndarray) -> None:
    """Same shape and dtype, the very same -inf (and other non-finite) entries, finite values within 1e-6."""
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(ours), finite)
    np.testing.assert_array_equal(ours[~finite], expected[~finite])
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6, atol=1e-6)


def check(
    ours: Callable[[np.ndarray, np.ndarray], np.ndarray],
    theirs: LogitsProcessor,
    input_ids: np.ndarray,
    scores: np.ndarray,
    changes: bool = True,
) -> np.ndarray:
    """Compare on one case; `changes` asserts the case really exercises the processor (so a no-op would fail)."""
    before = scores.copy()
    result = ours(input_ids, scores)
    expected = run_transformers(theirs, input_ids, scores)
    np.testing.assert_array_equal(scores, before, err_msg="the processor modified its input")
    assert_same_scores(result, expected)
    assert changes != np.array_equal(expected, scores, equal_nan=True)
    return result


def test_softmax_and_log_softmax_match_torch_and_are_stable() -> None:
    _, scores = random_case(0)
    scores[0, :5] = -np.inf
    scores[1] += 1e4  # overflows a naive exp
    scores[2] -= 1e4
    probs, logprobs = softmax(scores), log_softmax(scores)
    assert probs.dtype == logprobs.dtype == np.float32
    assert_same_scores(probs, torch.softmax(torch.from_numpy(scores), dim=-1).numpy())
    assert_same_scores(logprobs, torch.log_softmax(torch.from_numpy(scores), dim=-1).numpy())
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-6)
    assert softmax(scores.astype(np.float64)).dtype == np.float64


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty(seed: int, penalty: float) -> None:
    input_ids, scores = random_case(seed)
    check(RepetitionPenalty(penalty), RepetitionPenaltyLogitsProcessor(penalty), input_ids, scores)


def test_repetition_penalty_applies_once_to_a_token_seen_several_times() -> None:
    input_ids = np.array([[4, 9, 4, 4, 2], [1, 1, 1, 1, 1]])
    scores = np.zeros((2, 16), dtype=np.float32)
    scores[:, 4], scores[:, 1] = 3.0, -3.0
    result = check(RepetitionPenalty(1.5), RepetitionPenaltyLogitsProcessor(1.5), input_ids, scores)
    assert result[0, 4] == np.float32(2.0)
    assert result[1, 1] == np.float32(-4.5)
    assert result[1, 4] == np.float32(3.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_repetition_penalty_skips_left_padding(seed: int) -> None:
    input_ids, scores = random_case(seed, id_range=EOS)  # any id but the pad id (EOS)
    input_ids[1, :3] = input_ids[2, :5] = EOS  # the pad id, which must not count as a repeated token
    pad_lengths = np.array([0, 3, 5])
    theirs = RepetitionPenaltyLogitsProcessor(1.4, prompt_ignore_length=torch.from_numpy(pad_lengths))
    padding = np.arange(input_ids.shape[1]) < pad_lengths[:, None]
    result = check(RepetitionPenalty(1.4, padding), theirs, input_ids, scores)
    np.testing.assert_array_equal(result[1:, EOS], scores[1:, EOS])


def test_repetition_penalty_ignores_ids_past_the_vocabulary() -> None:
    input_ids, scores = random_case(0)
    input_ids[:, 0] = VOCAB + 7
    check(RepetitionPenalty(1.2), RepetitionPenaltyLogitsProcessor(1.2), input_ids, scores)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ngram_size", [1, 2, 3, 4])
def test_no_repeat_ngram(seed: int, ngram_size: int) -> None:
    input_ids, scores = random_case(seed, length=16, id_range=3)
    input_ids[:2, 17 - ngram_size :] = input_ids[:2, : ngram_size - 1]  # rows 0, 1 end as they start: a ban
    check(NoRepeatNGram(ngram_size), NoRepeatNGramLogitsProcessor(ngram_size), input_ids, scores)


def test_no_repeat_ngram_repeated_at_the_sequence_start() -> None:
    input_ids = np.array([[5, 6, 7, 1, 5, 6], [5, 6, 7, 5, 6, 8]])
    scores = np.zeros((2, 16), dtype=np.float32)
    result = check(NoRepeatNGram(3), NoRepeatNGramLogitsProcessor(3), input_ids, scores)
    assert np.isneginf(result[0]).nonzero()[0].tolist() == [7]
    assert not np.isneginf(result[1]).any()


def test_no_repeat_ngram_shorter_than_the_ngram_is_untouched() -> None:
    input_ids, scores = random_case(0, length=2, id_range=1)
    assert NoRepeatNGram(3)(input_ids, scores) is scores
    check(NoRepeatNGram(3), NoRepeatNGramLogitsProcessor(3), input_ids, scores, changes=False)


BAD_WORDS = [
    [[3]],
    [[3], [17], [4, 5]],
    [[7, 8, 9]],
    [[4, 5], [6, 5], [2, 4, 5]],  # several words ending in the same token
    [[EOS], [3], [2, EOS]],  # a bad word that is just EOS is dropped, as in transformers
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bad_words", BAD_WORDS)
@pytest.mark.parametrize("eos", [EOS, [EOS, 1]])
def test_bad_words(seed: int, bad_words: list[list[int]], eos: int | list[int]) -> None:
    input_ids, scores = random_case(seed, id_range=10)
    input_ids[0, -1] = 4  # row 0 ends with a one-token prefix, row 1 with a two-token one
    input_ids[1, -2:] = [7, 8]
    input_ids[2, -1] = 2
    eos_ids = [eos] if isinstance(eos, int) else eos
    check(BadWords(bad_words, eos_ids), NoBadWordsLogitsProcessor(bad_words, eos), input_ids, scores)


def test_bad_words_longer_than_the_context_ban_nothing() -> None:
    input_ids, scores = random_case(0, length=4)
    word = [[*input_ids[0].tolist(), 9]]
    check(BadWords(word), NoBadWordsLogitsProcessor(word), input_ids, scores)  # the prefix fits exactly
    longer = [[1, *word[0]]]
    check(BadWords(longer), NoBadWordsLogitsProcessor(longer), input_ids, scores, changes=False)


@pytest.mark.parametrize("new_tokens", [0, 2, 3, 5])
@pytest.mark.parametrize("eos", [[EOS], [EOS, 0, 17]])
def test_min_new_tokens(new_tokens: int, eos: list[int]) -> None:
    prompt_length, min_new_tokens = 8, 3
    input_ids, scores = random_case(new_tokens, length=prompt_length + new_tokens)
    theirs = MinNewTokensLengthLogitsProcessor(prompt_length, min_new_tokens, eos)
    early = new_tokens < min_new_tokens
    result = check(MinNewTokens(prompt_length, min_new_tokens, eos), theirs, input_ids, scores, changes=early)
    assert np.isneginf(result[:, eos]).all() == early


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5, 4.0])
def test_temperature(seed: int, temperature: float) -> None:
    input_ids, scores = random_case(seed)
    check(Temperature(temperature), TemperatureLogitsWarper(temperature), input_ids, scores)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k", [1, 5, 50, VOCAB - 1, VOCAB, 5000])
@pytest.mark.parametrize("keep", [1, 3])
def test_top_k(seed: int, top_k: int, keep: int) -> None:
    input_ids, scores = random_case(seed)
    theirs = TopKLogitsWarper(top_k, min_tokens_to_keep=keep)
    result = check(TopK(top_k, keep), theirs, input_ids, scores, changes=top_k < VOCAB)
    assert (np.isfinite(result).sum(axis=-1) == min(max(top_k, keep), VOCAB)).all()


@pytest.mark.parametrize("top_k", [1, 7, 100])
def test_top_k_keeps_ties_with_the_kth_score(top_k: int) -> None:
    input_ids, scores = random_case(1)
    scores = np.round(scores).astype(np.float32)  # many equal scores
    result = check(TopK(top_k), TopKLogitsWarper(top_k), input_ids, scores)
    assert (np.isfinite(result).sum(axis=-1) > top_k).any()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.9, 0.99])
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_top_p(seed: int, top_p: float, keep: int) -> None:
    input_ids, scores = random_case(seed)
    check(TopP(top_p, keep), TopPLogitsWarper(top_p, min_tokens_to_keep=keep), input_ids, scores)


def test_top_p_can_keep_a_single_token() -> None:
    input_ids, scores = random_case(2)
    scores[np.arange(3), [5, 6, 7]] += 20.0
    result = check(TopP(0.5), TopPLogitsWarper(0.5), input_ids, scores)
    assert np.isfinite(result).sum(axis=-1).tolist() == [1, 1, 1]
    assert np.isfinite(result[np.arange(3), [5, 6, 7]]).all()


@pytest.mark.parametrize(("top_p", "dropped"), [(0.75, 1), (0.5, 2)])
def test_top_p_drops_tokens_whose_cumulative_mass_equals_the_threshold(top_p: float, dropped: int) -> None:
    scores = np.zeros((1, 4), dtype=np.float32)  # probabilities 1/4 each: the cumulative sums are exact
    input_ids = np.zeros((1, 1), dtype=np.int64)
    ours = TopP(top_p)(input_ids, scores)
    theirs = run_transformers(TopPLogitsWarper(top_p), input_ids, scores)  # which of the ties goes may differ
    assert np.isneginf(ours).sum() == np.isneginf(theirs).sum() == dropped


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("keep", [1, 3])
def test_min_p(seed: int, min_p: float, keep: int) -> None:
    input_ids, scores = random_case(seed)
    check(MinP(min_p, keep), MinPLogitsWarper(min_p, min_tokens_to_keep=keep), input_ids, scores, min_p > 0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("keep", [1, 3])
def test_typical_p(seed: int, mass: float, keep: int) -> None:
    input_ids, scores = random_case(seed)
    check(TypicalP(mass, keep), TypicalLogitsWarper(mass, min_tokens_to_keep=keep), input_ids, scores)


@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize("warper", ["top_p", "typical_p", "min_p", "top_k"])
def test_warpers_after_earlier_filtering(warper: str, keep: int) -> None:
    ours, theirs = {
        "top_p": (TopP(0.8, keep), TopPLogitsWarper(0.8, min_tokens_to_keep=keep)),
        "typical_p": (TypicalP(0.8, keep), TypicalLogitsWarper(0.8, min_tokens_to_keep=keep)),
        "min_p": (MinP(0.05, keep), MinPLogitsWarper(0.05, min_tokens_to_keep=keep)),
        "top_k": (TopK(5, keep), TopKLogitsWarper(5, min_tokens_to_keep=keep)),
    }[warper]
    input_ids, scores = random_case(4, batch=4)
    for row, left in enumerate([40, 1, 200, 3]):  # as after top-k, a different number left in each row
        scores[row, np.argsort(scores[row])[: VOCAB - left]] = -np.inf
    check(ours, theirs, input_ids, scores)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (TopK(50), TopKLogitsWarper(50)),
        (TopP(0.9), TopPLogitsWarper(0.9)),
        (
            LogitsProcessorChain([TopK(50), TopP(0.9)]),
            LogitsProcessorList([TopKLogitsWarper(50), TopPLogitsWarper(0.9)]),
        ),
        (MinP(0.1), MinPLogitsWarper(0.1)),
        (TypicalP(0.5), TypicalLogitsWarper(0.5)),
        (RepetitionPenalty(1.3), RepetitionPenaltyLogitsProcessor(1.3)),
    ],
    ids=["top_k", "top_p", "top_k_then_top_p", "min_p", "typical_p", "repetition_penalty"],
)
def test_full_gpt2_vocabulary(ours: Callable, theirs: LogitsProcessor) -> None:
    input_ids, scores = random_case(5, batch=2, length=30, vocab=50257, id_range=50257, scale=4.0)
    check(ours, theirs, input_ids, scores)


def test_typical_p_over_the_full_vocabulary_differs_from_torch_only_at_float_noise() -> None:
    """Known divergence: torch's float32 softmax over the typical-sorted row is normalised with a lane-wise float32
    sum (the cumulative mass ends near 1.00001), so with thousands of kept tokens a boundary token or two can flip."""
    input_ids, scores = random_case(6, batch=4, length=1, vocab=50257, scale=4.0)
    ours = np.isneginf(TypicalP(0.99)(input_ids, scores))
    theirs = np.isneginf(run_transformers(TypicalLogitsWarper(0.99), input_ids, scores))
    kept = (~theirs).sum(axis=-1)
    assert (kept > 1000).all()
    assert ((ours != theirs).sum(axis=-1) <= np.maximum(3, kept // 200)).all()


# --- the whole chain, against the list transformers' generate builds -------------------------------------------


class _Captured(Exception):
    """Stops generate() once its logits processors are built."""


@pytest.fixture(scope="module")
def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


def transformers_processors(
    model: GPT2LMHeadModel, input_ids: np.ndarray, attention_mask: np.ndarray, **kwargs
) -> LogitsProcessorList:
    """The LogitsProcessorList that model.generate builds for these arguments (generation itself is not run)."""
    captured: list[LogitsProcessorList] = []
    build = model._get_logits_processor

    def capture(*args, **kw) -> LogitsProcessorList:
        captured.append(build(*args, **kw))
        raise _Captured

    model._get_logits_processor = capture
    try:
        with pytest.raises(_Captured):
            model.generate(
                input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask), **kwargs
            )
    finally:
        del model._get_logits_processor
    return captured[0]


@st.composite
def generation_arguments(draw: st.DrawFn) -> dict:
    do_sample = draw(st.booleans())
    num_beams = draw(st.sampled_from([1, 1, 3]))
    return {
        "do_sample": do_sample,
        "num_beams": num_beams,
        "num_return_sequences": draw(st.sampled_from([1, 2])) if do_sample else 1,
        "temperature": draw(st.sampled_from([1.0, 0.6, 1.4])),
        "top_k": draw(st.sampled_from([50, 0, 1, 4, 2 * VOCAB])),
        "top_p": draw(st.sampled_from([1.0, 0.9, 0.4, 0.01])),
        "min_p": draw(st.sampled_from([None, 0.0, 0.1])),
        "typical_p": draw(st.sampled_from([1.0, 0.95, 0.5])),
        "repetition_penalty": draw(st.sampled_from([1.0, 1.3, 0.8])),
        "no_repeat_ngram_size": draw(st.sampled_from([0, 1, 2, 3])),
        "bad_words_ids": draw(st.sampled_from([None, [[5]], [[5], [7, 8]], [[EOS], [2, 3, 4]]])),
        "min_new_tokens": draw(st.sampled_from([0, 2, 5])),
        "eos_token_id": draw(st.sampled_from([EOS, [EOS, 3], [EOS, 3, 9]])),
    }


# The parameters that decide how many tokens a filter keeps (TopK folds min_tokens_to_keep into top_k, as
# transformers' TopKLogitsWarper does).
KEEP_PARAMETERS = {
    "TopK": ("top_k",),
    "TopP": ("min_tokens_to_keep",),
    "MinP": ("min_tokens_to_keep",),
    "TypicalP": ("min_tokens_to_keep",),
}


@settings(max_examples=80, deadline=None)
@given(
    arguments=generation_arguments(),
    padded=st.booleans(),
    new_tokens=st.integers(0, 6),
    log_probs=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_chain_equals_transformers_generate(
    tiny_model: GPT2LMHeadModel, arguments: dict, padded: bool, new_tokens: int, log_probs: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 12, size=(2, 6), dtype=np.int64)
    attention_mask = np.ones_like(prompt)
    if padded:
        prompt[1, :2], attention_mask[1, :2] = EOS, 0
    kwargs = {**arguments, "max_new_tokens": 8, "pad_token_id": EOS}
    theirs = transformers_processors(tiny_model, prompt, attention_mask, **kwargs)
    eos = kwargs["eos_token_id"] if isinstance(kwargs["eos_token_id"], list) else [kwargs["eos_token_id"]]
    options = GenerationOptions.create(**{**kwargs, "eos_token_id": tuple(eos)})
    expand = max(options.num_beams, options.num_return_sequences)
    padding = np.repeat(attention_mask == 0, expand, axis=0)
    ours = build_logits_processors(options, prompt.shape[1], eos, padding)

    # same processors, same order, same parameters (MinLength duplicates MinNewTokens: prompt + min_new_tokens)
    kept = [p for p in theirs if not isinstance(p, MinLengthLogitsProcessor)]
    for p in theirs:
        if isinstance(p, MinLengthLogitsProcessor):
            assert p.min_length == prompt.shape[1] + options.min_new_tokens
    assert [TRANSFORMERS_NAMES[type(p)] for p in ours] == [type(p).__name__ for p in kept]
    for mine, reference in zip(ours, kept, strict=True):
        for name in KEEP_PARAMETERS.get(type(mine).__name__, ()):
            assert getattr(mine, name) == getattr(reference, name), name

    # same scores on a decode step: the expanded prompt, then some generated tokens from a small range
    rows = np.repeat(prompt, expand, axis=0)
    input_ids = np.concatenate([rows, rng.integers(0, 12, size=(rows.shape[0], new_tokens))], axis=1)
    scores = (rng.standard_normal((rows.shape[0], VOCAB)) * 3).astype(np.float32)
    if log_probs:  # beam search processes log-probabilities
        scores = log_softmax(scores)
    assert_same_scores(ours(input_ids, scores), run_transformers(theirs, input_ids, scores))


def test_default_options_give_an_empty_chain_and_sampling_adds_top_k() -> None:
    greedy = build_logits_processors(GenerationOptions(), 4, [EOS])
    assert isinstance(greedy, LogitsProcessorChain)
    assert len(greedy) == 0 and not greedy
    sampling = build_logits_processors(GenerationOptions(do_sample=True), 4, [EOS])
    assert [type(p) for p in sampling] == [TopK] and sampling
    _, scores = random_case(0)
    assert greedy(np.zeros((3, 4), dtype=np.int64), scores) is scores


@pytest.mark.parametrize(("eos", "keep"), [([EOS], 2), ([EOS, 3], 3), ([], 2)])
def test_beam_sampling_keeps_one_token_more_than_the_eos_ids(eos: list[int], keep: int) -> None:
    options = GenerationOptions(do_sample=True, num_beams=4, top_k=1, top_p=0.01, min_p=1.0, typical_p=0.01)
    chain = build_logits_processors(options, 4, eos)
    assert [type(p) for p in chain] == [TopK, TopP, MinP, TypicalP]
    assert chain.processors[0].top_k == keep
    assert all(p.min_tokens_to_keep == keep for p in chain.processors[1:])
    input_ids, scores = random_case(0)
    assert (np.isfinite(chain(input_ids, scores)).sum(axis=-1) == keep).all()
