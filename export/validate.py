"""Export-time check: the ONNX graph's logits against PyTorch's on a padded batch, prompt and one decode step,
plus teacher-forced top-1 agreement on sequences PyTorch generated greedily, and the KL divergence, top-1 agreement
and max |logits difference| on the export's sample text (export/data/sample_text.txt), held to quality floors for
quantised weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpt2onnx.runtime.scoring import Agreement, position_logits

# Relative tolerance (max |logits diff| / max(1, max |PyTorch logit|)) for each kind of graph. float32 graphs compute
# what PyTorch computes up to summation order; float16 rounds every activation to 11 bits; int8 rounds each weight to
# 255 levels per block of inputs (128 by default; or per output column, for fast prefill) and activations to 8 bits at
# run time; int4 to 16 levels per block of 32 (measured on the stress checkpoint: 0.16 with the 8-bit lm_head, 0.18
# without; 0.09 on the tiny random model).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "int8": 0.15, "int4": 0.4}
# Quality floors on the sample text for quantised weights (the aims of issue 14, measured on the stress checkpoint
# of export/outliers.py): an export below them warns with its figures (benchmarks/README.md has each variant's).
FLOORS = {
    "int8": {"top1_agreement": 0.97, "kl_divergence": 0.02},
    "int4": {"top1_agreement": 0.90, "kl_divergence": 0.1},
}
PROMPT_LENGTHS = (7, 4)  # a batch of two prompts of different lengths, so the shorter one is left-padded
AGREEMENT_ROWS, AGREEMENT_PROMPT, AGREEMENT_NEW = 4, 8, 24


@dataclass
class ValidationReport:
    """Max |logits difference| between the bundle and PyTorch, relative to max(1, max |PyTorch logits|)."""

    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    cases: list[str]
    top1_agreement: float
    variant: str = "float32"
    sample_text: dict[str, Any] = field(default_factory=dict)  # tokens, kl_divergence, top1_agreement, ...

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(1.0, self.max_abs_logit)

    @property
    def passed(self) -> bool:
        return self.relative_diff <= self.tolerance

    def below_floors(self) -> list[str]:
        """The sample-text figures that miss the variant's floors, in words ("top-1 agreement 96.10% < 97%")."""
        floors = FLOORS.get(self.variant, {})
        missed = []
        if "top1_agreement" in floors and self.sample_text["top1_agreement"] < floors["top1_agreement"]:
            missed.append(f"top-1 agreement {self.sample_text['top1_agreement']:.2%} < {floors['top1_agreement']:.0%}")
        if "kl_divergence" in floors and self.sample_text["kl_divergence"] > floors["kl_divergence"]:
            missed.append(f"KL divergence {self.sample_text['kl_divergence']:.4f} > {floors['kl_divergence']:g}")
        return missed

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "max_abs_logits_diff": self.max_abs_diff,
            "max_abs_reference_logit": self.max_abs_logit,
            "relative_diff": self.relative_diff,
            "tolerance": self.tolerance,
            "tolerance_kind": "relative: max |logits diff| / max(1, max |PyTorch logit|)",
            "teacher_forced_top1_agreement": self.top1_agreement,
            "sample_text": {**self.sample_text, "floors": FLOORS.get(self.variant)},
            "passed": self.passed,
            "cases": self.cases,
        }


