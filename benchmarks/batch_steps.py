"""What one decode step of many rows costs: the numbers behind gpt2-serve's --max-batch default.

    python benchmarks/batch_steps.py BUNDLE [BUNDLE ...] [--rows 1 4 8 16 32] [--steps 30] [--past 40]

For each bundle and row count: a DecodeBatch of that many rows (each a generator that has prefilled a prompt of
--past tokens), timed over --steps steps after two warm-up steps (median ms per step), with tokens/s = rows / step
time and the step's cost relative to one row's. Prints one JSON line per measurement and a table. The int8
kernels of such a step are timed alone by benchmarks/int8_kernels.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import gpt2onnx
from gpt2onnx.runtime.batching import DecodeBatch


def step_ms(model, rows: int, steps: int, past: int) -> float:
    """Median wall ms of one DecodeBatch step of `rows` rows."""
    batch = DecodeBatch(model.session, max_rows=rows)
    rng = np.random.default_rng(0)
    for _ in range(rows):
        generator = model.generator(max_new_tokens=steps + 3, min_new_tokens=steps + 3)
        generator.append_tokens(rng.integers(0, model.manifest.architecture.vocab_size - 1, past).tolist())
        generator.generate_next_token()
        batch.join(generator)
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        batch.step()
        if step >= 2:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--past", type=int, default=40, help="prompt tokens of every row (default 40)")
    args = parser.parse_args()
    table = ["| bundle | rows | ms/step | tokens/s | step cost / one row's |", "|---|---|---|---|---|"]
    for folder in args.bundles:
        model = gpt2onnx.load(folder, provider="cpu")
        one = None
        for rows in args.rows:
            ms = step_ms(model, rows, args.steps, args.past)
            one = one or ms * (1 if rows == 1 else float("nan"))
            result = {"bundle": folder, "rows": rows, "ms_per_step": ms, "tokens_per_s": rows * 1000 / ms}
            print(json.dumps(result), flush=True)
            table.append(f"| {folder} | {rows} | {ms:.1f} | {rows * 1000 / ms:.0f} | {ms / one:.2f}x |")
    print("\n".join(table))


if __name__ == "__main__":
    main()
