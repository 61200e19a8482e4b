"""Generation options: transformers' GenerationConfig names and defaults, checked up front."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError, counted

# Generation options a checkpoint's generation_config may set that gpt2onnx honours as defaults.
GENERATION_DEFAULT_KEYS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "max_new_tokens",
    "min_new_tokens",
)
EARLY_STOPPING_VALUES = (True, False, "never")


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate. Names and defaults follow transformers' GenerationConfig.

    eos_token_id / pad_token_id of None take the bundle's values (GPT-2: pad = eos = 50256).
    top_k applies only when sampling (as in transformers); top_k=0 disables it.
    max_length (transformers' older limit: prompt + new tokens, the padded prompt width of a batch) may replace
    max_new_tokens; for_prompt() turns it into max_new_tokens once the prompt is known.
    """

    max_new_tokens: int = 20
    max_length: int | None = None
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    output_scores: bool = False
    top_logprobs: int = 0

    @classmethod
    def create(
        cls, base: Mapping[str, Any] | None = None, vocab_size: int | None = None, **overrides: Any
    ) -> GenerationOptions:
        """Build options from defaults (e.g. the bundle's), overridden by keyword arguments; then validate.

        None values (in base or overrides) mean "the default"; vocab_size, when given, bounds every token id.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise InvalidInputError(f"unknown generation option(s): {', '.join(unknown)}{hint}", option=unknown[0])
        given = {key: value for key, value in overrides.items() if value is not None}
        if "max_length" in given and "max_new_tokens" in given:
            raise InvalidInputError(
                "give max_new_tokens or max_length (prompt included), not both", option="max_length"
            )
        values = {key: value for key, value in (base or {}).items() if key in names and value is not None}
        if "max_length" in given:  # the caller's limit replaces the bundle's max_new_tokens default
            values.pop("max_new_tokens", None)
        values.update(given)
        if isinstance(values.get("stop"), str):
            values["stop"] = (values["stop"],)
        if values.get("stop") is not None:
            values["stop"] = _tuple_of(values["stop"], "stop", "a string or a list of strings")
        if values.get("bad_words_ids") is not None:
            values["bad_words_ids"] = tuple(
                _tuple_of(words, "bad_words_ids", "a list of token-id lists")
                for words in _tuple_of(values["bad_words_ids"], "bad_words_ids", "a list of token-id lists")
            )
        if isinstance(values.get("eos_token_id"), Sequence):
            values["eos_token_id"] = _tuple_of(values["eos_token_id"], "eos_token_id", "a token id or a list of them")
        options = cls(**values)
        options.validate(vocab_size)
        return options

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidInputError naming the first option that is out of range."""
        _int(self.max_new_tokens, "max_new_tokens", 1)
        if self.max_length is not None:
            _int(self.max_length, "max_length", 2)
        _int(self.min_new_tokens, "min_new_tokens", 0)
        if self.min_new_tokens > self.max_new_tokens and self.max_length is None:
            raise InvalidInputError(
                f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})",
                option="min_new_tokens",
            )
        _bool(self.do_sample, "do_sample")
        _bool(self.output_scores, "output_scores")
        _float(self.temperature, "temperature", low=0.0, low_open=True)
        _int(self.top_k, "top_k", 0)
        _float(self.top_p, "top_p", low=0.0, high=1.0, low_open=True)
        if self.min_p is not None:
            _float(self.min_p, "min_p", low=0.0, high=1.0)
        _float(self.typical_p, "typical_p", low=0.0, high=1.0, low_open=True)
        _float(self.repetition_penalty, "repetition_penalty", low=0.0, low_open=True)
        _int(self.no_repeat_ngram_size, "no_repeat_ngram_size", 0)
        _int(self.num_beams, "num_beams", 1)
        _float(self.length_penalty, "length_penalty")
        if not any(self.early_stopping is value for value in EARLY_STOPPING_VALUES):
            raise InvalidInputError(
                f"early_stopping must be True, False or 'never', got {self.early_stopping!r}", option="early_stopping"
            )
        _int(self.num_return_sequences, "num_return_sequences", 1)
        if self.num_return_sequences > self.num_beams and self.num_beams > 1:
            raise InvalidInputError(
                f"num_return_sequences ({self.num_return_sequences}) must not exceed num_beams ({self.num_beams})",
                option="num_return_sequences",
            )
        if self.num_return_sequences > 1 and self.num_beams == 1 and not self.do_sample:
            raise InvalidInputError(
                f"num_return_sequences ({self.num_return_sequences}) > 1 needs sampling (do_sample) or num_beams >= "
                f"{self.num_return_sequences}: greedy search has only one answer",
                option="num_return_sequences",
            )
        if self.seed is not None:
            _int(self.seed, "seed", 0)
        _int(self.top_logprobs, "top_logprobs", 0)
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise InvalidInputError(f"stop strings must be non-empty strings, got {text!r}", option="stop")
        token_ids = [*self.eos_token_ids, *([] if self.pad_token_id is None else [self.pad_token_id])]
        for words in self.bad_words_ids or ():
            if not words:
                raise InvalidInputError("bad_words_ids must not contain an empty sequence", option="bad_words_ids")
            token_ids.extend(words)
        for token in token_ids:
            _int(token, "token id", 0)
            if vocab_size is not None and token >= vocab_size:
                raise InvalidInputError(f"token id {token} is outside the vocabulary (0..{vocab_size - 1})")

    def for_prompt(self, prompt_length: int) -> GenerationOptions:
        """These options for a prompt (batch) of prompt_length tokens: max_length turned into max_new_tokens."""
        if self.max_length is None:
            return self
        new_tokens = self.max_length - prompt_length
        if new_tokens < 1:
            raise InvalidInputError(
                f"max_length ({self.max_length}) counts the prompt, so it must exceed the prompt's "
                f"{counted(prompt_length, 'token')}",
                option="max_length",
            )
        options = dataclasses.replace(self, max_new_tokens=new_tokens, max_length=None)
        options.validate()
        return options

    def streaming_refusal(self) -> str | None:
        """Why these options cannot be streamed as one text (None: they can): a stream is one sequence, chosen a
        token at a time, which beam search does not do (the CLI, stream() and the server all ask this)."""
        if self.num_beams > 1:
            return "works with greedy search and sampling, not beam search (num_beams > 1)"
        if self.num_return_sequences > 1:
            return "yields one sequence: num_return_sequences must be 1"
        return None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def records_logprobs(self) -> bool:
        """Whether each step's log-probabilities are kept (output_scores, or top_logprobs alternatives asked for)."""
        return self.output_scores or self.top_logprobs > 0


def _tuple_of(value: Any, name: str, expected: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidInputError(f"{name} must be {expected}, got {value!r}", option=name)
    return tuple(value)


def _int(value: Any, name: str, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}", option=name)
    if low is not None and value < low:
        raise InvalidInputError(f"{name} must be >= {low}, got {value}", option=name)


def _bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name} must be True or False, got {value!r}", option=name)


def _float(value: Any, name: str, low: float | None = None, high: float | None = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r}", option=name)
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise InvalidInputError(
            f"{name} must be {bound}" + (f" and <= {high}" if high is not None else "") + f", got {value}", option=name
        )
    if high is not None and value > high:
        raise InvalidInputError(f"{name} must be <= {high}, got {value}", option=name)
