"""gpt2-serve end to end: the real server in a subprocess on a free loopback port, driven by httpx and openai.

The server runs with a batch of 16 rows and a queue of one, so that a small burst of full-batch requests already
overflows it. Continuous batching's own checks (many requests at once, chat, a graceful stop) are in
tests/test_serve_batching.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import gpt2onnx
from _server import TIMEOUT, Server, running_server
from conftest import RandomGPT2
from gpt2onnx.runtime.model import GPT2Model

MAX_BATCH, QUEUE_SIZE = 16, 1
MODEL_ID = "tiny-gpt2"
PROMPT = "Artificial intelligence"
LONG = 1000  # tokens: about a second of work for the tiny model, so that a disconnect lands mid-generation
HEAVY = {"prompt": ["Hello"] * MAX_BATCH, "max_tokens": LONG, "temperature": 0}  # seconds of work: a full batch


@pytest.fixture(scope="module")
def server(tiny_gpt2: RandomGPT2, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gpt2-serve in a subprocess where torch, transformers and the like cannot be imported."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    arguments = ["--max-batch", str(MAX_BATCH), "--queue-size", str(QUEUE_SIZE), "--threads", "1"]
    with running_server(tiny_gpt2.bundle, log, MODEL_ID, arguments) as server:
        yield server


@pytest.fixture(scope="module")
def model(tiny_gpt2: RandomGPT2) -> GPT2Model:
    """The same bundle through the Python API: what the server's answers must equal."""
    return gpt2onnx.load(tiny_gpt2.bundle, threads=1)


def joined(events: list[dict[str, Any]]) -> dict[int, str]:
    """Each choice's text, its chunks joined in order."""
    texts: dict[int, str] = {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


def test_health_models_and_metrics(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "model": server.model_id, "provider": "cpu"}
    client = server.client()
    assert [card.id for card in client.models.list().data] == [server.model_id]
    assert client.models.retrieve(server.model_id).owned_by == "gpt2-onnx"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    server.complete(prompt=PROMPT, max_tokens=4, temperature=0)
    metrics = server.metrics()
    assert {"running", "running_rows", "queued", "admitted", "rejected", "completed", "cancelled", "failed"} <= set(
        metrics
    )
    assert (metrics["max_batch"], metrics["queue_size"]) == (MAX_BATCH, QUEUE_SIZE)
    assert metrics["generated_tokens"] >= 4 and metrics["generated_tokens_per_s"] > 0
    for latency in ("time_to_first_token_s", "inter_token_latency_s"):
        percentiles = metrics[latency]
        assert set(percentiles) == {"p50", "p90", "p99"}
        assert 0 < percentiles["p50"] <= percentiles["p90"] <= percentiles["p99"]


def test_greedy_completion_equals_the_python_api(server: Server, model: GPT2Model) -> None:
    sequence = model.generate(PROMPT, max_new_tokens=12).sequences[0]
    body = server.complete(prompt=PROMPT, max_tokens=12, temperature=0).json()
    assert body["object"] == "text_completion" and body["model"] == server.model_id
    assert body["id"].startswith("cmpl-")
    assert body["choices"] == [
        {"text": sequence.generated_text, "index": 0, "logprobs": None, "finish_reason": sequence.finish_reason}
    ]
    prompt_tokens, completion_tokens = len(model.tokenizer.encode(PROMPT)), len(sequence.generated_token_ids)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def test_max_tokens_defaults_to_openai_16(server: Server) -> None:
    assert server.complete(prompt=PROMPT, temperature=0).json()["usage"]["completion_tokens"] <= 16
    assert server.complete(prompt="Hello", temperature=0).json()["usage"]["completion_tokens"] == 16


def test_token_id_prompts_and_prompt_lists(server: Server, model: GPT2Model) -> None:
    ids = model.tokenizer.encode(PROMPT)
    by_ids = server.complete(prompt=ids, max_tokens=6, temperature=0).json()
    assert by_ids["choices"][0]["text"] == model.generate(PROMPT, max_new_tokens=6).text
    prompts = [PROMPT, "Hello", "ArtificCial intElliGence"]
    batch = server.complete(prompt=prompts, max_tokens=6, temperature=0).json()
    assert [choice["index"] for choice in batch["choices"]] == [0, 1, 2]
    assert [choice["text"] for choice in batch["choices"]] == model.generate(prompts, max_new_tokens=6).texts
    rows = [model.tokenizer.encode(text) for text in prompts]
    assert server.complete(prompt=rows, max_tokens=6, temperature=0).json()["choices"] == batch["choices"]


def test_openai_client_completion_and_stream(server: Server, model: GPT2Model) -> None:
    client = server.client()
    completion = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=8, temperature=0)
    assert completion.choices[0].text == model.generate(PROMPT, max_new_tokens=8).text
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    chunks = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in chunks) == completion.choices[0].text
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=0)
    assert refused.value.body["param"] == "max_tokens"


