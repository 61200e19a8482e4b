"""Left padding, as transformers pads a decoder-only batch, and the positions that go with it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class PaddedBatch:
    """Prompts left-padded to one length."""

    input_ids: np.ndarray  # [batch, length] int64
    attention_mask: np.ndarray  # [batch, length] int64, 0 on padding

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]], pad_token_id: int) -> PaddedBatch:
        length = max(len(row) for row in rows)
        input_ids = np.full((len(rows), length), pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for index, row in enumerate(rows):
            if row:
                input_ids[index, length - len(row) :] = row
                attention_mask[index, length - len(row) :] = 1
        return cls(input_ids, attention_mask)


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Positions counted over real tokens only (cumsum - 1), 0 on padding, as transformers computes them."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    return np.where(attention_mask == 0, 0, positions).astype(np.int64)
