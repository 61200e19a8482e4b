"""int8 matrix kernels of one projection, timed alone: which of them suits decode steps of many rows.

    python benchmarks/int8_kernels.py [--rows 1 4 8 16 32] [--shapes 768x3072 3072x768 768x50257] [--runs 50]

Each kernel multiplies activations [rows, inputs] by the same float weights [inputs, outputs], quantised its own way:
- MatMulNBits: 8-bit weights in blocks of 128 inputs, activations quantised to int8 per block at run time
  (accuracy_level 4): the decode kernel of int8 bundles;
- DynamicQuantizeMatMul: weights int8 per output column, activations uint8 per tensor (--fast-prefill's prompt
  kernel): onnxruntime's int8 GEMM, but one row's answer depends on every other row of the step;
- MatMulInteger per row: activations uint8 per row (max |x| / 127, zero point 128), the same per-column weights,
  an int32 product then scaled: exact integers, so no row's answer depends on another's;
- MatMulInteger per row and block: the same with one activation and weight scale per row and block of 128 inputs
  (MatMulNBits' precision), a product batched over the blocks and summed in float.
Prints one JSON line per measurement (median ms over --runs runs on one thread per physical core) and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from gpt2onnx.export.rounding import round_to_nearest
from gpt2onnx.runtime._ort import ort
from gpt2onnx.runtime.session import session_options

BLOCK = 128
CONTRIB = "com.microsoft"


def _column_levels(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """weight [inputs, outputs] as int8 levels with one scale per output column (max |w| / 127)."""
    scales = np.abs(weight).max(axis=0) / 127.0
    scales[scales == 0] = 1.0
    return np.clip(np.round(weight / scales), -127, 127).astype(np.int8), scales.astype(np.float32)


def _matmul_nbits(weight: np.ndarray) -> tuple[list, list]:
    inputs, outputs = weight.shape
    grid = round_to_nearest(weight.T, 8, BLOCK)
    node = helper.make_node(
        "MatMulNBits", ["x", "w", "s"], ["y"], domain=CONTRIB,
        K=inputs, N=outputs, bits=8, block_size=BLOCK, accuracy_level=4,
    )  # fmt: skip
    return [node], [numpy_helper.from_array(grid.levels, "w"), numpy_helper.from_array(grid.scales, "s")]


def _dynamic_quantize_matmul(weight: np.ndarray) -> tuple[list, list]:
    levels, scales = _column_levels(weight)
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], domain=CONTRIB)
    return [node], [numpy_helper.from_array(levels, "w"), numpy_helper.from_array(scales, "s")]


def _quantised_rows(x: str, axis: int) -> tuple[list, list]:
    """Nodes quantising x to uint8 q (zero point 128) with scale `x_scale` = max |x| / 127 along axis, kept."""
    n = helper.make_node
    nodes = [
        n("Abs", [x], ["x_abs"]),
        n("ReduceMax", ["x_abs"], ["x_max"], axes=[axis], keepdims=1),
        n("Div", ["x_max", "levels"], ["x_scale_raw"]),
        n("Max", ["x_scale_raw", "tiny"], ["x_scale"]),
        n("Div", [x, "x_scale"], ["x_scaled"]),
        n("Round", ["x_scaled"], ["x_rounded"]),
        n("Add", ["x_rounded", "zero_float"], ["x_shifted"]),
        n("Cast", ["x_shifted"], ["q"], to=TensorProto.UINT8),
    ]
    constants = [
        numpy_helper.from_array(np.array(127.0, np.float32), "levels"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "tiny"),
        numpy_helper.from_array(np.array(128.0, np.float32), "zero_float"),
        numpy_helper.from_array(np.array(128, np.uint8), "zero"),
    ]
    return nodes, constants


def _matmul_integer_rows(weight: np.ndarray) -> tuple[list, list]:
    levels, scales = _column_levels(weight)
    nodes, constants = _quantised_rows("x", axis=1)
    n = helper.make_node
    nodes += [
        n("MatMulInteger", ["q", "w", "zero"], ["product"]),
        n("Cast", ["product"], ["product_float"], to=TensorProto.FLOAT),
        n("Mul", ["product_float", "x_scale"], ["row_scaled"]),
        n("Mul", ["row_scaled", "s"], ["y"]),
    ]
    return nodes, [*constants, numpy_helper.from_array(levels, "w"), numpy_helper.from_array(scales, "s")]


def _matmul_integer_blocks(weight: np.ndarray) -> tuple[list, list]:
    inputs, outputs = weight.shape
    blocks = inputs // BLOCK
    per_block = weight.reshape(blocks, BLOCK, outputs)
    scales = np.abs(per_block).max(axis=1, keepdims=True) / 127.0  # [blocks, 1, outputs]
    scales[scales == 0] = 1.0
    levels = np.clip(np.round(per_block / scales), -127, 127).astype(np.int8)
    n = helper.make_node
    nodes = [
        n("Reshape", ["x", "block_shape"], ["x_blocks"]),  # [rows, blocks, BLOCK]
        n("Transpose", ["x_blocks"], ["x_by_block"], perm=[1, 0, 2]),  # [blocks, rows, BLOCK]
    ]
    quantise, constants = _quantised_rows("x_by_block", axis=2)
    nodes += [
        *quantise,
        n("MatMulInteger", ["q", "w", "zero"], ["product"]),  # [blocks, rows, outputs]
        n("Cast", ["product"], ["product_float"], to=TensorProto.FLOAT),
        n("Mul", ["x_scale", "s"], ["scale"]),
        n("Mul", ["product_float", "scale"], ["parts"]),
        n("ReduceSum", ["parts", "first_axis"], ["y"], keepdims=0),
    ]
    constants += [
        numpy_helper.from_array(np.array([0, blocks, BLOCK], np.int64), "block_shape"),
        numpy_helper.from_array(np.array([0], np.int64), "first_axis"),
        numpy_helper.from_array(levels, "w"),
        numpy_helper.from_array(scales.astype(np.float32), "s"),
    ]
    return nodes, constants


KERNELS: dict[str, Callable[[np.ndarray], tuple[list, list]]] = {
    "MatMulNBits": _matmul_nbits,
    "DynamicQuantizeMatMul": _dynamic_quantize_matmul,
    "MatMulInteger per row": _matmul_integer_rows,
    "MatMulInteger per row and block": _matmul_integer_blocks,
}


def kernel_model(kernel: str, weight: np.ndarray) -> ModelProto:
    """The one-kernel graph x [rows, inputs] -> y [rows, outputs] of `kernel` over weight [inputs, outputs]."""
    nodes, initializers = KERNELS[kernel](weight)
    inputs, outputs = weight.shape
    graph = helper.make_graph(
        nodes,
        "kernel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", outputs])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CONTRIB, 1)])
    model.ir_version = 8
    return model


def kernel_session(kernel: str, weight: np.ndarray):
    """An onnxruntime CPU session of kernel_model, with the decoder's session options."""
    model = kernel_model(kernel, weight).SerializeToString()
    return ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])