def test_streamed_chunks_join_to_the_non_streamed_text_with_the_same_seed(server: Server) -> None:
    """Sampling with a seed: stream and non-stream give the same text; another seed gives another text."""
    request = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 123}
    whole_choice = server.complete(**request).json()["choices"][0]
    whole = whole_choice["text"]
    events = server.events(**request)
    assert joined(events) == {0: whole}
    ends = [choice["finish_reason"] for event in events for choice in event["choices"]]
    assert ends[-1] == whole_choice["finish_reason"] == "length" and not any(ends[:-1])
    assert all(len(event["choices"]) == 1 and event["object"] == "text_completion" for event in events)
    assert len({event["id"] for event in events}) == 1
    chunks = server.client().completions.create(model=server.model_id, stream=True, **request)
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole
    assert server.complete(**{**request, "seed": 124}).json()["choices"][0]["text"] != whole


def test_streamed_batch_with_usage_equals_the_non_streamed_answer(server: Server) -> None:
    """A list of prompts streams every choice, each ending with its finish_reason, then a usage chunk."""
    request = {"prompt": [PROMPT, "Hello"], "max_tokens": 7, "temperature": 0}
    whole = server.complete(**request).json()
    events = server.events(**request, stream_options={"include_usage": True})
    assert joined(events) == {choice["index"]: choice["text"] for choice in whole["choices"]}
    ends = {c["index"]: c["finish_reason"] for event in events for c in event["choices"] if c["finish_reason"]}
    assert ends == {choice["index"]: choice["finish_reason"] for choice in whole["choices"]}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_n_choices_per_prompt(server: Server) -> None:
    """n > 1 samples n choices per prompt, indexed prompt by prompt; streamed the same with the same seed."""
    request = {"prompt": [PROMPT, "Hello"], "n": 3, "max_tokens": 6, "seed": 5}
    whole = server.complete(**request).json()
    choices = whole["choices"]
    assert [choice["index"] for choice in choices] == list(range(6))
    assert len({choice["text"] for choice in choices}) == 6
    assert whole["usage"]["completion_tokens"] <= 6 * 6
    assert joined(server.events(**request)) == {choice["index"]: choice["text"] for choice in choices}
    sampled = server.client().completions.create(model=server.model_id, prompt=PROMPT, n=2, max_tokens=6, seed=5)
    assert [choice.index for choice in sampled.choices] == [0, 1]


def test_n_above_one_needs_sampling(server: Server) -> None:
    response = server.complete(prompt=PROMPT, n=2, temperature=0)
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_stop_strings_cut_the_text(server: Server, model: GPT2Model) -> None:
    text = model.generate(PROMPT, max_new_tokens=12).text
    stop = text[-3:]
    expected = text[: text.find(stop)]
    assert expected, f"pick another prompt: {text!r} starts with its own end"
    request = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    [choice] = server.complete(**request, stop=[stop, "never appears"]).json()["choices"]
    assert (choice["text"], choice["finish_reason"]) == (expected, "stop")
    assert server.complete(**request, stop=stop).json()["choices"][0]["text"] == expected
    assert joined(server.events(**request, stop=stop)) == {0: expected}
    chunks = server.client().completions.create(model=server.model_id, stream=True, stop=stop, **request)
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected


