"""gpt2-onnx on CUDA against PyTorch on the same GPU (run through benchmarks/gpu_check.sh on a GPU machine).

For fp32 and fp16 bundles of a seeded random GPT-2 (--shape, default small): greedy parity with PyTorch's generate
(batch 1, and a left-padded batch of 2), decode ms/token ((time for N tokens - time for 1) / (N - 1), median of
--runs) and the first token after a 512-token prompt, for gpt2-onnx (KV cache on the GPU through IO binding, and
once with the cache copied through host memory for comparison) and for PyTorch's generate. Prints a table; exits 1
when the fp32 greedy tokens differ from PyTorch's. `--provider cpu --shape tiny` dry-runs the script without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workload import EOS, PROMPT, decode_ms_per_token, long_prompt

BATCH = [PROMPT, [464, 2068, 7586, 21831]]


def _median_ms(action: Callable[[], Any], runs: int) -> float:
    action()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def _leading_match(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def _torch_greedy(model: Any, rows: list[list[int]], new_tokens: int, exact_length: bool = False) -> list[list[int]]:
    import torch

    from gpt2onnx.runtime.padding import PaddedBatch

    batch = PaddedBatch.from_rows(rows, pad_token_id=EOS)
    with torch.no_grad():
        output = model.generate(
            input_ids=torch.from_numpy(batch.input_ids).to(model.device),
            attention_mask=torch.from_numpy(batch.attention_mask).to(model.device),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if exact_length else None,
            do_sample=False,
            pad_token_id=EOS,
        )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return output[:, batch.input_ids.shape[1] :].tolist()


def _strip(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def check(dtype: str, shape: str, root: Path, new_tokens: int, runs: int, provider: str) -> list[dict[str, Any]]:
    import torch

    import gpt2onnx
    from gpt2onnx.export.checkpoint import random_checkpoint
    from gpt2onnx.export.exporter import export_bundle
    from gpt2onnx.runtime.session import DecoderSession

    start = time.perf_counter()
    # A growing cache: the preallocated one (GroupQueryAttention over fp32 buffers) runs on the CPU provider only.
    folder = export_bundle(output=root / dtype, dtype=dtype, random_init=shape, kv_cache="growing", force=True)
    print(f"[{dtype}] exported {folder} in {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    model = gpt2onnx.load(folder, provider=provider)
    load_s = time.perf_counter() - start
    _, past = model.session.forward([[1, 2]], [[1, 1]], [[0, 1]], model.session.empty_cache(1))
    where = past.keys[0].device_name() if model.session.cache_kind == "device" else "host (numpy)"
    print(f"[{dtype}] loaded in {load_s:.2f} s; providers {model.session.session.get_providers()}; KV cache on {where}")
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    reference = random_checkpoint(shape, 0).model.to("cuda" if provider == "cuda" else "cpu", dtype=torch_dtype)

    ours = [
        r.sequences[0].generated_token_ids for r in model.generate(input_ids=BATCH, max_new_tokens=new_tokens).results
    ]
    single = model.generate(input_ids=PROMPT, max_new_tokens=new_tokens).results[0].sequences[0].generated_token_ids
    theirs = [_strip(row) for row in _torch_greedy(reference, BATCH, new_tokens)]
    their_single = _strip(_torch_greedy(reference, [PROMPT], new_tokens)[0])
    matches = [_leading_match(a, b) for a, b in zip([single, *ours], [their_single, *theirs], strict=True)]
    exact = [single, *ours] == [their_single, *theirs]

    long = long_prompt(512)

    def ours_ms(session: Any) -> tuple[float, float]:
        model.session = session
        one = _median_ms(lambda: model.generate(input_ids=PROMPT, max_new_tokens=1), runs)
        many = _median_ms(
            lambda: model.generate(input_ids=PROMPT, max_new_tokens=new_tokens, min_new_tokens=new_tokens), runs
        )
        first = _median_ms(lambda: model.generate(input_ids=long, max_new_tokens=1), runs)
        return decode_ms_per_token(one / 1000, many / 1000, new_tokens), first

    device_session = (
        model.session
        if model.session.cache_kind == "device"
        else DecoderSession(model.manifest, provider=provider, device_cache=True)
    )
    host_session = DecoderSession(model.manifest, provider=provider, device_cache=False)
    ours_decode, ours_first = ours_ms(device_session)
    host_decode, host_first = ours_ms(host_session)
    one = _median_ms(lambda: _torch_greedy(reference, [PROMPT], 1), runs)
    many = _median_ms(lambda: _torch_greedy(reference, [PROMPT], new_tokens, exact_length=True), runs)
    torch_first = _median_ms(lambda: _torch_greedy(reference, [long], 1), runs)
    torch_decode = decode_ms_per_token(one / 1000, many / 1000, new_tokens)
    parity = f"{'exact' if exact else 'DIFFERS'} (leading equal tokens {matches} of {new_tokens})"
    return [
        {
            "system": f"gpt2-onnx {dtype}, KV on {provider}",
            "decode": ours_decode,
            "first": ours_first,
            "parity": parity,
        },
        {"system": f"gpt2-onnx {dtype}, KV via host", "decode": host_decode, "first": host_first, "parity": ""},
        {"system": f"PyTorch {dtype} generate", "decode": torch_decode, "first": torch_first, "parity": ""},
        {"exact": exact, "dtype": dtype},
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", choices=("tiny", "small", "medium"))
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,fp16")
    parser.add_argument("--out", default="/tmp/gpu_check")
    parser.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    import onnxruntime as ort

    if args.provider == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    import torch

    device = torch.cuda.get_device_name() if args.provider == "cuda" else "CPU"
    print(f"onnxruntime {ort.__version__} {ort.get_available_providers()}; torch {torch.__version__}; {device}")
    table, failures = [], []
    for dtype in args.dtypes.split(","):
        *rows, summary = check(dtype, args.shape, Path(args.out), args.new_tokens, args.runs, args.provider)
        table += rows
        if dtype == "fp32" and not summary["exact"]:
            failures.append(dtype)
    print(
        f"\nrandom GPT-2 {args.shape}, batch 1, {len(PROMPT)}-token prompt, {args.new_tokens} new tokens, greedy; "
        f"medians of {args.runs}"
    )
    print("| system | decode ms/token | first token after 512 (ms) | greedy vs PyTorch |")
    print("|---|---|---|---|")
    for row in table:
        print(f"| {row['system']} | {row['decode']:.2f} | {row['first']:.1f} | {row['parity']} |")
    if failures:
        print(f"gpu_check: greedy tokens differ from PyTorch for {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
