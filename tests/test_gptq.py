"""GPTQ rounding (export-gpt2 --rounding gptq, export/rounding.py): its levels lie on MatMulNBits' grid, the product
x @ w stays closer to fp32 than rounding to nearest on the inputs it was calibrated on and on others, the graph
stores the levels given, and the export records how it rounded and refuses the flag out of place."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

from gpt2onnx.cli.export_command import main as export_main
from gpt2onnx.export import validate
from gpt2onnx.export.calibrate import calibration_ids, input_hessians, sample_ids
from gpt2onnx.export.checkpoint import random_checkpoint
from gpt2onnx.export.exporter import export_bundle
from gpt2onnx.export.graph import _Builder
from gpt2onnx.export.rounding import BlockLevels, gptq, round_to_nearest
from gpt2onnx.runtime.errors import ExportError
from gpt2onnx.runtime.tokenizer import GPT2_TOKENIZER

ROWS, WIDTH = 48, 96


def _inputs(seed: int, count: int) -> np.ndarray:
    """Correlated inputs with one large channel, as a projection after a LayerNorm with a large gain sees them."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(100).normal(size=(WIDTH, WIDTH))
    x = rng.normal(size=(count, WIDTH)) @ mixing * 0.1
    x[:, 3] *= 20.0
    return x


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 0.02, size=(ROWS, WIDTH)).astype(np.float32)


def _output_error(x: np.ndarray, matrix: np.ndarray, levels: BlockLevels) -> float:
    return float(np.linalg.norm(x @ (matrix - levels.dequantized()[:, :WIDTH]).T))


@pytest.mark.parametrize(("bits", "block_size"), [(4, 32), (8, 32), (8, 64)])
def test_gptq_keeps_the_product_closer_than_rounding_to_nearest(matrix: np.ndarray, bits: int, block_size: int) -> None:
    calibration, held_out = _inputs(1, 2000), _inputs(2, 2000)
    rounded = gptq(matrix, calibration.T @ calibration, bits, block_size)
    nearest = round_to_nearest(matrix, bits, block_size)
    for x in (calibration, held_out):
        assert _output_error(x, matrix, rounded) < 0.7 * _output_error(x, matrix, nearest)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_levels_lie_on_the_grid(matrix: np.ndarray, bits: int) -> None:
    x = _inputs(1, 500)
    hessian = x.T @ x
    hessian[10, :] = hessian[:, 10] = 0.0  # an input that is always zero: its weights round to nearest, alone
    rounded = gptq(matrix, hessian, bits, 32)
    assert rounded.levels.shape == (ROWS, 3, 32) and rounded.levels.dtype == np.uint8
    assert rounded.scales.shape == (ROWS, 3) and np.all(rounded.scales > 0)
    if bits == 4:
        assert rounded.levels.max() <= 15 and rounded.zeros.max() <= 15
    else:
        assert rounded.zeros is None and rounded.levels.min() >= 1  # -127..127 around 128
    nearest = round_to_nearest(matrix, bits, 32)
    np.testing.assert_array_equal(rounded.levels[:, 0, 10], nearest.levels[:, 0, 10])


def test_the_graph_stores_the_levels_given_and_rounds_the_rest_to_nearest(matrix: np.ndarray) -> None:
    x = _inputs(1, 500)
    rounded = gptq(matrix, x.T @ x, 4, 32)
    b = _Builder("float32", bits=4, block_size=32, rounded={"given": rounded})
    stored_weights = {name: b.quantized(name, matrix, 4, size) for name, size in (("given", 32), ("plain", 64))}
    stored = {tensor.name: numpy_helper.to_array(tensor) for tensor in b.initializers}

    def levels(name: str) -> np.ndarray:
        packed = stored[stored_weights[name].data]
        return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1)

    np.testing.assert_array_equal(levels("given"), rounded.levels)
    np.testing.assert_array_equal(levels("plain"), round_to_nearest(matrix, 4, 64).levels)
    assert stored_weights["plain"].block_size == 64


def test_the_graph_refuses_levels_of_other_bits_than_the_projection_takes(matrix: np.ndarray) -> None:
    x = _inputs(1, 500)
    b = _Builder("float32", bits=4, block_size=32, rounded={"given": gptq(matrix, x.T @ x, 8, 32)})
    with pytest.raises(ExportError, match="given: its levels were rounded to 8 bits, and the graph stores 4"):
        b.quantized("given", matrix, 4)


def test_input_hessians_cover_every_projection_in_passes() -> None:
    model = random_checkpoint("tiny", 0).model
    ids = calibration_ids(GPT2_TOKENIZER, 50257, seed=0)
    assert len(ids) > 1024 and not np.array_equal(ids[:100], sample_ids(GPT2_TOKENIZER, 50257, seed=0)[:100])
    hessians = dict(input_hessians(model, ids))
    layers = model.config.n_layer
    assert len(hessians) == 4 * layers
    inner = model.transformer.h[0].mlp.c_proj.weight.shape[0]
    assert hessians["transformer.h.0.mlp.c_proj.weight"].shape == (inner, inner)
    hessian = hessians["transformer.h.0.attn.c_attn.weight"]
    np.testing.assert_allclose(hessian, hessian.T, rtol=1e-5, atol=1e-6)
    assert np.all(np.linalg.eigvalsh(hessian) > -1e-6 * np.abs(hessian).max())


def _sample_text_figures(folder: Path) -> dict:
    return json.loads((folder / "bundle.json").read_text())["validation"]["sample_text"]


@pytest.mark.filterwarnings("ignore:int4 weights fall below the quality floors")  # top-1 85.5% < 90%
def test_int4_by_gptq_meets_the_kl_floor_on_the_stress_checkpoint(tmp_path: Path) -> None:
    """GPT-2 small's stress checkpoint: rounded to nearest, int4 is at KL 0.136 and top-1 72.9% on the sample text;
    by GPTQ (int4's default) measured KL 0.038 and top-1 85.5%. The sample text is not the calibration text, so
    these figures are held out."""
    folder = export_bundle(output=tmp_path / "gptq", random_init="small", outliers=True, quantize="int4")
    quantization = json.loads((folder / "bundle.json").read_text())["graph"]["quantization"]
    assert quantization["rounding"]["method"] == "gptq"
    assert "calibration_text.txt" in quantization["rounding"]["calibration"]
    figures = _sample_text_figures(folder)
    assert figures["kl_divergence"] <= validate.FLOORS["int4"]["kl_divergence"] / 2
    assert figures["top1_agreement"] >= 0.8


def test_int8_rounds_to_nearest_unless_told(tmp_path: Path) -> None:
    plain = export_bundle(output=tmp_path / "nearest", random_init="tiny", quantize="int8")
    rounded = export_bundle(output=tmp_path / "gptq", random_init="tiny", quantize="int8", rounding="gptq")
    methods = [
        json.loads((folder / "bundle.json").read_text())["graph"]["quantization"]["rounding"]["method"]
        for folder in (plain, rounded)
    ]
    assert methods == ["nearest", "gptq"]
    assert _sample_text_figures(rounded)["max_logits_diff"] != _sample_text_figures(plain)["max_logits_diff"]


def test_cli_refuses_rounding_without_quantize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main(["--random-init", "tiny", "--rounding", "gptq", "--output", str(tmp_path / "b")]) == 2
    message = "--rounding sets how quantised weights are rounded; add --quantize int8 or int4"
    assert message in capsys.readouterr().err and not (tmp_path / "b").exists()
