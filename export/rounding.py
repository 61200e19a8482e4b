"""Weights on MatMulNBits' grid: blocks of inputs with a scale each, rounded to nearest or by GPTQ.

A matrix [rows, inputs] (MatMulNBits' N x K) is cut into blocks of block_size inputs per row (the last zero-padded).
8 bits, symmetric: scale max|w| / 127 per block, stored byte round(w / scale) + 128 (the op's implied zero point).
4 bits, asymmetric: the block's range [min(w, 0), max(w, 0)] in 15 steps and a zero point per block (measured on the
stress checkpoint: KL 0.18 against 0.21 for symmetric llama.cpp-q4_0-style blocks, at the same speed).

GPTQ (Frantar et al., ICLR 2023) rounds one input column at a time and moves each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian of the projection's inputs (X^T X on calibration text), so
that the product x @ w rather than each weight stays close: the error goes where the inputs do not look.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROUNDINGS = ("gptq", "nearest")  # export-gpt2 --rounding: how the projections' weights reach their levels
# Measured on the stress checkpoint's sample text (GPT-2 small; benchmarks/README.md, "Quantisation quality"): int4
# KL 0.136 -> 0.038 and top-1 72.9% -> 85.5% by GPTQ; int8 KL 0.0028 -> 0.0022 but top-1 96.9% -> 96.6%, for about
# 100 s more export on one core: not worth it.
# GPTQ's act-order (columns rounded from the largest Hessian diagonal down, each on its block's scale from the weights
# as given) measured on the same checkpoint: int4 top-1 85.5% -> 85.8%, KL 0.038 -> 0.036; not kept.
DEFAULT_ROUNDING = {"int8": "nearest", "int4": "gptq"}
ZERO_8BIT = 128  # MatMulNBits' implied zero point for 8 bits
GPTQ_DAMPING = 0.01  # added to the Hessian's diagonal, as a share of its mean (the paper's default)
GPTQ_BATCH = 128  # columns rounded between two updates of the rest of the matrix (the paper's lazy batch)


@dataclass(frozen=True)
class BlockLevels:
    """A matrix on the grid: levels [rows, blocks, block_size] as stored (uint8), scales [rows, blocks] (float32),
    zero points [rows, blocks] (uint8, 4 bits only)."""

    levels: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    bits: int
    block_size: int

    def dequantized(self) -> np.ndarray:
        """The float matrix [rows, blocks * block_size] the levels stand for (padding columns included)."""
        zeros = np.float32(ZERO_8BIT) if self.zeros is None else self.zeros[:, :, None].astype(np.float32)
        values = (self.levels.astype(np.float32) - zeros) * self.scales[:, :, None]
        return values.reshape(self.levels.shape[0], -1)


def _grid(block: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and, 4 bits, zero points) of blocks [..., block_size]."""
    if bits == 8:
        scales = np.abs(block).max(axis=-1) / 127.0
        scales[scales == 0] = 1.0
        return scales.astype(np.float32), None
    low, high = np.minimum(block.min(axis=-1), 0.0), np.maximum(block.max(axis=-1), 0.0)
    scales = ((high - low) / 15.0).astype(np.float32)
    scales[scales == 0] = 1.0
    return scales, np.clip(np.round(-low / scales), 0, 15).astype(np.uint8)


def _levels(values: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int) -> np.ndarray:
    """Stored levels of values on the grid of scales (and zeros), element for element."""
    if bits == 8:
        return (np.clip(np.round(values / scales), -127, 127) + ZERO_8BIT).astype(np.uint8)
    return np.clip(np.round(values / scales) + zeros, 0, 15).astype(np.uint8)


def _padded(matrix: np.ndarray, block_size: int) -> np.ndarray:
    rows, columns = matrix.shape
    padded = np.zeros((rows, -(-columns // block_size) * block_size), np.float32)
    padded[:, :columns] = matrix
    return padded


def round_to_nearest(matrix: np.ndarray, bits: int, block_size: int) -> BlockLevels:
    """matrix [rows, inputs] with every weight rounded to its block's nearest level."""
    blocks = _padded(matrix, block_size).reshape(matrix.shape[0], -1, block_size)
    scales, zeros = _grid(blocks, bits)
    levels = _levels(blocks, scales[:, :, None], None if zeros is None else zeros[:, :, None], bits)
    return BlockLevels(levels, scales, zeros, bits, block_size)


def _inverse_hessian_factor(hessian: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U) after damping, as GPTQ's updates read it."""
    damped = hessian + GPTQ_DAMPING * np.mean(np.diag(hessian)) * np.eye(len(hessian))
    return np.linalg.cholesky(np.linalg.inv(damped)).T


def gptq(matrix: np.ndarray, hessian: np.ndarray, bits: int, block_size: int) -> BlockLevels:
    """matrix [rows, inputs] rounded by GPTQ against hessian [inputs, inputs] (X^T X of the inputs; inputs that
    never vary, all-zero rows and columns, are rounded to nearest and left out of the updates).

    Each block's scale comes from the weights as they are when its first column is reached (updated by the
    errors of the columns before), as GPTQ does with groups."""
    rows, columns = matrix.shape
    weights = _padded(matrix, block_size).astype(np.float64)
    width = weights.shape[1]
    h = np.zeros((width, width))
    h[:columns, :columns] = hessian
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    factor = _inverse_hessian_factor(h)  # block-diagonal around dead inputs: their errors go nowhere, none come in
    blocks = width // block_size
    levels = np.empty((rows, width), np.uint8)
    scales = np.empty((rows, blocks), np.float32)
    zeros = np.empty((rows, blocks), np.uint8) if bits == 4 else None
    batch = max(GPTQ_BATCH // block_size, 1) * block_size
    for start in range(0, width, batch):
        end = min(start + batch, width)
        part, errors, local = weights[:, start:end].copy(), np.zeros((rows, end - start)), factor[start:end, start:end]
        for j in range(end - start):
            column = start + j
            block = column // block_size
            if column % block_size == 0:
                scales[:, block], grid_zeros = _grid(part[:, j : j + block_size], bits)
                if zeros is not None:
                    zeros[:, block] = grid_zeros
            scale = scales[:, block].astype(np.float64)
            zero = None if zeros is None else zeros[:, block].astype(np.float64)
            levels[:, column] = _levels(part[:, j], scale, zero, bits)
            rounded = (levels[:, column].astype(np.float64) - (ZERO_8BIT if zero is None else zero)) * scale
            errors[:, j] = (part[:, j] - rounded) / local[j, j]
            part[:, j:] -= np.outer(errors[:, j], local[j, j:])
        weights[:, end:] -= errors @ factor[start:end, end:]
    return BlockLevels(levels.reshape(rows, blocks, block_size), scales, zeros, bits, block_size)
