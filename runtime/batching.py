"""Continuous batching: the rows of many Generators decoded together, one model step for all.

A generator joins after its own prefill and first token (Generator.hand_over gives its cache to the batch) and its
rows leave as soon as they end; each generator keeps its own options, random stream, stop strings and records, and
chooses from its rows' logits (Generator.advance). Only the model step is shared: a step of 16 rows costs far less
than 16 steps of one row, since a step is mostly reading the weights.

Two layouts. Ragged (a preallocated cache whose graph takes rows of different lengths, bundle.json
graph.ragged_rows): each row keeps its keys in columns [0, length), as it would alone, and each step writes every
row's next token at its own column `length` (GroupQueryAttention's per-row seqlens_k, the mask's last 1). Every row
then computes bitwise what it computes alone, whatever else is in the batch (measured: a row's logits differ by up
to 2e-6 when its keys are shifted by a number of columns that is not a multiple of 8, the kernels' vector width).
Aligned (growing caches, and older bundles): every row has the same number of columns, `width`, and each step
writes column `width` of every row; a joining row's past is right-aligned into the columns it shares with the
others, masked before it; a row longer than the batch widens it, the others masked over the new columns. Its
positions count its own tokens, so it computes what it would alone, up to that rounding. When the width reaches the
context, each row's columns are packed to the right (compact). In both, free rows are filled from the end, so the
rows that run are always the first `rows` of the buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .cache import DeviceCache, HostCache, KVCache, PreallocatedCache
from .errors import InvalidInputError
from .generator import Generator
from .session import DecoderSession


@dataclass
class _Row:
    """Which generator and which of its rows a batch row holds."""

    generator: Generator
    index: int


@dataclass
class _Member:
    generator: Generator
    rows: list[_Row] = field(default_factory=list)


class DecodeBatch:
    """Up to `max_rows` rows of any number of generators, stepped together (see the module's docstring)."""

    def __init__(self, session: DecoderSession, max_rows: int, ragged: bool | None = None, min_rows: int = 1) -> None:
        """ragged: the layout (default: ragged where the session's graph takes it, see the module's docstring).
        min_rows: a step runs at least this many rows, copies of the first standing in (2 for int8 graphs:
        MatMulNBits computes a lone row on another code path, whose logits differ by ~0.04 on GPT-2 small, so a
        request's answer would depend on whether it was alone)."""
        if not 1 <= min_rows <= max_rows:
            raise ValueError(f"min_rows must be from 1 to max_rows ({max_rows}), got {min_rows}")
        self.session = session
        self.max_rows = max_rows
        self.min_rows = min_rows
        self._shadows = 0  # rows after the real ones that copy the first one (min_rows)
        self.ragged = session.ragged_rows if ragged is None else ragged
        if self.ragged and session.cache_kind != "preallocated":
            raise ValueError("the ragged layout needs a preallocated cache")
        self._context = session.architecture.n_positions
        self._vocab = session.architecture.vocab_size
        self._rows: list[_Row] = []
        self._members: dict[int, _Member] = {}
        self._width = 0
        self._mask = np.zeros((max_rows, 0), dtype=np.int64)
        self._tokens = np.zeros(max_rows, dtype=np.int64)
        self._positions = np.zeros(max_rows, dtype=np.int64)
        self._lengths = np.zeros(max_rows, dtype=np.int64)  # ragged: the columns each row holds
        self._store: _Store = (
            _Preallocated(session, max_rows) if session.cache_kind == "preallocated" else _Growing(session)
        )

    @property
    def rows(self) -> int:
        """Rows decoding now."""
        return len(self._rows)

    @property
    def free(self) -> int:
        return self.max_rows - len(self._rows)

    def _shadow(self, count: int) -> int:
        """Rows to run this step: the real ones, with copies of the first up to min_rows (made once, then kept equal
        by running them on the same tokens)."""
        run = max(count, self.min_rows)
        if run > count and self._shadows != run - count:
            for slot in range(count, run):
                self._mask[slot] = self._mask[0]
                self._tokens[slot], self._positions[slot] = self._tokens[0], self._positions[0]
                self._lengths[slot] = self._lengths[0]
                self._store.move(0, slot, self._width)
            self._shadows = run - count
        return run

    @property
    def generators(self) -> list[Generator]:
        return [member.generator for member in self._members.values()]

    def join(self, generator: Generator) -> None:
        """Take a generator that has prefilled and chosen its first token (its running rows join; a generator that is
        already done does not)."""
        running = [index for index, reason in enumerate(generator.finish_reasons()) if reason is None]
        if not running or generator.is_done():
            return
        if len(running) > self.free:
            raise InvalidInputError(f"the batch has {self.free} free rows; this generator needs {len(running)}")
        cache, mask, pending = generator.hand_over()
        length = mask.shape[1]
        width = max(self._width, length)
        # Room for every step the rows may take, now: growing the buffers while rows run costs one step a copy of
        # every row's keys and values (measured, 16 rows of GPT-2 small at 64 -> 128 columns: every stream stalled
        # 150-190 ms at once). Joining is when a copy is cheapest: it happens between steps anyway. A step writes
        # the pending token of each row; a row's last chosen token is never written. Ragged: this generator's rows
        # end at column final_token_count - 2. Aligned: every row writes at the shared width, which this join may
        # widen, so the room is the width plus the most steps any generator here has left.
        if self.ragged:
            self._ensure_columns(generator.final_token_count - 1)
        else:
            steps_left = max(g.final_token_count - g.token_count for g in [generator, *self.generators])
            self._ensure_columns(width + steps_left)
        if width > self._width and not self.ragged:  # the rows already here do not attend the new columns
            self._mask[: len(self._rows), self._width : width] = 0
        start, offset = len(self._rows), 0 if self.ragged else width - length
        slots = np.arange(start, start + len(running))
        self._mask[slots] = 0
        self._mask[slots, offset : offset + length] = mask[running]
        self._lengths[slots] = length
        self._tokens[slots] = pending[running, 0]
        self._positions[slots] = pending[running, 1]
        self._store.place(slots, cache, np.array(running), offset, length)
        self._shadows = 0
        member = self._members.setdefault(id(generator), _Member(generator))
        for index in running:
            row = _Row(generator, index)
            member.rows.append(row)
            self._rows.append(row)
        self._width = width

    def leave(self, generator: Generator) -> None:
        """Drop a generator's rows at once (its client left, say); their rows are free for the next step."""
        member = self._members.pop(id(generator), None)
        if member is not None:
            slot_of = {id(row): slot for slot, row in enumerate(self._rows)}
            self._free([slot_of[id(row)] for row in member.rows])

    def step(self) -> list[Generator]:
        """One model step of every row; each generator then chooses its rows' next tokens. Returns the generators
        that are done (they have left the batch)."""
        if not self._rows:
            return []
        count = len(self._rows)
        if not self.ragged and self._width + 1 > self._context:
            self._compact()
        run = self._shadow(count)
        if self.ragged:  # each row's next token at its own column
            columns = self._lengths[:run]
            width = int(columns.max())
            self._ensure_columns(width + 1)
            self._mask[np.arange(run), columns] = 1
        else:  # every row's at column `width`
            width = self._width
            self._ensure_columns(width + 1)
            self._mask[:run, width] = 1
        logits = self._store.step(
            self._tokens[:run, None], self._mask[:run, : width + 1], self._positions[:run, None], run, width
        )[:count, -1]
        self._lengths[:run] += 1
        self._width = width + 1
        slot_of = {id(row): slot for slot, row in enumerate(self._rows)}
        done, ended = [], []
        for member in list(self._members.values()):
            generator = member.generator
            slots = [slot_of[id(row)] for row in member.rows]
            if len(slots) == generator.rows:  # every row still runs (rows are in order: they joined in order)
                chosen = logits[slots]
            else:  # a row that ended gets nothing to choose from (the generator pads it)
                chosen = np.zeros((generator.rows, self._vocab), dtype=np.float32)
                chosen[[row.index for row in member.rows]] = logits[slots]
            generator.advance(chosen)
            tokens, reasons = generator.get_next_tokens(), generator.finish_reasons()
            for slot, row in zip(slots, member.rows, strict=True):
                self._tokens[slot] = tokens[row.index]
                self._positions[slot] += 1
                if reasons[row.index] is not None:
                    ended.append(slot)
            member.rows = [row for row in member.rows if reasons[row.index] is None]
            if generator.is_done():
                del self._members[id(generator)]
                done.append(generator)
        self._tokens[count:run], self._positions[count:run] = self._tokens[0], self._positions[0]
        self._free(ended)
        return done

    def _free(self, slots: list[int]) -> None:
        """Free these rows: the last rows move into the holes, so that the running rows stay the first ones."""
        if slots:
            self._shadows = 0
        for slot in sorted(slots, reverse=True):
            last = len(self._rows) - 1
            if slot != last:
                self._mask[slot] = self._mask[last]
                self._tokens[slot], self._positions[slot] = self._tokens[last], self._positions[last]
                self._lengths[slot] = self._lengths[last]
                self._store.move(last, slot, self._width)
                self._rows[slot] = self._rows[last]
            self._rows.pop()
        self._store.shrink(len(self._rows))
        if not self._rows:
            self._width = 0
        elif self.ragged:
            self._width = int(self._lengths[: len(self._rows)].max())

    def _compact(self) -> None:
        """Pack each row's columns to the right, dropping the masked ones: the width becomes the longest row's."""
        count = len(self._rows)
        valid = self._mask[:count, : self._width] == 1
        width = int(valid.sum(axis=1).max())
        self._store.compact(valid, width)
        mask = np.zeros((count, width), dtype=np.int64)
        for slot in range(count):
            mask[slot, width - int(valid[slot].sum()) :] = 1
        self._mask[:count, :width] = mask
        self._width = width

    def _ensure_columns(self, columns: int) -> None:
        """Room for `columns` columns: the next power of two from 16 (the context at most), so that requests of
        similar lengths do not grow the buffers one after another."""
        if columns > self._mask.shape[1]:
            grown = min(self._context, max(16, 1 << (columns - 1).bit_length()))
            mask = np.zeros((self.max_rows, grown), dtype=np.int64)
            mask[:, : self._mask.shape[1]] = self._mask
            self._mask = mask
            self._store.reserve(grown, len(self._rows) + self._shadows)


class _Store:
    """Where the batch's keys and values live: rows [0, count) of `width` columns each."""

    def place(self, slots: np.ndarray, cache: KVCache, rows: np.ndarray, offset: int, length: int) -> None:
        """Rows `rows` of `cache` (their first `length` columns) into rows `slots`, from column `offset` on."""
        raise NotImplementedError

    def step(self, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray, count: int, width: int) -> np.ndarray:
        raise NotImplementedError

    def move(self, source: int, target: int, width: int) -> None:
        raise NotImplementedError

    def shrink(self, count: int) -> None:
        raise NotImplementedError

    def compact(self, valid: np.ndarray, width: int) -> None:
        raise NotImplementedError

    def reserve(self, columns: int, rows: int) -> None:
        """Room for `columns` columns; the first `rows` rows hold data to keep."""
        raise NotImplementedError


class _Preallocated(_Store):
    """One buffer per key and value, [max_rows, n_head, capacity, head_dim]; a step binds the first rows' views."""

    def __init__(self, session: DecoderSession, max_rows: int) -> None:
        self.session = session
        self.cache = session.empty_cache(max_rows, capacity=16)
        self.view: PreallocatedCache | None = None

    def reserve(self, columns: int, rows: int) -> None:
        """Larger buffers with the rows in use copied in (the others' memory is not even touched: np.zeros)."""
        if columns > self.cache.capacity:
            old = self.cache.capacity
            grown = [
                np.zeros((*buffer.shape[:2], columns, buffer.shape[3]), buffer.dtype) for buffer in self.cache.tensors
            ]
            for target, source in zip(grown, self.cache.tensors, strict=True):
                target[:rows, :, :old] = source[:rows]
            self.cache = PreallocatedCache(grown[0::2], grown[1::2])
            self.view = None

    def place(self, slots: np.ndarray, cache: KVCache, rows: np.ndarray, offset: int, length: int) -> None:
        for target, source in zip(self.cache.tensors, cache.tensors, strict=True):
            target[slots, :, offset : offset + length] = source[rows, :, :length]
        self.view = None

    def step(self, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray, count: int, width: int) -> np.ndarray:
        if self.view is None or self.view.keys[0].shape[0] != count:
            self.view = PreallocatedCache([k[:count] for k in self.cache.keys], [v[:count] for v in self.cache.values])
        self.view.length = width
        logits, _ = self.session.forward(tokens, mask, positions, self.view)
        return logits

    def move(self, source: int, target: int, width: int) -> None:
        for tensor in self.cache.tensors:
            tensor[target, :, :width] = tensor[source, :, :width]

    def shrink(self, count: int) -> None:
        self.view = None

    def compact(self, valid: np.ndarray, width: int) -> None:
        for slot, columns in enumerate(valid):
            kept = np.flatnonzero(columns)
            for tensor in self.cache.tensors:
                tensor[slot, :, width - len(kept) : width] = tensor[slot][:, kept]


class _Growing(_Store):
    """Arrays [rows, n_head, width, head_dim] that each step returns one column wider (host or device cache); joins,
    moves and packing happen on host copies (rare events), steps on whatever the session returns."""

    def __init__(self, session: DecoderSession) -> None:
        self.session = session
        self.cache: KVCache | None = None

    def _arrays(self) -> list[np.ndarray]:
        return [tensor if isinstance(tensor, np.ndarray) else tensor.numpy() for tensor in self.cache.tensors]

    def _wrap(self, arrays: list[np.ndarray]) -> None:
        keys, values = arrays[0::2], arrays[1::2]
        if self.session.cache_kind == "device":
            self.cache = DeviceCache(keys, values, self.session.gather)
        else:
            self.cache = HostCache(keys, values)

    def reserve(self, columns: int, rows: int) -> None:
        return  # arrays grow with every step

    def place(self, slots: np.ndarray, cache: KVCache, rows: np.ndarray, offset: int, length: int) -> None:
        width = offset + length  # aligned: the joining rows end at the batch's width
        joining = [t if isinstance(t, np.ndarray) else t.numpy() for t in cache.tensors]
        current = self._arrays() if self.cache is not None else None
        arrays = []
        for index, source in enumerate(joining):
            heads, dim = source.shape[1], source.shape[3]
            merged = np.zeros((int(slots[-1]) + 1, heads, width, dim), source.dtype)
            if current is not None:
                kept = current[index]
                merged[: kept.shape[0], :, : kept.shape[2]] = kept
            merged[slots, :, offset:width] = source[rows, :, :length]
            arrays.append(merged)
        self._wrap(arrays)

    def step(self, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray, count: int, width: int) -> np.ndarray:
        logits, self.cache = self.session.forward(tokens, mask, positions, self.cache)
        return logits

    def move(self, source: int, target: int, width: int) -> None:
        arrays = self._arrays()
        if target >= len(arrays[0]):  # a row past the current ones (a copy standing in for min_rows)
            arrays = [np.concatenate([array, np.zeros_like(array[: target + 1 - len(array)])]) for array in arrays]
        for array in arrays:
            array[target] = array[source]
        self._wrap(arrays)

    def shrink(self, count: int) -> None:
        if not count:  # empty: the next row to join starts the width again (from its own length)
            self.cache = None
        elif self.cache is not None:
            self._wrap([np.ascontiguousarray(array[:count]) for array in self._arrays()])

    def compact(self, valid: np.ndarray, width: int) -> None:
        arrays = []
        for array in self._arrays():
            packed = np.zeros((*array.shape[:2], width, array.shape[3]), array.dtype)
            for slot, columns in enumerate(valid):
                kept = np.flatnonzero(columns)
                packed[slot, :, width - len(kept) :] = array[slot][:, kept]
            arrays.append(packed)
        self._wrap(arrays)
