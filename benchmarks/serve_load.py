"""gpt2-serve under load: 1, 4, 16 and 32 concurrent streaming clients, side by side with the thread-per-request
server of an earlier commit and with model.generate on a batch, in one run. Loopback only; bounded in requests.

    python benchmarks/serve_load.py [BUNDLE] [--clients 1 4 16 32] [--requests 3] [--max-tokens 64]
                                    [--baseline REV] [--out benchmarks/serve_results.md]

BUNDLE defaults to a GPT-2-small int8 bundle of random weights, exported on first use into benchmarks/work/.
--llama-server BIN --gguf FILE adds llama.cpp's server with one parallel slot per client (continuous batching of
its own) on a GGUF of the same weights. Each
client sends --requests streaming completions one after another (temperature 0, --max-tokens tokens each, a
9-token prompt). Per system and client count: aggregate generated tokens/s (all clients' tokens / wall time),
time to first token and inter-token latency (between a stream's consecutive chunks) at p50 and p99. --baseline: a
git revision whose gpt2-serve (one thread per request, --workers 1 as it shipped) runs from a worktree for comparison
(default: the commit before continuous batching; '' skips it). model.generate on a batch of --batch rows of the
same prompt gives the batch-throughput ceiling in the same run. The page is written to --out and printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from report import cpu_kind
from run import machine
from sse_client import Dropped, StreamingConnection
from workload import PROMPT

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
BASELINE = "4cc91e4"  # the last commit whose gpt2-serve ran one generation per request on worker threads


@dataclass
class Load:
    """What one client count measured."""

    clients: int
    tokens: int = 0
    seconds: float = 0.0
    first_token_s: list[float] = field(default_factory=list)
    inter_token_s: list[float] = field(default_factory=list)
    errors: int = 0  # connections the server dropped without an answer (the request is sent again)
    client_cpu_s: float = 0.0  # CPU time the load generator itself took (it shares the cores with the server)

    def row(self) -> dict[str, float | int]:
        return {
            "clients": self.clients,
            "tokens_per_s": self.tokens / self.seconds,
            "ttft_p50_ms": 1000 * percentile(self.first_token_s, 0.5),
            "ttft_p99_ms": 1000 * percentile(self.first_token_s, 0.99),
            "itl_p50_ms": 1000 * percentile(self.inter_token_s, 0.5),
            "itl_p99_ms": 1000 * percentile(self.inter_token_s, 0.99),
            "dropped": self.errors,
            "client_cpu_ms_per_token": 1000 * self.client_cpu_s / max(1, self.tokens),
        }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with log.open("w") as output:
        process = subprocess.Popen(
            [*command, "--port", str(port)], stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:  # llama-server answers 503 while loading
                return process, url
            time.sleep(0.2)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the server did not start within 120 s") from None
            time.sleep(0.2)


async def client(url: str, requests: int, max_tokens: int, load: Load) -> None:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    address = urlsplit(url)
    connection = StreamingConnection(address.hostname, address.port)
    done = 0
    try:
        while done < requests:
            last = time.perf_counter()
            tokens, finish, gaps = 0, None, []
            try:
                async for data in connection.events("/v1/completions", body):
                    if not data.startswith(b"{"):
                        continue
                    choice = json.loads(data)["choices"][0]
                    now = time.perf_counter()
                    if choice["text"]:
                        gaps.append(now - last)
                        tokens, last = tokens + 1, now
                    finish = choice["finish_reason"] or finish
            except Dropped:  # a dropped connection: counted, and the request sent again
                load.errors += 1
                if load.errors > 10 * requests:
                    raise
                continue
            done += 1
            if gaps:
                load.first_token_s.append(gaps[0])
                load.inter_token_s.extend(gaps[1:])
            # A token whose text is still incomplete (part of a character) sends no chunk: count by the limit.
            load.tokens += max_tokens if finish == "length" else tokens
    finally:
        await connection.close()


def measure(url: str, clients: int, requests: int, max_tokens: int) -> Load:
    load = Load(clients)

    async def run() -> None:
        await asyncio.gather(*(client(url, requests, max_tokens, load) for _ in range(clients)))

    start, cpu = time.perf_counter(), time.process_time()
    asyncio.run(run())
    load.seconds, load.client_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return load


def batch_generate_tokens_per_s(bundle: Path, rows: int, max_tokens: int) -> float:
    """model.generate on `rows` copies of the prompt: the throughput of a batch that is full from start to end."""
    import gpt2onnx

    model = gpt2onnx.load(bundle, provider="cpu")
    model.generate(input_ids=[PROMPT] * rows, max_new_tokens=4, min_new_tokens=4)  # warm-up
    start = time.perf_counter()
    model.generate(input_ids=[PROMPT] * rows, max_new_tokens=max_tokens, min_new_tokens=max_tokens)
    return rows * max_tokens / (time.perf_counter() - start)


def baseline_package(revision: str, work: Path) -> Path:
    """A folder that imports as the gpt2onnx of `revision` (a git worktree, named as the package)."""
    tree = work / f"baseline-{revision}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), revision], check=True)
    package = work / f"baseline-{revision}-path"
    package.mkdir(exist_ok=True)
    link = package / "gpt2onnx"
    if not link.exists():
        link.symlink_to(tree, target_is_directory=True)
    return package


def ensure_bundle(bundle: Path | None, work: Path) -> Path:
    if bundle is not None:
        return bundle
    folder = work / "bundles" / "small-int8-serve"
    if not (folder / "bundle.json").exists():
        command = [sys.executable, "-m", "gpt2onnx.cli.export_command", "--random-init", "small", "--quantize", "int8"]
        subprocess.run([*command, "--output", str(folder), "--force", "--quiet"], check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=3, help="requests per client (default 3)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="rows of the model.generate comparison (default 16)")
    parser.add_argument("--max-batch", type=int, default=16, help="gpt2-serve --max-batch (default 16)")
    parser.add_argument("--threads", type=int, help="gpt2-serve --threads (default: its own, the physical cores)")
    parser.add_argument("--baseline", default=BASELINE, help=f"earlier revision to compare with (default {BASELINE})")
    parser.add_argument("--work", type=Path, default=BENCHMARKS / "work")
    parser.add_argument(
        "--llama-server",
        type=Path,
        help="a llama.cpp llama-server binary, to run beside (with --gguf) with parallel slots",
    )
    parser.add_argument("--gguf", type=Path, help="the GGUF of the same weights for --llama-server (e.g. q8_0)")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "serve_results.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(args.bundle, args.work)
    queue = str(max(args.clients) * 2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    threads = ["--threads", str(args.threads)] if args.threads else []
    systems = [
        (
            f"gpt2-serve (continuous batching, --max-batch {args.max_batch})",
            [
                *(sys.executable, "-m", "gpt2onnx.serve.command", "--model", str(bundle), *threads),
                *("--max-batch", str(args.max_batch), "--queue-size", queue, "--log-level", "warning"),
            ],
            env,
        )
    ]
    if args.baseline:
        path = baseline_package(args.baseline, args.work)
        systems.append(
            (
                f"gpt2-serve at {args.baseline} (a thread per request, --workers 1)",
                [
                    *(sys.executable, "-m", "gpt2onnx.serve.command", "--model", str(bundle), *threads),
                    *("--workers", "1", "--queue-size", queue, "--log-level", "warning"),
                ],
                {**env, "PYTHONPATH": str(path)},
            )
        )
    if args.llama_server and args.gguf:
        slots = max(args.clients)
        systems.append(
            (
                f"llama.cpp llama-server ({args.gguf.name}, {slots} parallel slots)",
                [
                    *(str(args.llama_server), "-m", str(args.gguf), "--host", "127.0.0.1", "-np", str(slots)),
                    *("-c", str(1024 * slots), "-t", str(os.cpu_count() or 2), "--threads-http", str(3 * slots)),
                    "--log-disable",
                ],
                env,
            )
        )
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as logs:
        for name, command, system_env in systems:
            process, url = start_server(command, system_env, Path(logs) / "server.log")
            try:
                measure(url, 1, 1, 8)  # warm-up
                results[name] = []
                for clients in args.clients:
                    row = measure(url, clients, args.requests, args.max_tokens).row()
                    print(json.dumps({"system": name, **row}), flush=True)
                    results[name].append(row)
            finally:
                process.terminate()
                process.wait(timeout=60)
    batch = batch_generate_tokens_per_s(bundle, args.batch, args.max_tokens)
    section = report(results, batch, args, bundle, machine()["cpu"])
    previous = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
    args.out.write_text(merged_page(previous, section), encoding="utf-8")
    print(section)


def report(results: dict[str, list[dict]], batch: float, args: argparse.Namespace, bundle: Path, cpu: str) -> str:
    """This run's section of the page: its CPU, how it measured, and a row per server and client count."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {cpu_kind(cpu)}",
        "",
        f"Measured {when} with `python benchmarks/serve_load.py` on {cpu} ({os.cpu_count()} CPUs): bundle "
        f"`{bundle.name}`, {args.requests} streaming requests per client one after another, {args.max_tokens} tokens "
        f"each (temperature 0, a {len(PROMPT)}-token prompt), over loopback. Tokens/s is every client's tokens over "
        "the wall time; time to first token (TTFT) counts from the request; inter-token latency (ITL) is the gap "
        "between a stream's chunks. Dropped: connections closed without an answer (the client sends the request "
        "again).",
        "",
        "| server | clients | tokens/s | vs one client | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | dropped |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        one = rows[0]["tokens_per_s"]
        for row in rows:
            lines.append(
                f"| {name} | {row['clients']} | {row['tokens_per_s']:.0f} | {row['tokens_per_s'] / one:.2f}x "
                f"| {row['ttft_p50_ms']:.0f} / {row['ttft_p99_ms']:.0f} | {row['itl_p50_ms']:.1f} / "
                f"{row['itl_p99_ms']:.1f} | {row['dropped']} |"
            )
    lines += ["", f"model.generate on a batch of {args.batch} rows, same run: {batch:.0f} tokens/s.", ""]
    return "\n".join(lines)


def merged_page(previous: str, section: str) -> str:
    """The page with this run's section in place of the earlier one of the same CPU kind; other kinds' are kept."""
    sections = {}
    for part in previous.split("\n## ")[1:]:
        sections[part.split("\n", 1)[0].strip()] = "## " + part.strip() + "\n"
    sections[section.split("\n", 1)[0][3:].strip()] = section
    head = [
        "# gpt2-serve under load",
        "",
        "One section per kind of CPU (the machines here are AMD EPYC or Intel Xeon, at random): a run replaces the "
        "section of its own kind. Compare rows within a section only.",
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(sections[kind] for kind in sorted(sections))


if __name__ == "__main__":
    main()
