"""Export-time check: the ONNX graph's logits against PyTorch's on a padded batch, prompt and one decode step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
PROMPT_LENGTHS = (7, 4)  # a batch of two prompts of different lengths, so the shorter one is left-padded


@dataclass
class ValidationReport:
    """Max |logits difference| between the bundle and PyTorch, relative to max(1, max |PyTorch logits|)."""

    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    cases: list[str]

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(1.0, self.max_abs_logit)

    @property
    def passed(self) -> bool:
        return self.relative_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_logits_diff": self.max_abs_diff,
            "max_abs_reference_logit": self.max_abs_logit,
            "relative_diff": self.relative_diff,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "cases": self.cases,
        }


def _reference_logits(model: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    import torch

    from gpt2onnx.runtime.generation import position_ids_from_mask

    with torch.no_grad():
        output = model(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            position_ids=torch.from_numpy(position_ids_from_mask(attention_mask)),
            use_cache=False,
        )
    return output.logits.float().numpy()


def validate_bundle(
    model: Any, manifest: Any, dtype: str, seed: int = 0, tolerance: float | None = None
) -> ValidationReport:
    """Run the written graph with onnxruntime (CPU) and PyTorch on the same inputs and compare logits.

    Cases: the prompt pass of a left-padded batch of two (all positions' logits, padding excluded), and one
    decode step with the prompt's past (the new position's logits against PyTorch on the whole sequence).
    """
    from gpt2onnx.runtime.generation import PaddedBatch, position_ids_from_mask
    from gpt2onnx.runtime.session import DecoderSession

    rng = np.random.default_rng(seed)
    vocab = manifest.architecture.vocab_size
    rows = [rng.integers(0, vocab, size=length).tolist() for length in PROMPT_LENGTHS]
    batch = PaddedBatch.from_rows(rows, pad_token_id=0)
    session = DecoderSession(manifest, provider="cpu")
    positions = position_ids_from_mask(batch.attention_mask)
    logits, past = session.forward(
        batch.input_ids, batch.attention_mask, positions, session.empty_cache(len(rows)), logits_to_keep=0
    )
    reference = _reference_logits(model, batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.astype(bool)
    prompt_diff = float(np.max(np.abs(logits[real] - reference[real])))
    max_logit = float(np.max(np.abs(reference[real])))

    next_tokens = rng.integers(0, vocab, size=(len(rows), 1))
    mask = np.concatenate([batch.attention_mask, np.ones_like(next_tokens)], axis=1)
    step_logits, _ = session.forward(next_tokens, mask, positions[:, -1:] + 1, past)
    full_reference = _reference_logits(model, np.concatenate([batch.input_ids, next_tokens], axis=1), mask)
    step_diff = float(np.max(np.abs(step_logits[:, -1] - full_reference[:, -1])))
    max_logit = max(max_logit, float(np.max(np.abs(full_reference[:, -1]))))
    return ValidationReport(
        max_abs_diff=max(prompt_diff, step_diff),
        max_abs_logit=max_logit,
        tolerance=tolerance if tolerance is not None else TOLERANCE[dtype],
        cases=[
            f"prompt: batch of 2 left-padded prompts of {PROMPT_LENGTHS} tokens, max |diff| {prompt_diff:.3g}",
            f"decode step after that prompt with its past, max |diff| {step_diff:.3g}",
        ],
    )
