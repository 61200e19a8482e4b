"""The Generator, stepped by hand, against transformers on the same weights: the verbs (append_tokens,
generate_next_token, get_next_tokens, get_sequence, get_logits / set_logits, rewind_to, is_done), user logits
processors and stopping criteria, and score()."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import gpt2onnx
from _search_fixtures import Pair, prompt_rows, random_pair
from reference import left_padded, reference_generate

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def pair() -> Pair:
    return random_pair("wide")


def step_to_the_end(generator: gpt2onnx.Generator, limit: int = 10_000) -> list[np.ndarray]:
    """generate_next_token until is_done; the tokens of each step."""
    steps = []
    while not generator.is_done():
        generator.generate_next_token()
        steps.append(generator.get_next_tokens())
        assert len(steps) <= limit
    return steps


def greedy_reference(pair: Pair, rows: list[list[int]], new_tokens: int = NEW_TOKENS, **options) -> list[list[int]]:
    pad = pair.vocab_size - 1
    return reference_generate(pair.torch_model, rows, pad, [pad], max_new_tokens=new_tokens, do_sample=False, **options)


def test_stepping_greedy_gives_generate_and_transformers_tokens(pair: Pair) -> None:
    rows = prompt_rows(pair.vocab_size, (7, 3, 5), seed=1)
    pad = pair.vocab_size - 1
    generator = pair.model.generator(max_new_tokens=NEW_TOKENS, eos_token_id=pad, pad_token_id=pad)
    generator.append_tokens(rows)
    steps = step_to_the_end(generator)
    assert len(steps) == NEW_TOKENS and generator.rows == 3 and generator.token_count == 7 + NEW_TOKENS
    expected = greedy_reference(pair, rows)
    for index, row in enumerate(rows):
        assert generator.get_sequence(index).tolist() == row + expected[index]
        assert [int(step[index]) for step in steps] == expected[index]
    output = pair.model.generate(input_ids=rows, max_new_tokens=NEW_TOKENS, eos_token_id=pad, pad_token_id=pad)
    assert [sequence.generated_token_ids for sequence in output.sequences] == expected
    assert generator.finish_reasons() == ["length"] * 3


def test_stepping_beam_search_gives_its_best_beam(pair: Pair) -> None:
    rows = prompt_rows(pair.vocab_size, (6, 4), seed=2)
    pad = pair.vocab_size - 1
    options = {"max_new_tokens": NEW_TOKENS, "num_beams": 4, "num_return_sequences": 2}
    generator = pair.model.generator(eos_token_id=pad, pad_token_id=pad, **options)
    generator.append_tokens(rows)
    assert generator.rows == 8
    steps = step_to_the_end(generator)
    assert all(step.shape == (8,) for step in steps)
    output = pair.model.generate(input_ids=rows, eos_token_id=pad, pad_token_id=pad, **options)
    sequences = [generator.get_sequence(index).tolist() for index in range(4)]
    assert sequences == [sequence.token_ids for sequence in output.sequences]
    expected = greedy_reference(pair, rows, num_beams=4, num_return_sequences=2)
    assert [sequence[len(rows[index // 2]) :] for index, sequence in enumerate(sequences)] == expected
    with pytest.raises(gpt2onnx.InvalidInputError, match="beam search takes its prompt once"):
        generator.append_tokens([1, 2])
    with pytest.raises(gpt2onnx.InvalidInputError, match="rewind_to works on a generator of one row"):
        generator.rewind_to(3)


def test_append_tokens_continues_as_transformers_on_the_concatenation(pair: Pair) -> None:
    prompt, turn = prompt_rows(pair.vocab_size, (5, 4), seed=3)
    pad = pair.vocab_size - 1
    generator = pair.model.generator(max_new_tokens=4, eos_token_id=pad, pad_token_id=pad)
    generator.append_tokens(prompt)
    step_to_the_end(generator)
    first = generator.get_sequence(0).tolist()
    generator.append_tokens(turn)  # a new turn: max_new_tokens counts again from here
    assert not generator.is_done()
    step_to_the_end(generator)
    sequence = generator.get_sequence(0).tolist()
    assert sequence[: len(first) + len(turn)] == first + turn
    assert sequence[len(first) + len(turn) :] == greedy_reference(pair, [first + turn], new_tokens=4)[0]


def test_appending_rows_of_different_lengths_to_a_batch(pair: Pair) -> None:
    """Each row continues as transformers does on that row's own concatenation (the shorter new input is padded
    in the middle, masked; a preallocated cache runs such rows one at a time)."""
    prompts = prompt_rows(pair.vocab_size, (6, 2), seed=4)
    turns = prompt_rows(pair.vocab_size, (1, 5), seed=5)
    pad = pair.vocab_size - 1
    generator = pair.model.generator(max_new_tokens=3, eos_token_id=pad, pad_token_id=pad)
    generator.append_tokens(prompts)
    generator.generate_next_token()
    generator.generate_next_token()
    firsts = [generator.get_sequence(index).tolist() for index in range(2)]
    generator.append_tokens(turns)
    step_to_the_end(generator)
    for index in range(2):
        joined = firsts[index] + turns[index]
        assert generator.get_sequence(index).tolist() == joined + greedy_reference(pair, [joined], new_tokens=3)[0]


def test_rewind_to_then_stepping_reproduces_the_same_tokens(pair: Pair) -> None:
    generator = pair.model.generator(max_new_tokens=NEW_TOKENS, eos_token_id=pair.vocab_size - 1)
    generator.append_tokens(prompt_rows(pair.vocab_size, (6,), seed=6)[0])
    step_to_the_end(generator)
    full = generator.get_sequence(0).tolist()
    for length in (9, 6, 14):
        generator.rewind_to(length)
        assert generator.get_sequence(0).tolist() == full[:length] and generator.token_count == length
        step_to_the_end(generator)
        assert generator.get_sequence(0).tolist() == full
    with pytest.raises(gpt2onnx.InvalidInputError, match="rewind_to needs a length from 1 to 16"):
        generator.rewind_to(0)


def test_get_logits_equals_transformers_last_position(pair: Pair) -> None:
    rows = prompt_rows(pair.vocab_size, (7, 3), seed=7)
    generator = pair.model.generator(max_new_tokens=3, eos_token_id=pair.vocab_size - 1)
    generator.append_tokens(rows)
    generator.generate_next_token()
    logits = generator.get_logits()
    assert logits.dtype == np.float32 and logits.shape == (2, pair.vocab_size)
    for index in range(2):
        ids = torch.tensor([generator.get_sequence(index).tolist()])
        with torch.no_grad():
            expected = pair.torch_model(input_ids=ids).logits[0, -1].numpy()
        np.testing.assert_allclose(logits[index], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_set_logits_forces_the_next_token(pair: Pair) -> None:
    generator = pair.model.generator(max_new_tokens=3, eos_token_id=pair.vocab_size - 1)
    generator.append_tokens([[5, 6, 7], [8, 9]])
    forced = np.full((2, pair.vocab_size), -1e9, np.float32)
    forced[0, 42], forced[1, 17] = 0.0, 0.0
    generator.set_logits(forced)
    generator.generate_next_token()
    assert generator.get_next_tokens().tolist() == [42, 17]
    generator.generate_next_token()  # the model's own logits again, after the forced token
    expected = greedy_reference(pair, [[5, 6, 7, 42], [8, 9, 17]], new_tokens=1)
    assert generator.get_next_tokens().tolist() == [expected[0][0], expected[1][0]]
    with pytest.raises(gpt2onnx.InvalidInputError, match=r"set_logits needs an array of shape \(2, 500\)"):
        generator.set_logits(np.zeros((1, pair.vocab_size)))


BANNED = 7


def ban_token(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The rule in numpy: token BANNED may never be chosen."""
    scores = scores.copy()
    scores[:, BANNED] = -np.inf
    return scores


