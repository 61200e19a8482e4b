"""Times one bundle's decode: ms/token, Python overhead per step, first token after a long prompt, cold load.

    python benchmarks/profile_decode.py models/random-small [--runs 7] [--new-tokens 50] [--long-prompt 512]
                                        [--num-beams 1]

Greedy search by default; --num-beams B times beam search instead (B beams, all --new-tokens generated).

Decode ms/token = (time for N new tokens - time for 1) / (N - 1), median of --runs runs after a warm-up.
Python overhead per step = (decode wall time - time spent inside onnxruntime's run calls) / steps; and the same loop
with the onnxruntime session replaced by a stub that returns fixed outputs at once (pure Python cost per step; greedy
only).
Cold load = a fresh process that loads the bundle (hashes checked) and produces one token. Idle CPU = CPU time of
this process during 0.5 s of sleep right after a generation.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
from workload import PROMPT, decode_ms_per_token, long_prompt

from gpt2onnx.runtime import bundle


class TimedSession:
    """Wraps an onnxruntime InferenceSession, adding up the seconds spent inside its run calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not name.startswith("run"):
            return attribute

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return attribute(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def _generate_seconds(model: Any, prompt: list[int], new_tokens: int, beams: int = 1) -> tuple[float, float]:
    """Wall seconds of one generate call (greedy, or beam search with all new tokens), and the seconds of it spent
    inside onnxruntime."""
    timed: TimedSession = model.session.session
    timed.seconds = 0.0
    search = {"num_beams": beams, "min_new_tokens": new_tokens} if beams > 1 else {}
    start = time.perf_counter()
    out = model.generate(input_ids=prompt, max_new_tokens=new_tokens, **search)
    wall = time.perf_counter() - start
    assert len(out.results[0].sequences[0].generated_token_ids) == new_tokens
    return wall, timed.seconds


class StubSession:
    """Stands in for the InferenceSession: returns the same logits and present tensors instantly (from run(), or
    through an IO binding for a preallocated cache)."""

    def __init__(self, outputs: list[Any]) -> None:
        self.outputs = outputs

    def run(self, output_names: list[str], feed: dict[str, Any], run_options: Any = None) -> list[Any]:
        return self.outputs

    def io_binding(self) -> StubBinding:
        return StubBinding()

    def run_with_iobinding(self, binding: StubBinding, run_options: Any = None) -> None:
        """Writes the fixed logits (last position) into the buffer the runtime bound for them."""
        shape, address = binding.logits
        count = int(np.prod(shape))
        target = np.ctypeslib.as_array((ctypes.c_float * count).from_address(address)).reshape(shape)
        target[...] = self.outputs[0][:, -1:, :]


class StubBinding:
    """An IO binding that binds nothing but remembers where the logits go."""

    logits: tuple[list[int], int]

    def bind_output(self, name: str, device: str = "cpu", *args: Any) -> None:
        if name == bundle.LOGITS and args:
            _, _, shape, address = args
            self.logits = (shape, address)

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("bind_"):
            raise AttributeError(name)
        return lambda *args: None


def python_ms_per_step(model: Any, new_tokens: int, runs: int) -> float:
    """Per-step cost of the greedy loop itself: generate() with the session stubbed out, 1 and new_tokens tokens,
    through the same ms/token formula as the real decode (medians of `runs`)."""
    session = model.session
    logits, past = session.forward([PROMPT], [[1] * len(PROMPT)], [list(range(len(PROMPT)))], session.empty_cache(1))
    real = session.session
    session.session = StubSession([logits, *[t for pair in zip(past.keys, past.values, strict=True) for t in pair]])

    def seconds(tokens: int) -> float:
        start = time.perf_counter()
        model.generate(input_ids=PROMPT, max_new_tokens=tokens)
        return time.perf_counter() - start

    try:
        seconds(new_tokens)  # warm-up
        samples = [decode_ms_per_token(seconds(1), seconds(new_tokens), new_tokens) for _ in range(runs)]
    finally:
        session.session = real
    return statistics.median(samples)


def idle_cpu_ms(model: Any, seconds: float = 0.5) -> float:
    """CPU milliseconds this process uses while idle for `seconds` right after a generation (onnxruntime's threads
    must stop spinning when a run returns)."""
    model.generate(input_ids=PROMPT, max_new_tokens=8)
    start = time.process_time()
    time.sleep(seconds)
    return (time.process_time() - start) * 1000


def cold_load_seconds(bundle: str, provider: str) -> float:
    """Seconds from a fresh interpreter's start to the first generated token (import, hash check, load, prefill)."""
    code = (
        "import time; start = time.perf_counter(); import gpt2onnx; "
        f"model = gpt2onnx.load({bundle!r}, provider={provider!r}); "
        f"model.generate(input_ids={PROMPT!r}, max_new_tokens=1); print(time.perf_counter() - start)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def profile(
    bundle: str, runs: int, new_tokens: int, long_prompt_tokens: int, provider: str, beams: int = 1
) -> dict[str, Any]:
    import gpt2onnx

    model = gpt2onnx.load(bundle, provider=provider)
    model.session.session = TimedSession(model.session.session)
    long = long_prompt(long_prompt_tokens)
    _generate_seconds(model, PROMPT, new_tokens, beams)  # warm-up
    _generate_seconds(model, long, 1)
    decode, overhead, first_long = [], [], []
    for _ in range(runs):
        one_wall, one_ort = _generate_seconds(model, PROMPT, 1, beams)
        many_wall, many_ort = _generate_seconds(model, PROMPT, new_tokens, beams)
        decode.append(decode_ms_per_token(one_wall, many_wall, new_tokens))
        overhead.append(decode_ms_per_token(one_wall - one_ort, many_wall - many_ort, new_tokens))
        first_long.append(_generate_seconds(model, long, 1)[0] * 1000)
    stubbed = python_ms_per_step(model, new_tokens, runs) if beams == 1 else None
    idle = idle_cpu_ms(model)
    cold = [cold_load_seconds(bundle, provider) for _ in range(3)]
    graph = model.manifest.data["graph"]
    return {
        "bundle": bundle,
        "dtype": graph["dtype"],
        "optimizations": graph.get("optimizations"),
        "quantization": graph.get("quantization"),
        "provider": model.provider,
        "num_beams": beams,
        "decode_ms_per_token": statistics.median(decode),
        "python_overhead_ms_per_step": statistics.median(overhead),
        "python_ms_per_step_session_stubbed": stubbed,
        f"first_token_after_{long_prompt_tokens}_ms": statistics.median(first_long),
        "cold_load_and_first_token_s": statistics.median(cold),
        "idle_cpu_ms_after_generate": idle,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--long-prompt", type=int, default=512)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default greedy)")
    args = parser.parse_args()
    for folder in args.bundles:
        result = profile(folder, args.runs, args.new_tokens, args.long_prompt, args.provider, args.num_beams)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
