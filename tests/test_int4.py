"""int4 weights (export-gpt2 --quantize int4): the packed blocks, their zero points and the embedding's unpacking
are exact; MatMulNBits over them computes x @ the dequantised weights; the blocks named by --int8-layers keep 8
bits; the export warns below the int4 floors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpt2onnx.cli.export_command import main as export_main
from gpt2onnx.export import validate
from gpt2onnx.export.exporter import export_bundle
from gpt2onnx.export.graph import CONTRIB, OPSET, QuantizedWeight, _Builder, _dequantized_rows
from gpt2onnx.runtime.errors import InvalidInputError

ROWS, WIDTH, BLOCK = 6, 80, 32  # 80 inputs: 3 blocks of 32 (an odd count, the last zero-padded)


def _run(b: _Builder, inputs: list, output: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    graph = helper.make_graph(
        b.nodes, "test", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], b.initializers
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(CONTRIB, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], feed)[0]


def _dequantised_by_numpy(b: _Builder, weight: QuantizedWeight) -> np.ndarray:
    """(level - zero point) * scale from the stored initializers, unpacked independently of the graph's nodes."""
    stored = {tensor.name: numpy_helper.to_array(tensor) for tensor in b.initializers}
    packed, scales, zeros = stored[weight.data], stored[weight.scales], stored[weight.zero_points]
    levels = np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1).astype(np.float32)
    zero_levels = np.stack([zeros & 15, zeros >> 4], axis=-1).reshape(len(zeros), -1)[:, : scales.shape[1]]
    return ((levels - zero_levels[:, :, None]) * scales[:, :, None]).reshape(len(packed), -1)[:, :WIDTH]


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = rng.normal(0.0, 0.02, size=(ROWS, WIDTH)).astype(np.float32)
    values[1, :BLOCK] = np.abs(values[1, :BLOCK])  # a block of positive values only: its range starts at 0
    values[2, BLOCK : 2 * BLOCK] = 0.0  # an all-zero block
    return values


def test_int4_blocks_round_trip_within_half_a_step(matrix: np.ndarray) -> None:
    b = _Builder("float32", bits=4, block_size=BLOCK)
    weight = b.quantized("w", matrix, 4)
    assert (weight.bits, weight.block_size) == (4, BLOCK)
    stored = {tensor.name: numpy_helper.to_array(tensor) for tensor in b.initializers}
    assert stored[weight.data].shape == (ROWS, 3, BLOCK // 2) and stored[weight.data].dtype == np.uint8
    assert stored[weight.zero_points].shape == (ROWS, 2)  # 3 zero points, two a byte
    dequantised = _dequantised_by_numpy(b, weight)
    steps = np.repeat(stored[weight.scales], BLOCK, axis=1)[:, :WIDTH]
    assert np.all(np.abs(dequantised - matrix) <= steps / 2 + 1e-7)
    assert np.all(dequantised[2, BLOCK : 2 * BLOCK] == 0.0)


def test_embedding_rows_unpack_exactly(matrix: np.ndarray) -> None:
    """The graph's Gather + nibble unpacking gives the same floats as numpy's unpacking of the stored bytes."""
    b = _Builder("float32", bits=4, block_size=BLOCK)
    weight = b.quantized("w", matrix, 4)
    rows = _dequantized_rows(b, weight, "ids", WIDTH)
    ids = np.array([[0, 2, 5], [1, 1, 3]], np.int64)
    got = _run(b, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])], rows, {"ids": ids})
    np.testing.assert_array_equal(got, _dequantised_by_numpy(b, weight)[ids])


def test_int4_matmul_computes_x_times_the_dequantised_weights(matrix: np.ndarray) -> None:
    b = _Builder("float32", bits=4, block_size=BLOCK)
    weight = b.quantized("w", matrix, 4)
    bias = b.weight("bias", np.linspace(-1, 1, ROWS, dtype=np.float32))
    product = b.project_blocks("x", weight, WIDTH, ROWS, bias=bias)
    x = np.random.default_rng(1).normal(size=(1, 4, WIDTH)).astype(np.float32)
    got = _run(b, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, WIDTH])], product, {"x": x})
    expected = x @ _dequantised_by_numpy(b, weight).T + np.linspace(-1, 1, ROWS, dtype=np.float32)
    # int8 activations (accuracy_level 4) round x to 255 levels per block: about 0.5% of the product's scale.
    np.testing.assert_allclose(got, expected, atol=0.01 * np.abs(expected).max())


