"""What transformers produces for the same weights and inputs: the reference every parity test compares with."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def left_padded(rows: Sequence[Sequence[int]], pad: int):
    """Torch input_ids and attention_mask of rows, left-padded as transformers expects for decoder-only models."""
    import torch

    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, length - len(row) :] = torch.tensor(row)
        mask[index, length - len(row) :] = 1
    return ids, mask


def trim_after_eos(tokens: Sequence[int], eos: Sequence[int]) -> list[int]:
    """Generated tokens up to and including the first EOS (transformers pads finished rows after it)."""
    result = []
    for token in tokens:
        result.append(int(token))
        if token in eos:
            break
    return result


def reference_generate(
    model, rows: Sequence[Sequence[int]], pad: int, eos: Sequence[int], **options
) -> list[list[int]]:
    """transformers' generate on left-padded rows; each row's new tokens, cut after its first EOS."""
    import torch

    ids, mask = left_padded(rows, pad)
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, eos_token_id=list(eos), **options)
    new = output[:, ids.shape[1] :].tolist()
    return [trim_after_eos(row, eos) for row in new]


def reference_padded_logits(model, rows: Sequence[Sequence[int]], pad: int) -> np.ndarray:
    """transformers' logits for left-padded rows [batch, length, vocab], positions counted over real tokens."""
    import torch

    ids, mask = left_padded(rows, pad)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.numpy()


def reference_logits(model, input_ids: np.ndarray) -> np.ndarray:
    """transformers' logits for every position of unpadded input_ids [batch, length]."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(input_ids)).logits.numpy()
