"""gpt2-serve on Ray Serve (gpt2onnx.serve.ray): two replicas on a local Ray instance (loopback only) answer as
gpt2-serve does, and go on answering after one replica's process is killed and Ray replaces it.

Runs where Ray is installed: .ci/run builds .venv-ray (gpt2-onnx[cpu,serve,ray,test], no torch) and runs this file
there with GPT2ONNX_RAY=1 and GPT2ONNX_RAY_BUNDLE (a bundle exported in the full environment); elsewhere the tiny
test bundle is used, or the file is skipped without Ray.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from _server import free_port, running_server

IN_RAY_ENV = os.environ.get("GPT2ONNX_RAY") == "1"
if not IN_RAY_ENV:
    pytest.importorskip("ray", reason="Ray is not installed here; .ci/run runs these tests in .venv-ray")

import ray  # noqa: E402
from ray import serve  # noqa: E402

MODEL_ID = "tiny-gpt2"
REQUESTS: list[dict[str, Any]] = [
    {"prompt": "Artificial intelligence", "max_tokens": 12, "temperature": 0},
    {"prompt": "Hello", "max_tokens": 9, "temperature": 0.8, "seed": 3},
    {"prompt": ["a", "naïve café 🤖"], "max_tokens": 7, "temperature": 0.9, "seed": 4, "n": 2},
    {"prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0, "stop": ["x"]},
] * 2


@pytest.fixture(scope="module")
def bundle(request: pytest.FixtureRequest) -> Path:
    given = os.environ.get("GPT2ONNX_RAY_BUNDLE")
    if given:
        return Path(given)
    if IN_RAY_ENV:
        pytest.fail("GPT2ONNX_RAY_BUNDLE must name a bundle exported in the full environment")
    return request.getfixturevalue("tiny_gpt2").bundle


@pytest.fixture(scope="module")
def ray_url(bundle: Path) -> Iterator[str]:
    """Two replicas of gpt2-serve's application on a local Ray instance whose every address is loopback."""
    from gpt2onnx.serve.ray import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        arguments = {"model": str(bundle), "num_replicas": "2", "num_cpus": "0.5", "max_batch": "8"}
        serve.run(build_app({**arguments, "model_name": MODEL_ID, "threads": "1"}), blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def plain_url(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("plain") / "server.log"
    with running_server(bundle, log, MODEL_ID, ["--max-batch", "8", "--threads", "1"]) as server:
        yield server.url


def answers(url: str, requests: list[dict[str, Any]]) -> list[list[str]]:
    """Each request's choices' texts, the requests sent at once."""

    def one(body: dict[str, Any]) -> list[str]:
        response = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, **body}, timeout=120)
        assert response.status_code == 200, response.text
        return [choice["text"] for choice in response.json()["choices"]]

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(one, requests))


def replica_names() -> list[str]:
    return sorted(
        actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True) if "REPLICA" in actor["name"]
    )


def test_replicas_answer_as_gpt2_serve_does(ray_url: str, plain_url: str) -> None:
    assert httpx.get(f"{ray_url}/health", timeout=30).json()["model"] == MODEL_ID
    assert [card["id"] for card in httpx.get(f"{ray_url}/v1/models", timeout=30).json()["data"]] == [MODEL_ID]
    assert answers(ray_url, REQUESTS) == answers(plain_url, REQUESTS)
    streamed = httpx.post(
        f"{ray_url}/v1/completions", json={"model": MODEL_ID, **REQUESTS[0], "stream": True}, timeout=60
    ).text
    assert streamed.rstrip().endswith("data: [DONE]")
    status = serve.status().applications["default"].deployments["gpt2onnx"]
    assert status.replica_states == {"RUNNING": 2}


def test_a_killed_replica_is_replaced_and_requests_go_on(ray_url: str, plain_url: str) -> None:
    before = replica_names()
    assert len(before) == 2
    victim = ray.get_actor(before[0], namespace="serve")
    pid = ray.get(victim.__ray_call__.remote(lambda replica: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:  # Ray notices the death and starts a new replica
        names = replica_names()
        states = serve.status().applications["default"].deployments["gpt2onnx"].replica_states
        if len(names) == 2 and before[0] not in names and states == {"RUNNING": 2}:
            break
        assert time.monotonic() < deadline, f"no replacement replica within 120 s: {names} {states}"
        time.sleep(0.5)
    assert answers(ray_url, REQUESTS) == answers(plain_url, REQUESTS)
