"""The key/value cache of a decoder session: one type per kind, chosen once by the session.

- PreallocatedCache: one numpy buffer per layer's keys and values, [batch, n_head, capacity, head_dim], of which the
  first `length` positions are written; the graph writes each step's positions into it in place (GroupQueryAttention).
  It grows (a copy into larger buffers) when a step needs more room.
- HostCache: numpy arrays [batch, n_head, length, head_dim] that the graph returns as past + the new positions.
- DeviceCache: the same as OrtValues on the provider's device (CUDA), reordered there by a small Gather session.

Every kind answers the same calls: `length`, `select(rows)` (a new cache of those rows), `reorder(rows)` (rows follow
their parents, in place where it can: beams), `truncate(length)` (rewind) and `row(i)` (row i alone, sharing memory
where it can: a batch-1 step inside a batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._ort import ort
from ._proto import gather_model


class DeviceGather:
    """Gathers the cache tensors living on the provider's device along one axis (rows: beams; positions: rewind),
    on that device (one small Gather graph per axis)."""

    def __init__(self, count: int, dtype: type, providers: list[Any], device: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        self.device = device
        self.sessions = {
            axis: ort.InferenceSession(gather_model(count, dtype, axis), options, providers=providers)
            for axis in (0, 2)
        }
        self._inputs = [node.name for node in self.sessions[0].get_inputs()][1:]
        self._outputs = [node.name for node in self.sessions[0].get_outputs()]

    def __call__(self, tensors: list[Any], indices: np.ndarray, axis: int) -> list[Any]:
        session = self.sessions[axis]
        binding = session.io_binding()
        binding.bind_cpu_input("indices", np.ascontiguousarray(indices, dtype=np.int64))
        for name, tensor in zip(self._inputs, tensors, strict=True):
            binding.bind_ortvalue_input(name, tensor)
        for name in self._outputs:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()


@dataclass
class PreallocatedCache:
    """Buffers [batch, n_head, capacity, head_dim] per layer's keys and values; the first `length` positions hold
    the past. `binding` is the session's IO binding of these buffers (made on the first step, kept for all)."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    length: int = 0
    binding: Any = field(default=None, repr=False, compare=False)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def tensors(self) -> list[np.ndarray]:
        """key 0, value 0, key 1, value 1, ...: the order of the graph's past inputs."""
        return _interleave(self.keys, self.values)

    def ensure_capacity(self, total: int, limit: int) -> None:
        """Room for `total` positions: larger buffers (double, at most `limit`) with the past copied in."""
        if total <= self.capacity:
            return
        capacity = min(max(total, 2 * self.capacity), max(limit, total))
        self.keys = [_resized(buffer, capacity, self.length) for buffer in self.keys]
        self.values = [_resized(buffer, capacity, self.length) for buffer in self.values]
        self.binding = None

    def select(self, rows: np.ndarray) -> PreallocatedCache:
        rows = np.asarray(rows, dtype=np.int64)
        return PreallocatedCache(
            [_rows_of_buffer(k, rows, self.length) for k in self.keys],
            [_rows_of_buffer(v, rows, self.length) for v in self.values],
            self.length,
        )

    def reorder(self, rows: np.ndarray) -> PreallocatedCache:
        """Only the rows of beams that moved are overwritten, in place (the buffers stay bound)."""
        moved = np.flatnonzero(rows != np.arange(len(rows)))
        if moved.size:
            sources, end = rows[moved], self.length
            for tensor in self.tensors:
                tensor[moved, :, :end] = tensor[sources, :, :end]  # the right side is gathered first: overlaps are safe
        return self

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)  # later steps overwrite the positions beyond

    def row(self, index: int) -> PreallocatedCache:
        """Row `index` alone, as views of these buffers: a step run on it writes into this cache's row."""
        view = slice(index, index + 1)
        return PreallocatedCache([k[view] for k in self.keys], [v[view] for v in self.values], self.length)


@dataclass
class HostCache:
    """Numpy arrays [batch, n_head, length, head_dim] per layer: the graph returns past + new positions each step."""

    keys: list[np.ndarray]
    values: list[np.ndarray]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def tensors(self) -> list[np.ndarray]:
        return _interleave(self.keys, self.values)

    def select(self, rows: np.ndarray) -> HostCache:
        rows = np.asarray(rows, dtype=np.int64)
        return HostCache([np.take(k, rows, axis=0) for k in self.keys], [np.take(v, rows, axis=0) for v in self.values])

    def reorder(self, rows: np.ndarray) -> HostCache:
        moved = np.flatnonzero(rows != np.arange(len(rows)))
        if moved.size:
            for tensor in self.tensors:
                tensor[moved] = tensor[rows[moved]]
        return self

    def truncate(self, length: int) -> None:
        self.keys = [np.ascontiguousarray(k[:, :, :length]) for k in self.keys]
        self.values = [np.ascontiguousarray(v[:, :, :length]) for v in self.values]

    def row(self, index: int) -> HostCache:
        view = slice(index, index + 1)
        return HostCache([k[view] for k in self.keys], [v[view] for v in self.values])


@dataclass
class DeviceCache:
    """OrtValues [batch, n_head, length, head_dim] on the provider's device; reordered and cut there."""

    keys: list[Any]
    values: list[Any]
    gather: DeviceGather = field(repr=False, compare=False)

    @property
    def length(self) -> int:
        first = self.keys[0]
        return (first.shape() if callable(getattr(first, "shape", None)) else first.shape)[2]

    @property
    def tensors(self) -> list[Any]:
        return _interleave(self.keys, self.values)

    def _gathered(self, indices: np.ndarray, axis: int) -> DeviceCache:
        if all(isinstance(tensor, np.ndarray) for tensor in self.tensors):  # the empty cache before the first step
            gathered = [np.take(tensor, indices, axis=axis) for tensor in self.tensors]
        else:
            gathered = self.gather(self.tensors, indices, axis)
        return DeviceCache(gathered[0::2], gathered[1::2], self.gather)

    def select(self, rows: np.ndarray) -> DeviceCache:
        return self._gathered(np.asarray(rows, dtype=np.int64), axis=0)

    def reorder(self, rows: np.ndarray) -> DeviceCache:
        return self if np.array_equal(rows, np.arange(len(rows))) else self.select(rows)

    def truncate(self, length: int) -> None:
        cut = self._gathered(np.arange(length), axis=2)
        self.keys, self.values = cut.keys, cut.values

    def row(self, index: int) -> DeviceCache:
        return self.select(np.array([index]))


KVCache = PreallocatedCache | HostCache | DeviceCache


def _interleave(keys: list[Any], values: list[Any]) -> list[Any]:
    return [tensor for pair in zip(keys, values, strict=True) for tensor in pair]


def _rows_of_buffer(buffer: np.ndarray, rows: np.ndarray, filled: int) -> np.ndarray:
    """A new buffer of the same capacity holding the given rows' first `filled` positions (the rest zero)."""
    picked = np.zeros((len(rows), *buffer.shape[1:]), buffer.dtype)
    picked[:, :, :filled] = buffer[rows, :, :filled]
    return picked


def _resized(buffer: np.ndarray, capacity: int, filled: int) -> np.ndarray:
    grown = np.zeros((*buffer.shape[:2], capacity, buffer.shape[3]), buffer.dtype)
    grown[:, :, :filled] = buffer[:, :, :filled]
    return grown
