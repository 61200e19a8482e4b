"""What generate() returns: per prompt, its sequences with token ids, text and scores; and timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TokenLogprob:
    """A chosen token's log-probability and, on request, the most likely alternatives at that step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GeneratedSequence:
    """One returned sequence: the prompt's ids followed by the generated ones."""

    token_ids: list[int]
    generated_token_ids: list[int]
    text: str
    generated_text: str
    score: float | None = None
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str = "length"


@dataclass
class PromptResult:
    """The sequences generated for one prompt (num_return_sequences of them)."""

    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[GeneratedSequence]


@dataclass
class ScoreResult:
    """score(): each token's log-probability given the tokens before it (the first token has none), and the
    perplexity exp(-mean log-probability), transformers' exp(loss)."""

    token_ids: list[int]
    logprobs: list[float]  # len(token_ids) - 1 entries: logprobs[i] is of token_ids[i + 1]
    perplexity: float


@dataclass
class Timing:
    prefill_ms: float
    decode_ms_per_token: float
    tokens_generated: int


@dataclass
class GenerationOutput:
    """Everything one generate() call produced; `.text` is the first sequence's generated text."""

    results: list[PromptResult]
    timing: Timing

    @property
    def text(self) -> str:
        return self.results[0].sequences[0].generated_text

    @property
    def texts(self) -> list[str]:
        return [sequence.generated_text for result in self.results for sequence in result.sequences]

    @property
    def sequences(self) -> list[GeneratedSequence]:
        return [sequence for result in self.results for sequence in result.sequences]

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of the README's `gpt2-generate --json` (results and timing)."""
        results = []
        for result in self.results:
            sequences = []
            for sequence in result.sequences:
                item = {
                    "token_ids": sequence.token_ids,
                    "generated_token_ids": sequence.generated_token_ids,
                    "text": sequence.text,
                    "generated_text": sequence.generated_text,
                    "score": sequence.score,
                    "finish_reason": sequence.finish_reason,
                }
                if sequence.logprobs is not None:
                    item["logprobs"] = [asdict(entry) for entry in sequence.logprobs]
                sequences.append(item)
            results.append(
                {"prompt": result.prompt, "prompt_token_ids": result.prompt_token_ids, "sequences": sequences}
            )
        return {"results": results, "timing": asdict(self.timing)}
