"""Continuous batching (runtime/batching.py): generators that join one decode batch at different steps, with their
own options, seeds, stop rules and lengths, give exactly what each gives alone; rows leave as they end and their
rows are reused; the batch packs its columns at the context's end. For every cache kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gpt2onnx
from conftest import random_gpt2
from gpt2onnx.export.exporter import export_bundle
from gpt2onnx.runtime.batching import DecodeBatch
from gpt2onnx.runtime.session import DecoderSession

EOS = 299
# (prompt rows, options): greedy and seeded sampling, several rows, a stop criterion, lengths that differ
REQUESTS = [
    ([[4, 5, 6, 7, 8, 9, 10]], {"max_new_tokens": 9}),
    ([[11, 12]], {"max_new_tokens": 5, "do_sample": True, "seed": 3, "temperature": 0.8, "top_k": 20}),
    ([[13, 14, 15], [16]], {"max_new_tokens": 7, "do_sample": True, "seed": 4, "top_p": 0.9}),
    ([[17] * 12], {"max_new_tokens": 3, "repetition_penalty": 1.3}),
    ([[18, 19]], {"max_new_tokens": 11, "do_sample": True, "seed": 5, "num_return_sequences": 3}),
    ([[20, 21, 22, 23]], {"max_new_tokens": 6, "no_repeat_ngram_size": 2}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, gpt2onnx.runtime.model.GPT2Model]:
    root = tmp_path_factory.mktemp("batching")
    model = random_gpt2(31, n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=48, initializer_range=0.3)
    model.save_pretrained(root / "checkpoint")
    preallocated = gpt2onnx.load(export_bundle(str(root / "checkpoint"), root / "preallocated"))
    growing = export_bundle(str(root / "checkpoint"), root / "growing", kv_cache="growing")
    host, device = gpt2onnx.load(growing), gpt2onnx.load(growing)
    device.session = DecoderSession(device.manifest, provider="cpu", device_cache=True)
    return {"preallocated": preallocated, "host": host, "device": device}


def alone(model, rows: list[list[int]], options: dict) -> list[list[int]]:
    generator = model.generator(eos_token_id=EOS, pad_token_id=EOS, **options)
    generator.append_tokens(rows)
    while not generator.is_done():
        generator.generate_next_token()
    return [generator.get_sequence(index).tolist() for index in range(generator.rows)]


def started(model, rows: list[list[int]], options: dict):
    """A generator that has prefilled and chosen its first token, as the server's scheduler starts each request."""
    generator = model.generator(eos_token_id=EOS, pad_token_id=EOS, **options)
    generator.append_tokens(rows)
    generator.generate_next_token()
    return generator


LAYOUTS = {  # test id -> (model kind, ragged layout)
    "ragged": ("preallocated", True),
    "aligned": ("preallocated", False),
    "host": ("host", False),
    "device": ("device", False),
}


def run_batched(
    model, requests: list, max_rows: int, ragged: bool | None = None, min_rows: int = 1
) -> tuple[list, int]:
    """Every request through one DecodeBatch, admitted in order as rows free up; each request's sequences, and the
    most rows that ran at once."""
    batch = DecodeBatch(model.session, max_rows=max_rows, ragged=ragged, min_rows=min_rows)
    waiting = [started(model, rows, options) for rows, options in requests]
    generators, most = list(waiting), 0
    while waiting or batch.rows:
        while waiting and waiting[0].rows <= batch.free:
            batch.join(waiting.pop(0))
        most = max(most, batch.rows)
        batch.step()
    assert all(generator.is_done() for generator in generators)
    return [[g.get_sequence(i).tolist() for i in range(g.rows)] for g in generators], most


@pytest.mark.parametrize("min_rows", [1, 2])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generators_joining_at_different_steps_give_what_they_give_alone(models: dict, layout: str, min_rows) -> None:
    """min_rows 2: a lone row runs beside a copy of itself (for int8 graphs), which changes nothing of its answer."""
    kind, ragged = LAYOUTS[layout]
    model = models[kind]
    expected = [alone(model, rows, options) for rows, options in REQUESTS]
    results, most = run_batched(model, REQUESTS, max_rows=6, ragged=ragged, min_rows=min_rows)
    assert most == 6, "the batch filled up"
    assert results == expected


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_batch_that_emptied_takes_a_shorter_request(models: dict, layout: str) -> None:
    """The batch empties between two requests (a quiet server), and the second one's prompt is shorter."""
    kind, ragged = LAYOUTS[layout]
    model = models[kind]
    batch = DecodeBatch(model.session, max_rows=4, ragged=ragged)
    for rows, options in (REQUESTS[0], REQUESTS[1]):
        generator = started(model, rows, options)
        batch.join(generator)
        while batch.rows:
            batch.step()
        assert [generator.get_sequence(i).tolist() for i in range(generator.rows)] == alone(model, rows, options)


