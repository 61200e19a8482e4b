"""What one decode step of many rows costs: the numbers behind gpt2-serve's --max-batch default.

    python benchmarks/batch_steps.py BUNDLE [BUNDLE ...] [--rows 1 4 8 16 32] [--steps 30] [--past 40] [--kernels]

For each bundle and row count: a DecodeBatch of that many rows (each a generator that has prefilled a prompt of
--past tokens), timed over --steps steps after two warm-up steps (median ms per step), with tokens/s = rows / step
time and the step's cost relative to one row's. --kernels also times GPT-2-small's MLP matrix (768 x 3072) alone
for the same row counts with MatMulNBits (int8 blocks of 128, the decode kernel) and DynamicQuantizeMatMul (int8
per column, --fast-prefill's prompt kernel), to see which kernel suits many-row steps. Prints one JSON line per
measurement and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import gpt2onnx
from gpt2onnx.runtime.batching import DecodeBatch
from gpt2onnx.runtime.session import session_options


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


def kernel_ms(op: str, rows: int, runs: int = 50, inputs: int = 768, outputs: int = 3072) -> float:
    """Median ms of an int8 product [rows, inputs] x [inputs, outputs]: MatMulNBits or DynamicQuantizeMatMul."""
    from onnx import TensorProto, helper, numpy_helper

    from gpt2onnx.runtime._ort import ort

    rng = np.random.default_rng(0)
    if op == "MatMulNBits":
        block = 128
        data = rng.integers(0, 255, (outputs, inputs // block, block), dtype=np.uint8)
        weights = [
            numpy_helper.from_array(data, "w"),
            numpy_helper.from_array(rng.random((outputs, inputs // block), dtype=np.float32) / 100, "s"),
        ]
        node = helper.make_node(
            op,
            ["x", "w", "s"],
            ["y"],
            domain="com.microsoft",
            K=inputs,
            N=outputs,
            bits=8,
            block_size=block,
            accuracy_level=4,
        )
    else:
        weights = [
            numpy_helper.from_array(rng.integers(-127, 127, (inputs, outputs), dtype=np.int8), "w"),
            numpy_helper.from_array(rng.random(outputs, dtype=np.float32) / 100, "s"),
        ]
        node = helper.make_node(op, ["x", "w", "s"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "kernel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", outputs])],
        weights,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((rows, inputs), dtype=np.float32)
    for _ in range(5):
        session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--past", type=int, default=40, help="prompt tokens of every row (default 40)")
    parser.add_argument("--kernels", action="store_true", help="also time the two int8 matrix kernels alone")
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
    if args.kernels:
        table += ["", "| rows | MatMulNBits ms | DynamicQuantizeMatMul ms |", "|---|---|---|"]
        for rows in args.rows:
            blocks, columns = kernel_ms("MatMulNBits", rows), kernel_ms("DynamicQuantizeMatMul", rows)
            print(json.dumps({"rows": rows, "MatMulNBits_ms": blocks, "DynamicQuantizeMatMul_ms": columns}), flush=True)
            table.append(f"| {rows} | {blocks:.3f} | {columns:.3f} |")
    print("\n".join(table))


if __name__ == "__main__":
    main()
