"""Where a bundle's graph spends its time: onnxruntime's own profiler, summed per operator type.

    python benchmarks/profile_ops.py models/random-small [--past 40] [--batch 1] [--prompt 512] [--runs 30]

Profiles one decode step (`--batch` rows, one new token after `--past` cached positions) and one prefill of
`--prompt` tokens, after two unmeasured runs each, with the session options the runtime uses. Prints, per operator
type, the milliseconds per run and the share of the kernel time, then the slowest single nodes. The profiler adds
some time per node: use the shares, and profile_decode.py or benchmarks/run.py for wall times.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gpt2onnx.runtime import bundle
from gpt2onnx.runtime._ort import ort
from gpt2onnx.runtime.bundle import read_manifest
from gpt2onnx.runtime.session import session_options


def _feeds(manifest: Any, batch: int, past: int, new: int) -> dict[str, np.ndarray]:
    arch = manifest.architecture
    dtype = np.float16 if manifest.dtype == "float16" else np.float32
    rng = np.random.default_rng(0)
    feeds = {
        bundle.INPUT_IDS: rng.integers(0, arch.vocab_size, (batch, new)).astype(np.int64),
        bundle.ATTENTION_MASK: np.ones((batch, past + new), np.int64),
        bundle.POSITION_IDS: np.tile(np.arange(past, past + new, dtype=np.int64), (batch, 1)),
        bundle.LOGITS_TO_KEEP: np.array(1, np.int64),
    }
    capacity = past + new if manifest.kv_cache == "preallocated" else past
    for layer in range(arch.n_layer):
        for name in (bundle.past_key_name(layer), bundle.past_value_name(layer)):
            feeds[name] = rng.random((batch, arch.n_head, capacity, arch.head_dim)).astype(dtype)
    return feeds


def _runner(session: Any, manifest: Any, feeds: dict[str, np.ndarray]) -> Callable[[], Any]:
    """One run of the step, as the runtime makes it: a preallocated cache is bound as both past and present."""
    if manifest.kv_cache != "preallocated":
        return lambda: session.run(None, feeds)
    binding = session.io_binding()
    binding.bind_output(bundle.LOGITS, "cpu")
    inputs, outputs = bundle.io_names(manifest.architecture.n_layer)
    presents = dict(zip(inputs[4:], outputs[1:], strict=True))
    for name, array in feeds.items():
        value = ort.OrtValue.ortvalue_from_numpy(array)
        binding.bind_ortvalue_input(name, value)
        if name in presents:
            binding.bind_ortvalue_output(presents[name], value)
    return lambda: session.run_with_iobinding(binding)


def profile(manifest: Any, feeds: dict[str, np.ndarray], runs: int, warmup: int = 2) -> tuple[dict, dict]:
    """Milliseconds per run by operator type and by node, over `runs` runs after `warmup` ones (left out)."""
    options = session_options()
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ops")
    session = ort.InferenceSession(str(manifest.model_path), options, providers=["CPUExecutionProvider"])
    run = _runner(session, manifest, feeds)
    for _ in range(warmup + runs):
        run()
    trace = Path(session.end_profiling())
    kernels = [
        event
        for event in json.loads(trace.read_text())
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
    ]
    trace.unlink()
    per_run = len(kernels) // (warmup + runs)  # every run executes the same nodes, in order
    by_type: collections.Counter[str] = collections.Counter()
    by_node: collections.Counter[str] = collections.Counter()
    for event in kernels[warmup * per_run :]:
        by_type[event["args"]["op_name"]] += event["dur"] / 1000 / runs
        by_node[event["name"].removesuffix("_kernel_time")] += event["dur"] / 1000 / runs
    return dict(by_type), dict(by_node)


def report(title: str, by_type: dict[str, float], by_node: dict[str, float], nodes: int) -> None:
    total = sum(by_type.values())
    print(f"\n{title}: {total:.2f} ms of kernel time per run")
    for op, ms in sorted(by_type.items(), key=lambda item: -item[1]):
        print(f"  {op:28s} {ms:9.3f} ms  {100 * ms / total:5.1f}%")
    slowest = sorted(by_node.items(), key=lambda item: -item[1])[:nodes]
    print("  slowest nodes:", ", ".join(f"{name} {ms:.3f} ms" for name, ms in slowest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--past", type=int, default=40, help="cached positions before the decode step")
    parser.add_argument("--batch", type=int, default=1, help="rows of the decode step (5 for beam-5)")
    parser.add_argument("--prompt", type=int, default=512, help="prefill length (0: skip the prefill)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=5, help="slowest single nodes to list")
    args = parser.parse_args()
    manifest = read_manifest(args.bundle)
    decode = profile(manifest, _feeds(manifest, args.batch, args.past, 1), args.runs)
    report(f"decode step, batch {args.batch}, past {args.past}", *decode, args.nodes)
    if args.prompt:
        prefill = profile(manifest, _feeds(manifest, 1, 0, args.prompt), max(1, args.runs // 10))
        report(f"prefill of {args.prompt} tokens", *prefill, args.nodes)


if __name__ == "__main__":
    main()