@pytest.mark.parametrize("layout", ["ragged", "aligned"])
def test_the_buffers_grow_when_a_generator_joins_never_during_a_step(models: dict, layout: str) -> None:
    """A join makes room for every step its rows may take (a copy then costs no running row a step); the steps
    after it never grow the buffers, however long the rows run. The second request's longer prompt widens an aligned
    batch before the first one's 30 steps."""
    model = models["preallocated"]
    batch = DecodeBatch(model.session, max_rows=3, ragged=LAYOUTS[layout][1])
    long_run = {"max_new_tokens": 31, "min_new_tokens": 31}
    requests = [([[4]], long_run), ([[5] * 10], {"max_new_tokens": 2}), *REQUESTS[:2], REQUESTS[3]]
    waiting = [started(model, rows, options) for rows, options in requests]
    generators, capacities = list(waiting), set()
    while waiting or batch.rows:
        while waiting and waiting[0].rows <= batch.free:
            batch.join(waiting.pop(0))
        capacity = batch._store.cache.capacity
        capacities.add(capacity)
        batch.step()
        assert batch._store.cache.capacity == capacity, "a step grew the buffers"
    assert max(capacities) > 16, "the rows needed more than the first buffers"
    assert [[g.get_sequence(i).tolist() for i in range(g.rows)] for g in generators] == [
        alone(model, rows, options) for rows, options in requests
    ]


@pytest.mark.parametrize("layout", ["aligned", "host"])
def test_an_aligned_batch_reaching_the_context_packs_its_columns(models: dict, layout: str, monkeypatch) -> None:
    """Rows join over many steps and never all leave at once, so the aligned batch grows wider than any row; at the
    context's end (48 positions) it packs each row's columns to the right."""
    kind, ragged = LAYOUTS[layout]
    model = models[kind]
    packed = []
    compact = DecodeBatch._compact
    monkeypatch.setattr(DecodeBatch, "_compact", lambda self: packed.append(self._width) or compact(self))
    requests = [([[30 + i] * 6], {"max_new_tokens": 9 + 5 * (i % 3), "do_sample": True, "seed": i}) for i in range(9)]
    expected = [alone(model, rows, options) for rows, options in requests]
    results, _ = run_batched(model, requests, max_rows=2, ragged=ragged)
    assert packed and set(packed) == {48}
    assert results == expected


def test_a_ragged_batch_keeps_each_row_as_it_is_alone(models: dict, monkeypatch) -> None:
    """The ragged layout never widens past the longest row and never packs: each row's keys stay where they are
    alone, and the logits it chooses from are bitwise those of the row alone."""
    model = models["preallocated"]
    assert DecodeBatch(model.session, 2).ragged, "freshly exported preallocated bundles take ragged rows"
    monkeypatch.setattr(DecodeBatch, "_compact", lambda self: pytest.fail("a ragged batch never packs"))
    requests = [([[30 + i] * (1 + i)], {"max_new_tokens": 9 + 5 * (i % 3)}) for i in range(9)]
    seen: list[np.ndarray] = []
    advance = gpt2onnx.Generator.advance
    monkeypatch.setattr(
        gpt2onnx.Generator, "advance", lambda self, logits: seen.append(logits[0]) or advance(self, logits)
    )
    results, _ = run_batched(model, requests, max_rows=3, ragged=True)
    batched = list(seen)
    seen.clear()
    for rows, options in requests:
        generator = started(model, rows, options)
        batch = DecodeBatch(model.session, max_rows=1, ragged=True)
        batch.join(generator)
        while batch.rows:
            batch.step()
    alone_logits = list(seen)
    assert results == [alone(model, rows, options) for rows, options in requests]
    assert sorted(map(bytes, batched)) == sorted(map(bytes, alone_logits)), "bitwise the same logits"


def test_a_generator_can_leave_at_once(models: dict) -> None:
    model = models["preallocated"]
    batch = DecodeBatch(model.session, max_rows=4)
    first, second = started(model, [[4, 5]], {"max_new_tokens": 30}), started(model, [[6]], {"max_new_tokens": 4})
    batch.join(first)
    batch.join(second)
    batch.step()
    batch.leave(first)
    assert batch.rows == 1 and batch.free == 3
    while batch.rows:
        batch.step()
    assert second.get_sequence(0).tolist() == alone(model, [[6]], {"max_new_tokens": 4})[0]
    with pytest.raises(gpt2onnx.InvalidInputError, match="stepped by a DecodeBatch"):
        first.generate_next_token()
    with pytest.raises(gpt2onnx.InvalidInputError, match="the batch has 4 free rows; this generator needs 5"):
        batch.join(started(model, [[1]], {"max_new_tokens": 5, "do_sample": True, "num_return_sequences": 5}))


def test_a_lone_int8_row_runs_beside_a_copy_and_gets_the_logits_it_gets_amid_others(
    tmp_path: Path, monkeypatch
) -> None:
    """MatMulNBits computes a single row on another code path than several rows (their logits differ, measured
    ~1e-7 on this tiny model, ~0.04 on GPT-2 small); with min_rows=2 a lone row runs beside a copy of itself and gets
    bitwise the logits it gets in a batch."""
    model = gpt2onnx.load(export_bundle(output=tmp_path / "int8", random_init="tiny", quantize="int8"))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    seen: dict[int, list[np.ndarray]] = {}
    advance = gpt2onnx.Generator.advance

    def recording(self, logits: np.ndarray) -> None:
        seen.setdefault(id(self), []).append(logits[0].copy())
        advance(self, logits)

    monkeypatch.setattr(gpt2onnx.Generator, "advance", recording)

    def first_logits(groups: list[list[int]], min_rows: int) -> list[bytes]:
        seen.clear()
        generators = [started(model, [prompt], {"max_new_tokens": 4, "min_new_tokens": 4}) for prompt in prompts]
        for group in groups:
            batch = DecodeBatch(model.session, 2, min_rows=min_rows)
            for index in group:
                batch.join(generators[index])
            while batch.rows:
                batch.step()
        return [seen[id(generator)][0].tobytes() for generator in generators]

    assert first_logits([[0], [1]], min_rows=2) == first_logits([[0, 1]], min_rows=2)