def test_int4_export_warns_below_its_floors_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(validate.FLOORS, "int4", {"top1_agreement": 1.0, "kl_divergence": 0.0})
    with pytest.warns(
        UserWarning,
        match=r"int4 weights fall below the quality floors on the sample text: top-1 "
        r"agreement .*% < 100%.*; --head-bits 8 or more blocks in --int8-layers or a smaller --block-size or "
        r"--quantize int8 would keep more precision",
    ):
        folder = export_bundle(output=tmp_path / "b", random_init="tiny", quantize="int4", head_bits=4)
    sample_text = json.loads((folder / "bundle.json").read_text())["validation"]["sample_text"]
    assert sample_text["floors"] == {"top1_agreement": 1.0, "kl_divergence": 0.0}
    assert sample_text["kl_divergence"] > 0.0 and sample_text["top1_agreement"] < 1.0


def _projection_bits(folder: Path) -> dict[tuple[int, str], int]:
    """(block, projection) -> the bits of its MatMulNBits node, read off the graph."""
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    found = {}
    for node in (node for node in graph.node if node.op_type == "MatMulNBits"):
        weight = re.match(r"transformer\.h\.(\d+)\.(\w+\.c_\w+)\.weight\.int[48]$", node.input[1])
        if weight:
            bits = next(attribute.i for attribute in node.attribute if attribute.name == "bits")
            found[int(weight.group(1)), weight.group(2)] = bits
    return found


@pytest.mark.filterwarnings("ignore:int4 weights fall below the quality floors:UserWarning")
@pytest.mark.parametrize(
    ("int8_layers", "eight_bit_blocks", "rounding"),
    [(None, {0}, "gptq"), ([], set(), "gptq"), ([1, 0], {0, 1}, "gptq"), (None, {0}, "nearest")],
)
def test_the_blocks_of_int8_layers_keep_8_bits(
    tmp_path: Path, int8_layers, eight_bit_blocks: set[int], rounding: str
) -> None:
    """By default the first block's projections stay at 8 bits, the others take 4; none keeps every block at 4;
    rounded by GPTQ (int4's default) or to nearest."""
    options = {"quantize": "int4", "int8_layers": int8_layers, "rounding": rounding}
    folder = export_bundle(output=tmp_path / "b", random_init="tiny", **options)
    bits = _projection_bits(folder)
    assert len(bits) == 2 * 4, "every attention and MLP projection of both blocks is a MatMulNBits node"
    assert bits == {(block, name): 8 if block in eight_bit_blocks else 4 for block, name in bits}
    record = json.loads((folder / "bundle.json").read_text())["graph"]["quantization"]["int8_layers"]
    assert record["blocks"] == sorted(eight_bit_blocks)


def test_int8_layers_past_the_last_block_are_refused(tmp_path: Path) -> None:
    message = "--int8-layers 2 is not a block of this model: it has 2 blocks, 0 to 1"
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        export_bundle(output=tmp_path / "b", random_init="tiny", quantize="int4", int8_layers=[0, 2])
    assert not list(tmp_path.iterdir()), "nothing is left behind"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0,x", "argument --int8-layers: '0,x' is not a comma-separated list of block indices or none"),
        ("-1", "argument --int8-layers: '-1': block indices start at 0"),
    ],
)
def test_the_cli_refuses_bad_int8_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    argv = ["--random-init", "tiny", "--quantize", "int4", "--int8-layers", value, "--output", str(tmp_path / "b")]
    with pytest.raises(SystemExit) as exit_:
        export_main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"export-gpt2: error: {message}")
    assert not list(tmp_path.iterdir())