def kernel_ms(kernel: str, rows: int, inputs: int, outputs: int, runs: int = 50) -> float:
    """Median ms of one product of `rows` random rows through `kernel` over random weights [inputs, outputs]."""
    rng = np.random.default_rng(0)
    session = kernel_session(kernel, rng.standard_normal((inputs, outputs), dtype=np.float32) * 0.02)
    x = {"x": rng.standard_normal((rows, inputs), dtype=np.float32)}
    for _ in range(5):
        session.run(None, x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _shape(text: str) -> tuple[int, int]:
    try:
        inputs, outputs = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is INPUTSxOUTPUTS, like 768x3072; got {text!r}") from None
    if inputs % BLOCK or outputs < 1:
        raise argparse.ArgumentTypeError(f"{text}: the inputs must be a multiple of {BLOCK}")
    return inputs, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument(
        "--shapes", type=_shape, nargs="+", default=[(768, 3072), (3072, 768), (768, 50257)],
        help="INPUTSxOUTPUTS of the weights (default GPT-2 small's c_fc, mlp c_proj and lm_head)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=50, help="timed runs per measurement (default 50)")
    args = parser.parse_args()
    table = ["| weights | rows | " + " | ".join(f"{k} ms" for k in KERNELS) + " |", "|---|---|" + "---|" * len(KERNELS)]
    for inputs, outputs in args.shapes:
        for rows in args.rows:
            times = {kernel: kernel_ms(kernel, rows, inputs, outputs, args.runs) for kernel in KERNELS}
            print(json.dumps({"inputs": inputs, "outputs": outputs, "rows": rows, "ms": times}), flush=True)
            table.append(f"| {inputs}x{outputs} | {rows} | " + " | ".join(f"{t:.3f}" for t in times.values()) + " |")
    print("\n".join(table))


if __name__ == "__main__":
    main()
