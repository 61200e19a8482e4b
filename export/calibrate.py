"""Which input channels of each projection carry outliers: measured with PyTorch on the export's sample text.

An int8 projection quantises its input at run time with one scale per block of inputs (MatMulNBits) or per tensor
(DynamicQuantizeMatMul, --fast-prefill): a channel far larger than the rest sets that scale, and every other input
in its block then keeps only a few of its 255 levels. LLM.int8() (Dettmers et al. 2022) takes such channels out of
the int8 product and multiplies them in float: here a channel is an outlier when its largest |input| over the
sample text is over OUTLIER_RATIO times the median channel's, which ordinary weights never give (random GPT-2 small:
at most 3.9x) and trained GPT-2's outlier features do (export/outliers.py's stand-in: 20x and more).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import numpy as np

OUTLIER_RATIO = 8.0
SAMPLE_TEXT = resources.files(__package__).joinpath("data", "sample_text.txt")
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def sample_ids(tokenizer_json: Any | None, vocab_size: int, seed: int) -> np.ndarray:
    """The sample text's token ids when the bundle's tokenizer fits the model, else seeded random ids (as many)."""
    from gpt2onnx.runtime.tokenizer import Tokenizer

    text = SAMPLE_TEXT.read_text(encoding="utf-8")
    if tokenizer_json is not None:
        tokenizer = Tokenizer(tokenizer_json)
        if tokenizer.vocab_size <= vocab_size:
            return np.asarray(tokenizer.encode(text), dtype=np.int64)
    return np.random.default_rng(seed).integers(0, vocab_size, size=len(text) // 4).astype(np.int64)


def outlier_channels(model: Any, ids: np.ndarray) -> dict[str, list[int]]:
    """weight name (transformer.h.{i}.{projection}.weight) -> the input channels of that projection whose largest
    |input| on ids is over OUTLIER_RATIO x the median channel's; projections without any are left out."""
    import torch

    largest: dict[str, torch.Tensor] = {}
    hooks = []
    for layer, block in enumerate(model.transformer.h):
        for projection in PROJECTIONS:
            module = block.get_submodule(projection)
            name = f"transformer.h.{layer}.{projection}.weight"

            def record(_module: Any, inputs: tuple[torch.Tensor, ...], _output: Any, name: str = name) -> None:
                peak = inputs[0].detach().abs().flatten(0, -2).amax(dim=0)
                largest[name] = peak if name not in largest else torch.maximum(largest[name], peak)

            hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            context = model.config.n_positions
            for start in range(0, len(ids), context):
                model(torch.from_numpy(ids[None, start : start + context]))
    finally:
        for hook in hooks:
            hook.remove()
    found = {}
    for name, peak in largest.items():
        channels = torch.nonzero(peak > OUTLIER_RATIO * peak.median()).flatten().tolist()
        if channels:
            found[name] = channels
    return found
