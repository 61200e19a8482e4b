"""gpt2-serve's continuous batching end to end: 16 concurrent mixed requests give exactly their answers alone;
a request that fails, or leaves, does so alone; /v1/chat/completions with a chat template; a graceful stop drains."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import gpt2onnx
from _server import TIMEOUT, Server, running_server
from conftest import REPO, RandomGPT2
from gpt2onnx.runtime.model import GPT2Model

MODEL_ID = "tiny-gpt2"
TEMPLATE = REPO / "examples" / "chat_template.jinja"
PROMPTS = ["Artificial intelligence", "Hello", "The quick brown fox jumps over the lazy dog", "naïve café 🤖", "a"]


@pytest.fixture(scope="module")
def server(tiny_gpt2: RandomGPT2, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve-batching") / "server.log"
    arguments = ["--max-batch", "16", "--queue-size", "32", "--chat-template", str(TEMPLATE)]
    with running_server(tiny_gpt2.bundle, log, MODEL_ID, arguments) as server:
        yield server


@pytest.fixture(scope="module")
def model(tiny_gpt2: RandomGPT2) -> GPT2Model:
    return gpt2onnx.load(tiny_gpt2.bundle, threads=1)


def mixed_requests(model: GPT2Model) -> list[dict[str, Any]]:
    """Greedy and seeded sampling, stop strings, several choices, different prompt lengths and max_tokens."""
    requests = []
    for index in range(16):
        prompt = PROMPTS[index % len(PROMPTS)] * (1 + index % 3)
        request: dict[str, Any] = {"prompt": prompt, "max_tokens": 6 + 3 * (index % 5)}
        if index % 2:
            request.update(temperature=(7 + index % 4) / 10, top_p=0.9, seed=100 + index)
        else:
            request.update(temperature=0)
        if index % 4 == 0:
            greedy = model.generate(prompt, max_new_tokens=request["max_tokens"]).text
            request["stop"] = [greedy[len(greedy) // 2 : len(greedy) // 2 + 2] or "x"]
        if index % 6 == 3:  # sampled requests only: n > 1 needs sampling
            request.update(n=2)
        requests.append(request)
    return requests


def test_sixteen_concurrent_mixed_requests_give_their_answers_alone(server: Server, model: GPT2Model) -> None:
    requests = mixed_requests(model)
    alone = [server.complete(**request).json()["choices"] for request in requests]  # one at a time
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        together = list(pool.map(lambda request: server.complete(**request).json()["choices"], requests))
    assert together == alone
    for request, choices in zip(requests, alone, strict=True):
        if request["temperature"] == 0:  # greedy: exactly generate() on the request alone
            options = {"max_new_tokens": request["max_tokens"], "stop": request.get("stop")}
            assert choices[0]["text"] == model.generate(request["prompt"], **options).text
    streamed = []
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        for events in pool.map(lambda request: server.events(**request), requests):
            texts: dict[int, str] = {}
            for event in events:
                for choice in event["choices"]:
                    texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            streamed.append(texts)
    assert streamed == [{choice["index"]: choice["text"] for choice in choices} for choices in alone]


def test_the_batch_really_ran_rows_together(server: Server) -> None:
    """While 8 long requests run, /metrics shows them decoding in one batch of 8 rows."""
    request = {"prompt": "Hello", "max_tokens": 1000, "temperature": 0}
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = [pool.submit(server.complete, **request) for _ in range(8)]
        busy = server.wait_until(lambda metrics: metrics["running_rows"] == 8)
        assert busy["running"] == 8
        assert len({answer.result().json()["choices"][0]["text"] for answer in answers}) == 1


def test_a_failing_request_fails_alone(server: Server) -> None:
    """A bad request is refused (400) while others decode; they finish as they would have."""
    request = {"prompt": "Hello", "max_tokens": 1000, "temperature": 0}  # about a second of work
    expected = server.complete(**request).json()["choices"][0]["text"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(server.complete, **request)
        server.wait_until(lambda metrics: metrics["running"] >= 1)
        bad = server.complete(prompt="Hello", max_tokens=5, top_p=7)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"
        assert running.result().json()["choices"][0]["text"] == expected


def test_a_request_larger_than_the_batch_is_refused(server: Server) -> None:
    response = server.complete(prompt=["Hello"] * 9, n=2, max_tokens=3)
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    assert "18 rows is more than this server's batch of 16" in response.json()["error"]["message"]


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is artificial intelligence?"},
]


def rendered(messages: list[dict[str, str]]) -> str:
    from gpt2onnx.serve.chat import ChatTemplate

    return ChatTemplate.from_file(TEMPLATE, "<|endoftext|>", "<|endoftext|>").render(messages)


def test_chat_completion_is_the_completion_of_the_rendered_conversation(server: Server) -> None:
    body = server.chat(messages=MESSAGES, max_tokens=12, temperature=0).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    completion = server.complete(prompt=rendered(MESSAGES), max_tokens=12, temperature=0).json()
    assert choice["message"]["content"] == completion["choices"][0]["text"]
    assert choice["finish_reason"] == completion["choices"][0]["finish_reason"]
    assert body["usage"] == completion["usage"]


def test_chat_streams_deltas_and_works_with_the_openai_client(server: Server) -> None:
    request = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0.8, "seed": 7, "n": 2}
    whole = server.chat(**request).json()["choices"]
    events = server.events("/v1/chat/completions", **request)
    assert all(event["object"] == "chat.completion.chunk" for event in events)
    firsts = [event["choices"][0] for event in events[:2]]
    assert [first["delta"] for first in firsts] == [{"role": "assistant", "content": ""}] * 2
    texts: dict[int, str] = {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["delta"].get("content", "")
    assert texts == {choice["index"]: choice["message"]["content"] for choice in whole}
    client = server.client()
    answer = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=10, temperature=0)
    assert (
        answer.choices[0].message.content
        == server.chat(messages=MESSAGES, max_tokens=10, temperature=0).json()["choices"][0]["message"]["content"]
    )
    chunks = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=10, temperature=0, stream=True, logprobs=True, top_logprobs=2
    )
    pieces = [chunk.choices[0] for chunk in chunks if chunk.choices]
    assert "".join(piece.delta.content or "" for piece in pieces) == answer.choices[0].message.content
    entries = [entry for piece in pieces if piece.logprobs for entry in piece.logprobs.content]
    assert len(entries) == answer.usage.completion_tokens and all(len(entry.top_logprobs) <= 3 for entry in entries)


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({}, "messages", "messages must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "messages", "messages[0].content must be a string"),
        ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs: true"),
        ({"messages": MESSAGES, "max_tokens": 3, "max_completion_tokens": 3}, "max_completion_tokens", "not both"),
        ({"messages": MESSAGES, "prompt": "x"}, "prompt", "unrecognized request argument"),
    ],
)
def test_bad_chat_requests(server: Server, body: dict, param: str, fragment: str) -> None:
    response = server.chat(**body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert fragment in response.json()["error"]["message"]


def test_without_a_chat_template_chat_says_how_to_give_one(tiny_gpt2: RandomGPT2, tmp_path: Path) -> None:
    with running_server(tiny_gpt2.bundle, tmp_path / "log", MODEL_ID, []) as plain:
        response = plain.chat(messages=MESSAGES)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "chat_template_missing" and "GPT-2 has no chat template" in error["message"]
    assert "--chat-template FILE" in error["message"]


def test_a_bad_chat_template_fails_at_start(tiny_gpt2: RandomGPT2, tmp_path: Path) -> None:
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m.content }")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "gpt2onnx.serve.command", "--model", str(tiny_gpt2.bundle), "--port", "0"),
            *("--chat-template", str(tmp_path / "bad.jinja")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"gpt2-serve: error: chat template {tmp_path / 'bad.jinja'}, line 1:")


def test_sigterm_drains_the_running_rows_then_exits_0(tiny_gpt2: RandomGPT2, tmp_path: Path) -> None:
    """A stream that is generating when SIGTERM comes is finished, to its [DONE]; then the server exits 0."""
    with running_server(tiny_gpt2.bundle, tmp_path / "log", MODEL_ID, []) as draining:
        request = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 400, "temperature": 0, "stream": True}
        expected = draining.complete(**{**request, "stream": False}).json()["choices"][0]["text"]
        with httpx.stream("POST", f"{draining.url}/v1/completions", json=request, timeout=TIMEOUT) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            draining.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        data = [first, *rest]
        assert data[-1] == "data: [DONE]"
        text = "".join(json.loads(line.removeprefix("data: "))["choices"][0]["text"] for line in data[:-1])
        assert text == expected
        draining.process.wait(timeout=30)
        assert draining.process.returncode == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{draining.url}/health", timeout=2)