def _reference_logits(model: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    import torch

    from gpt2onnx.runtime.padding import position_ids_from_mask

    with torch.no_grad():
        output = model(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            position_ids=torch.from_numpy(position_ids_from_mask(attention_mask)),
            use_cache=False,
        )
    return output.logits.float().numpy()


def _greedy_sequences(model: Any, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """PyTorch's own greedy continuation of equal-length prompts: [rows, prompt + new_tokens] token ids."""
    import torch

    with torch.no_grad():
        output = model.generate(
            input_ids=torch.from_numpy(prompts),
            attention_mask=torch.ones_like(torch.from_numpy(prompts)),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return output.numpy()


def sample_text_agreement(model: Any, session: Any, ids: np.ndarray) -> Agreement:
    """The graph against PyTorch, teacher-forced on ids in pieces of the context's length: every position's
    next-token distribution."""
    from gpt2onnx.runtime.processors import log_softmax

    agreement = Agreement()
    context = session.architecture.n_positions
    for begin in range(0, len(ids) - 1, context):
        piece = ids[begin : begin + context]
        reference = _reference_logits(model, piece[None], np.ones((1, len(piece)), np.int64))[0]
        for start, logits in position_logits(session, piece):
            theirs = reference[start : start + len(logits)]
            agreement.add(log_softmax(logits.astype(np.float64)), logits, theirs)
    return agreement


def validate_bundle(
    model: Any,
    manifest: Any,
    variant: str,
    sample_ids: np.ndarray,
    seed: int = 0,
    tolerance: float | None = None,
) -> ValidationReport:
    """Run the written graph with onnxruntime (CPU) and PyTorch on the same inputs and compare logits.

    variant: "float32", "float16" or "int8" (picks the default tolerance). Cases: the prompt pass of a left-padded
    batch of two (all positions' logits, padding excluded); one decode step with the prompt's past (the new position's
    logits against PyTorch on the whole sequence); sequences that PyTorch continued greedily, fed whole
    (teacher forcing), where the share of positions whose top-1 token matches PyTorch's is the agreement; and the
    sample text's ids (sample_ids), teacher-forced, for the figures that FLOORS holds quantised weights to.
    """
    from gpt2onnx.runtime.padding import PaddedBatch, position_ids_from_mask
    from gpt2onnx.runtime.session import DecoderSession

    rng = np.random.default_rng(seed)
    vocab = manifest.architecture.vocab_size
    rows = [rng.integers(0, vocab, size=length).tolist() for length in PROMPT_LENGTHS]
    batch = PaddedBatch.from_rows(rows, pad_token_id=0)
    session = DecoderSession(manifest, provider="cpu")
    positions = position_ids_from_mask(batch.attention_mask)
    cache = session.empty_cache(len(rows), capacity=batch.input_ids.shape[1] + 1)  # the prompt and one step
    logits, past = session.forward(batch.input_ids, batch.attention_mask, positions, cache, logits_to_keep=0)
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

    prompts = rng.integers(0, vocab, size=(AGREEMENT_ROWS, AGREEMENT_PROMPT))
    sequences = _greedy_sequences(model, prompts, AGREEMENT_NEW)
    ones = np.ones_like(sequences)
    cache = session.empty_cache(AGREEMENT_ROWS, capacity=sequences.shape[1])
    forced, _ = session.forward(sequences, ones, position_ids_from_mask(ones), cache, logits_to_keep=0)
    forced_reference = _reference_logits(model, sequences, ones)
    forced_diff = float(np.max(np.abs(forced - forced_reference)))
    max_logit = max(max_logit, float(np.max(np.abs(forced_reference))))
    agreement = float(np.mean(forced.argmax(axis=-1) == forced_reference.argmax(axis=-1)))
    text = sample_text_agreement(model, session, sample_ids)
    sample_text = {
        "tokens": len(sample_ids),
        "kl_divergence": text.kl_divergence,
        "top1_agreement": text.top1_agreement,
        "max_logits_diff": text.max_logits_diff,
    }
    return ValidationReport(
        max_abs_diff=max(prompt_diff, step_diff, forced_diff),
        max_abs_logit=max_logit,
        tolerance=tolerance if tolerance is not None else TOLERANCE[variant],
        cases=[
            f"prompt: batch of 2 left-padded prompts of {PROMPT_LENGTHS} tokens, max |diff| {prompt_diff:.3g}",
            f"decode step after that prompt with its past, max |diff| {step_diff:.3g}",
            f"teacher forcing: {AGREEMENT_ROWS} prompts of {AGREEMENT_PROMPT} tokens + {AGREEMENT_NEW} greedy "
            f"tokens from PyTorch, max |diff| {forced_diff:.3g}, top-1 agreement {agreement:.2%}",
            f"sample text: {len(sample_ids)} tokens teacher-forced, KL divergence {text.kl_divergence:.3g}, top-1 "
            f"agreement {text.top1_agreement:.2%}, max |diff| {text.max_logits_diff:.3g}",
        ],
        top1_agreement=agreement,
        variant=variant,
        sample_text=sample_text,
    )