def test_logprobs_in_openai_format(server: Server, model: GPT2Model) -> None:
    request = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3}
    body = server.complete(**request).json()
    [choice] = body["choices"]
    logprobs = choice["logprobs"]
    count = body["usage"]["completion_tokens"]
    assert {key: len(value) for key, value in logprobs.items()} == dict.fromkeys(
        ("tokens", "token_logprobs", "top_logprobs", "text_offset"), count
    )
    columns = (logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"])
    for token, logprob, top in zip(*columns, strict=True):
        assert top[token] == logprob == max(top.values())  # greedy: the chosen token is the best one
        assert len(top) <= 4 and all(value <= 0 for value in top.values())
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(choice["text"])
    first = model.next_token_probs(PROMPT, top=3)
    assert logprobs["top_logprobs"][0] == pytest.approx(
        {row.token: math.log(row.probability) for row in first}, rel=1e-4
    )
    streamed = [c["logprobs"] for event in server.events(**request) for c in event["choices"] if c["logprobs"]]
    assert {key: [item for part in streamed for item in part[key]] for key in logprobs} == logprobs
    completion = server.client().completions.create(model=server.model_id, **request)
    assert completion.choices[0].logprobs is not None
    assert completion.choices[0].logprobs.token_logprobs == logprobs["token_logprobs"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt"),
        ({"prompt": "a\x00b"}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "a", "temperature": -1}, "temperature"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "top_p": 0}, "top_p"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": ["a"] * 40, "n": 2}, "n"),
        ({"prompt": "a", "stop": 5}, "stop"),
        ({"prompt": "a", "stop": [""]}, "stop"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "a", "logprobs": 21}, "logprobs"),
        ({"prompt": "a", "logprobs": -1}, "logprobs"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "seed": 1.5}, "seed"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
        ({"prompt": "a", "colour": "blue"}, "colour"),
    ],
)
def test_bad_bodies_get_400_with_an_openai_error(server: Server, body: dict[str, Any], param: str) -> None:
    response = server.complete(**body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert error["message"] and "\n" not in error["message"]


def test_other_refusals(server: Server) -> None:
    url = f"{server.url}/v1/completions"
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe{}"):
        response = httpx.post(url, content=content, timeout=TIMEOUT)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    too_long = server.complete(prompt="Hello", max_tokens=2000)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    wrong_model = server.complete(prompt="Hello", model="gpt-4")
    assert wrong_model.status_code == 404 and wrong_model.json()["error"]["code"] == "model_not_found"
    assert httpx.get(url).status_code == 405
    assert httpx.get(f"{server.url}/v2/nothing").json()["error"]["message"] == "Not Found"


def test_oversized_bodies_get_413(server: Server) -> None:
    url = f"{server.url}/v1/completions"
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    response = httpx.post(url, content=big, headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(url, content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]), timeout=TIMEOUT)
    assert chunked.status_code == 413
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_burst_larger_than_the_queue_gets_503_while_the_loop_stays_responsive(server: Server) -> None:
    before = server.metrics()
    extra = 4

    async def burst() -> tuple[list[httpx.Response], dict[str, int], int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            request = {"model": server.model_id, **HEAVY}
            tasks = [
                asyncio.create_task(client.post("/v1/completions", json=request)) for _ in range(1 + QUEUE_SIZE + extra)
            ]
            deadline = time.monotonic() + TIMEOUT
            while sum(task.done() for task in tasks) < extra:  # the refusals come back at once
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            # The generations are still running, and the event loop still answers: the admitted request is in the
            # batch once its prefill is done (the refusals may come back before that). Which of the tasks were
            # admitted depends on which connection reached the server first.
            while (load := (await client.get("/metrics")).json())["running"] == 0:
                assert time.monotonic() < deadline and sum(task.done() for task in tasks) == extra
                await asyncio.sleep(0.01)
            health = (await client.get("/health")).status_code
            return list(await asyncio.gather(*tasks)), load, health

    responses, load, health = asyncio.run(burst())
    assert health == 200
    assert (load["running"], load["running_rows"], load["queued"]) == (1, MAX_BATCH, QUEUE_SIZE)
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * (1 + QUEUE_SIZE) + [503] * extra
    refusal = next(response for response in responses if response.status_code == 503)
    assert refusal.json()["error"]["code"] == "queue_full" and refusal.headers["retry-after"] == "1"
    after = server.metrics()
    assert after["rejected"] - before["rejected"] == extra
    assert after["completed"] - before["completed"] == 1 + QUEUE_SIZE


def test_a_client_that_leaves_a_stream_stops_its_generation(server: Server) -> None:
    """The worker stops at the next token once the stream's client has disconnected."""
    before = server.wait_until(lambda metrics: metrics["running"] == 0 and metrics["queued"] == 0)
    request = {"model": server.model_id, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=request, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # held: dropping a half-read iterator would close the connection already
        assert next(lines).startswith("data: {")  # generating now
    # Leaving the block closes the connection mid-generation.
    after = server.wait_until(lambda metrics: metrics["cancelled"] == before["cancelled"] + 1)
    assert (after["running"], after["completed"], after["failed"]) == (0, before["completed"], before["failed"])


def test_a_client_that_leaves_a_whole_answer_stops_its_generation(server: Server) -> None:
    """A non-streamed request is stepped too: the worker stops at its next step, long before the answer is done."""
    before = server.wait_until(lambda metrics: metrics["running"] == 0 and metrics["queued"] == 0)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while its request is generating
        httpx.post(f"{server.url}/v1/completions", json={"model": server.model_id, **HEAVY}, timeout=0.3)
    after = server.wait_until(lambda metrics: metrics["cancelled"] == before["cancelled"] + 1)
    assert (after["running"], after["completed"]) == (0, before["completed"]), "stopped, not run to the end"


def test_a_queued_request_whose_client_left_never_runs(server: Server) -> None:
    before = server.wait_until(lambda metrics: metrics["running"] == 0 and metrics["queued"] == 0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        busy = pool.submit(server.complete, **HEAVY)
        server.wait_until(lambda metrics: metrics["running"] == 1)
        with pytest.raises(httpx.ReadTimeout):  # queued behind the busy worker; its client gives up
            httpx.post(f"{server.url}/v1/completions", json={"model": server.model_id, **HEAVY}, timeout=0.3)
        dropped = server.wait_until(lambda metrics: metrics["cancelled"] == before["cancelled"] + 1)
        assert dropped["running"] == 1  # the busy request was still running: the queued one was dropped unstarted
        assert busy.result().status_code == 200
    after = server.wait_until(lambda metrics: metrics["running"] == 0)
    assert after["completed"] == before["completed"] + 1


def test_threads_and_batch_options_reach_the_model_and_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """One batch steps at a time, so the model's steps take every core unless --threads says otherwise."""
    import gpt2onnx
    from gpt2onnx.serve import command

    asked: list[int | None] = []

    def fake_load(path: str, **options: Any) -> None:
        asked.append(options["threads"])
        raise gpt2onnx.BundleError("stop here")

    monkeypatch.setattr(gpt2onnx, "load", fake_load)
    assert command.main(["--model", "x", "--port", "0"]) == 2
    assert command.main(["--model", "x", "--port", "0", "--threads", "5"]) == 2
    assert asked == [None, 5]


def test_a_bundle_without_a_tokenizer_is_refused_at_start(tiny_gpt2: RandomGPT2, tmp_path: Path) -> None:
    """Every answer is text: the server would fail on each request, so it refuses to start."""
    from gpt2onnx.serve.app import create_app

    folder = tmp_path / "bundle"
    shutil.copytree(tiny_gpt2.bundle, folder)
    manifest = json.loads((folder / "bundle.json").read_text())
    manifest["tokenizer"] = None
    del manifest["files"]["tokenizer.json"]
    (folder / "tokenizer.json").unlink()
    (folder / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(gpt2onnx.InvalidInputError, match="has no tokenizer, and the server answers with text"):
        create_app(gpt2onnx.load(folder, threads=1))