class BanToken(LogitsProcessor):
    """The same rule as a transformers LogitsProcessor."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, BANNED] = -float("inf")
        return scores


def stop_at(token: int):
    def criterion(input_ids: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
        return input_ids[:, -1] == token

    return criterion


class StopAt(StoppingCriteria):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return input_ids[:, -1] == self.token


def a_token_greedy_would_choose(pair: Pair, rows: list[list[int]], **options) -> int:
    """A token that turns up a few steps into greedy search (so that a rule about it changes the output)."""
    free = pair.model.generate(input_ids=rows, max_new_tokens=NEW_TOKENS, eos_token_id=pair.vocab_size - 1, **options)
    return free.sequences[0].generated_token_ids[3]


@pytest.mark.parametrize("search", [{}, {"num_beams": 3}], ids=["greedy", "beams"])
def test_user_processor_and_criterion_give_transformers_results(pair: Pair, search: dict) -> None:
    global BANNED
    rows = prompt_rows(pair.vocab_size, (6, 3), seed=8)
    pad = pair.vocab_size - 1
    BANNED = a_token_greedy_would_choose(pair, rows, **search)
    stop_token = a_token_greedy_would_choose(pair, rows, logits_processor=[ban_token], **search)
    options = {"max_new_tokens": NEW_TOKENS, "eos_token_id": pad, "pad_token_id": pad, **search}
    output = pair.model.generate(
        input_ids=rows, logits_processor=[ban_token], stopping_criteria=[stop_at(stop_token)], **options
    )
    ids, mask = left_padded(rows, pad)
    with torch.no_grad():
        expected = pair.torch_model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            logits_processor=LogitsProcessorList([BanToken()]),
            stopping_criteria=StoppingCriteriaList([StopAt(stop_token)]),
            **options,
        )[:, ids.shape[1] :].tolist()
    ours = [sequence.generated_token_ids for sequence in output.sequences]
    assert [row[: len(mine)] for row, mine in zip(expected, ours, strict=True)] == ours
    assert all(token == pad for row, mine in zip(expected, ours, strict=True) for token in row[len(mine) :])
    assert all(BANNED not in mine for mine in ours)
    assert any(mine[-1] == stop_token for mine in ours), "the criterion ended a row"
    assert [s.finish_reason for s in output.sequences if s.generated_token_ids[-1] == stop_token] != []


def test_stateful_links_learn_each_accepted_token(pair: Pair) -> None:
    class CountingProcessor:
        def __init__(self) -> None:
            self.accepted: list[list[int]] = []

        def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
            return scores

        def accept(self, tokens: np.ndarray) -> None:
            self.accepted.append(tokens.tolist())

    link = CountingProcessor()
    generator = pair.model.generator(max_new_tokens=4, logits_processor=[link], eos_token_id=pair.vocab_size - 1)
    generator.append_tokens([[1, 2], [3]])
    steps = step_to_the_end(generator)
    assert link.accepted == [step.tolist() for step in steps]


def test_score_equals_transformers_log_probabilities_and_loss(pair: Pair) -> None:
    ids = prompt_rows(pair.vocab_size, (40,), seed=9)[0]
    result = pair.model.score(input_ids=ids)
    with torch.no_grad():
        out = pair.torch_model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
    expected = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)[torch.arange(39), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(result.logprobs, expected, rtol=1e-4)
    assert result.perplexity == pytest.approx(float(torch.exp(out.loss)), rel=1e-4)
    assert result.token_ids == ids and len(result.logprobs) == 39


def test_score_in_chunks_equals_one_pass(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpt2onnx.runtime import scoring

    ids = prompt_rows(pair.vocab_size, (50,), seed=10)[0]
    whole = pair.model.score(input_ids=ids).logprobs
    monkeypatch.setattr(scoring, "CHUNK", 7)
    np.testing.assert_allclose(pair.model.score(input_ids=ids).logprobs, whole, rtol=1e-5)


def test_the_cache_grows_past_its_first_capacity(pair: Pair) -> None:
    """The first capacity is the prompt plus max_new_tokens; later turns take it further (up to the context)."""
    pad = pair.vocab_size - 1
    generator = pair.model.generator(max_new_tokens=2, eos_token_id=pad, pad_token_id=pad)
    generator.append_tokens([1, 2, 3])
    for turn in range(6):
        step_to_the_end(generator)
        generator.append_tokens([10 + turn] * 5)
    step_to_the_end(generator)
    sequence = generator.get_sequence(0).tolist()
    assert len(sequence) == 3 + 6 * 7 + 2
    assert sequence[-2:] == greedy_reference(pair, [sequence[:-2]], new_tokens=2)[0]


def test_the_context_end_finishes_the_rows(pair: Pair) -> None:
    context = pair.model.context_length
    generator = pair.model.generator(max_new_tokens=50, eos_token_id=pair.vocab_size - 1, min_new_tokens=50)
    generator.append_tokens([5] * (context - 3))
    steps = step_to_the_end(generator)
    assert len(steps) == 3 and generator.finish_reasons() == ["length"] and generator.token_count == context
    with pytest.raises(gpt2onnx.InvalidInputError, match="the generator is done"):
        generator.generate_next_token()
    with pytest.raises(gpt2onnx.InvalidInputError, match="would reach the end of the model's context"):
        generator.append_tokens([1])


def test_misuse_gets_one_line_errors(pair: Pair) -> None:
    generator = pair.model.generator()
    for call, message in [
        (lambda: generator.get_next_tokens(), "no token has been generated yet"),
        (lambda: generator.get_logits(), "the generator has no tokens yet: call append_tokens() first"),
        (lambda: generator.generate_next_token(), "the generator has no tokens yet"),
    ]:
        with pytest.raises(gpt2onnx.InvalidInputError, match=re.escape(message)):
            call()
    generator.append_tokens([[1, 2], [3]])
    with pytest.raises(gpt2onnx.InvalidInputError, match="append_tokens got an empty row"):
        generator.append_tokens([[4], []])
    with pytest.raises(gpt2onnx.InvalidInputError, match="append_tokens got 3 rows for a generator of 2"):
        generator.append_tokens([[4], [5], [6]])
    with pytest.raises(gpt2onnx.InvalidInputError, match="row index must be from 0 to 1, got 2"):
        generator.get_sequence(2)
    with pytest.raises(gpt2onnx.InvalidInputError, match="token id 9999 is outside the vocabulary"):
        generator.append_tokens([9999])


@pytest.fixture(scope="module")
def sessions_of_every_kind(tmp_path_factory: pytest.TempPathFactory) -> dict[str, gpt2onnx.runtime.model.GPT2Model]:
    """One checkpoint, loaded with each cache kind: preallocated, growing on the host, growing as OrtValues (the
    CUDA code path, run on the CPU)."""
    from conftest import random_gpt2
    from gpt2onnx.export.exporter import export_bundle
    from gpt2onnx.runtime.session import DecoderSession

    root = tmp_path_factory.mktemp("kinds")
    random_gpt2(
        21, n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=64, initializer_range=0.3
    ).save_pretrained(root / "checkpoint")
    preallocated = gpt2onnx.load(export_bundle(str(root / "checkpoint"), root / "preallocated"))
    growing_bundle = export_bundle(str(root / "checkpoint"), root / "growing", kv_cache="growing")
    host, device = gpt2onnx.load(growing_bundle), gpt2onnx.load(growing_bundle)
    device.session = DecoderSession(device.manifest, provider="cpu", device_cache=True)
    assert [model.session.cache_kind for model in (preallocated, host, device)] == ["preallocated", "host", "device"]
    return {"preallocated": preallocated, "host": host, "device": device}


def drive(model: gpt2onnx.runtime.model.GPT2Model) -> list[list[int]]:
    """Appends of different lengths to a batch, a rewind of a single row, beams: every verb on one model."""
    results = []
    batch = model.generator(max_new_tokens=3, eos_token_id=299, pad_token_id=299)
    batch.append_tokens([[4, 5, 6, 7], [8]])
    step_to_the_end(batch)
    batch.append_tokens([[9], [10, 11, 12]])
    step_to_the_end(batch)
    results += [batch.get_sequence(index).tolist() for index in range(2)]
    single = model.generator(max_new_tokens=8, eos_token_id=299)
    single.append_tokens([13, 14, 15])
    step_to_the_end(single)
    single.rewind_to(6)
    single.append_tokens([16, 17])
    step_to_the_end(single)
    results.append(single.get_sequence(0).tolist())
    beams = model.generator(max_new_tokens=6, num_beams=3, eos_token_id=299, pad_token_id=299)
    beams.append_tokens([[1, 2, 3], [4]])
    step_to_the_end(beams)
    results += [beams.get_sequence(index).tolist() for index in range(2)]
    return results


def test_every_cache_kind_gives_the_same_tokens(sessions_of_every_kind: dict) -> None:
    results = {kind: drive(model) for kind, model in sessions_of_every_kind.items()}
    assert results["host"] == results["preallocated"] and results["device"] == results["preallocated"]
