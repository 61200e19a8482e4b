"""benchmarks/int8_kernels.py times the int8 kernels it claims to: each computes x @ w within its quantisation
error, and the per-row MatMulInteger forms give every row the answer it gets alone, which DynamicQuantizeMatMul
does not."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import int8_kernels as kernels

RNG = np.random.default_rng(3)
WEIGHT = RNG.standard_normal((256, 96)).astype(np.float32) * 0.05
ROWS = RNG.standard_normal((4, 256)).astype(np.float32)


@pytest.mark.parametrize("kernel", list(kernels.KERNELS))
def test_each_kernel_multiplies_within_its_quantisation_error(kernel: str) -> None:
    (product,) = kernels.kernel_session(kernel, WEIGHT).run(None, {"x": ROWS})
    exact = ROWS @ WEIGHT
    assert product.shape == exact.shape
    assert np.abs(product - exact).max() < 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("kernel", ["MatMulInteger per row", "MatMulInteger per row and block"])
def test_a_per_row_kernel_gives_a_row_its_own_answer_whatever_the_other_rows(kernel: str) -> None:
    session = kernels.kernel_session(kernel, WEIGHT)
    alone = session.run(None, {"x": ROWS[:1]})[0]
    beside_a_large_row = session.run(None, {"x": np.concatenate([ROWS[:1], 50 * ROWS[1:]])})[0]
    np.testing.assert_array_equal(beside_a_large_row[:1], alone)


def test_dynamic_quantize_matmul_shares_one_scale_between_the_rows() -> None:
    session = kernels.kernel_session("DynamicQuantizeMatMul", WEIGHT)
    alone = session.run(None, {"x": ROWS[:1]})[0]
    beside_a_large_row = session.run(None, {"x": np.concatenate([ROWS[:1], 50 * ROWS[1:]])})[0]
    assert np.abs(beside_a_large_row[:1] - alone).max() > 0.01 * np.abs(alone).max()


def test_a_shape_must_be_inputs_x_outputs_with_whole_blocks() -> None:
    assert kernels._shape("768x3072") == (768, 3072)
    for bad in ("768", "100x10", "axb"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"INPUTSxOUTPUTS|multiple of 128"):
            kernels._shape(bad)
