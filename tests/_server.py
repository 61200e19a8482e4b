"""A real gpt2-serve in a subprocess (torch and transformers unimportable) on a free loopback port, and a client."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from conftest import BLOCKER

TIMEOUT = 60.0


@dataclass
class Server:
    url: str
    model_id: str
    process: subprocess.Popen | None = None

    def complete(self, **body: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/completions", json={"model": self.model_id, **body}, timeout=TIMEOUT)

    def chat(self, **body: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json={"model": self.model_id, **body}, timeout=TIMEOUT)

    def metrics(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/metrics", timeout=TIMEOUT).json()

    def events(self, path: str = "/v1/completions", **body: Any) -> list[dict[str, Any]]:
        """The JSON events of a streamed answer; checks the stream ends with `data: [DONE]`."""
        with httpx.stream(
            "POST", f"{self.url}{path}", json={"model": self.model_id, **body, "stream": True}, timeout=TIMEOUT
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            data = [line.removeprefix("data: ") for line in response.iter_lines() if line]
        assert data[-1] == "[DONE]"
        return [json.loads(item) for item in data[:-1]]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT)

    def wait_until(self, condition: Callable[[dict[str, Any]], bool], seconds: float = 30.0) -> dict[str, Any]:
        """Poll /metrics until condition holds (bounded); return the metrics that satisfied it."""
        deadline = time.monotonic() + seconds
        while not condition(metrics := self.metrics()):
            assert time.monotonic() < deadline, f"metrics never reached the expected state: {metrics}"
            time.sleep(0.05)
        return metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(bundle: Path, log: Path, model_id: str, arguments: list[str]) -> Iterator[Server]:
    """gpt2-serve until the block ends, then SIGTERM: it must stop gracefully (exit 0) having loaded no torch."""
    port = free_port()
    command = [
        *(sys.executable, "-c", BLOCKER, "gpt2onnx.serve.command"),
        *("--model", str(bundle), "--model-name", model_id, "--port", str(port), "--log-level", "warning"),
        *arguments,
    ]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"gpt2-serve exited: {log.read_text()}"
            try:
                health = httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"gpt2-serve did not start within 60 s: {log.read_text()}"
                time.sleep(0.1)
        assert health.json()["model"] == model_id
        yield Server(url, model_id, process)
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()  # SIGTERM: a graceful stop
    assert json.loads(log.read_text().strip().splitlines()[-1]) == {"loaded": []}
