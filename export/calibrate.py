"""What the quantiser learns from text, with PyTorch: which input channels of each projection carry outliers (on the
export's sample text), and the Hessians of the projections' inputs that GPTQ rounds against (on a calibration text of
its own, so that the sample text's figures stay out-of-sample).

An int8 projection quantises its input at run time with one scale per block of inputs (MatMulNBits) or per tensor
(DynamicQuantizeMatMul, --fast-prefill): a channel far larger than the rest sets that scale, and every other input
in its block then keeps only a few of its 255 levels. LLM.int8() (Dettmers et al. 2022) takes such channels out of
the int8 product and multiplies them in float: here a channel is an outlier when its largest |input| over the
sample text is over OUTLIER_RATIO times the median channel's, which ordinary weights never give (random GPT-2 small:
at most 3.9x) and trained GPT-2's outlier features do (export/outliers.py's stand-in: 20x and more).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from typing import Any

import numpy as np

OUTLIER_RATIO = 8.0
SAMPLE_TEXT = resources.files(__package__).joinpath("data", "sample_text.txt")
CALIBRATION_TEXT = resources.files(__package__).joinpath("data", "calibration_text.txt")
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
HESSIAN_BUDGET_BYTES = 2**30  # float32 Hessians held at once: layers are calibrated in passes that fit (gpt2-xl: 10)


def _text_ids(text: str, tokenizer_json: Any | None, vocab_size: int, seed: int) -> np.ndarray:
    from gpt2onnx.runtime.tokenizer import Tokenizer

    if tokenizer_json is not None:
        tokenizer = Tokenizer(tokenizer_json)
        if tokenizer.vocab_size <= vocab_size:
            return np.asarray(tokenizer.encode(text), dtype=np.int64)
    return np.random.default_rng(seed).integers(0, vocab_size, size=len(text) // 4).astype(np.int64)


def sample_ids(tokenizer_json: Any | None, vocab_size: int, seed: int) -> np.ndarray:
    """The sample text's token ids when the bundle's tokenizer fits the model, else seeded random ids (as many)."""
    return _text_ids(SAMPLE_TEXT.read_text(encoding="utf-8"), tokenizer_json, vocab_size, seed)


def calibration_ids(tokenizer_json: Any | None, vocab_size: int, seed: int) -> np.ndarray:
    """The calibration text's token ids (GPTQ's inputs), as sample_ids gives the sample text's (random ids: another
    seed's, so that they are not the sample's)."""
    return _text_ids(CALIBRATION_TEXT.read_text(encoding="utf-8"), tokenizer_json, vocab_size, seed + 1)


def _observe_inputs(model: Any, ids: np.ndarray, layers: Iterable[int], observe: Callable[[str, Any], None]) -> None:
    """Run the model over ids, a context at a time, calling observe(weight name, input rows [tokens, in]) for every
    projection of the given layers."""
    import torch

    hooks = []
    for layer in layers:
        for projection in PROJECTIONS:
            name = f"transformer.h.{layer}.{projection}.weight"

            def hook(_module: Any, inputs: tuple[torch.Tensor, ...], _output: Any, name: str = name) -> None:
                observe(name, inputs[0].detach().flatten(0, -2))

            hooks.append(model.transformer.h[layer].get_submodule(projection).register_forward_hook(hook))
    try:
        with torch.no_grad():
            context = model.config.n_positions
            for start in range(0, len(ids), context):
                model(torch.from_numpy(ids[None, start : start + context]))
    finally:
        for hook in hooks:
            hook.remove()


def outlier_channels(model: Any, ids: np.ndarray) -> dict[str, list[int]]:
    """weight name (transformer.h.{i}.{projection}.weight) -> the input channels of that projection whose largest
    |input| on ids is over OUTLIER_RATIO x the median channel's; projections without any are left out."""
    import torch

    largest: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        peak = x.abs().amax(dim=0)
        largest[name] = peak if name not in largest else torch.maximum(largest[name], peak)

    _observe_inputs(model, ids, range(len(model.transformer.h)), record)
    found = {}
    for name, peak in largest.items():
        channels = torch.nonzero(peak > OUTLIER_RATIO * peak.median()).flatten().tolist()
        if channels:
            found[name] = channels
    return found


def _layer_passes(model: Any) -> list[list[int]]:
    """The layers in groups whose projections' Hessians fit HESSIAN_BUDGET_BYTES together (one forward pass each)."""
    passes: list[list[int]] = [[]]
    held = 0
    for layer, block in enumerate(model.transformer.h):
        size = sum(4 * block.get_submodule(name).weight.shape[0] ** 2 for name in PROJECTIONS)  # Conv1D: [in, out]
        if passes[-1] and held + size > HESSIAN_BUDGET_BYTES:
            passes.append([])
            held = 0
        passes[-1].append(layer)
        held += size
    return passes


def input_hessians(model: Any, ids: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """(weight name, X^T X of that projection's inputs on ids, float64 [in, in]) for every projection, a group of
    layers per forward pass (see HESSIAN_BUDGET_BYTES)."""
    import torch

    for layers in _layer_passes(model):
        sums: dict[str, torch.Tensor] = {}

        def record(name: str, x: torch.Tensor, sums: dict[str, torch.Tensor] = sums) -> None:
            product = x.float().T @ x.float()
            sums[name] = product if name not in sums else sums[name].add_(product)

        _observe_inputs(model, ids, layers, record)
        for name in list(sums):
            yield name, sums.pop(name).double().numpy()
