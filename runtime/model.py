"""The public model object: load a bundle, then generate, stream, and look at next-token probabilities."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Manifest, read_manifest
from .errors import BundleError, InvalidInputError
from .generation import PaddedBatch, Step, greedy_choice, token_steps
from .options import GenerationOptions
from .outputs import GeneratedSequence, GenerationOutput, PromptResult, Timing
from .processors import build_logits_processors, softmax
from .session import DecoderSession
from .tokenizer import Tokenizer

PromptInput = str | Sequence[str] | None
IdsInput = Sequence[int] | Sequence[Sequence[int]] | None


@dataclass(frozen=True)
class TokenProbability:
    """One row of the next-token table: a token, its text and its probability (softmax of the raw logits)."""

    token_id: int
    token: str | None
    probability: float


@dataclass(frozen=True)
class EncodedPrompts:
    prompts: list[str | None]
    rows: list[list[int]]


class GPT2Model:
    """A loaded bundle. Safe to share between threads: each call keeps its own generation state."""

    def __init__(self, manifest: Manifest, session: DecoderSession, tokenizer: Tokenizer | None) -> None:
        self.manifest = manifest
        self.session = session
        self._tokenizer = tokenizer

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def provider(self) -> str:
        return self.session.provider

    @property
    def context_length(self) -> int:
        return self.manifest.architecture.n_positions

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise InvalidInputError(
                f"bundle {self.manifest.folder} has no tokenizer: pass input_ids, or export with --tokenizer DIR"
            )
        return self._tokenizer

    def options(self, **overrides: Any) -> GenerationOptions:
        """The bundle's generation defaults overridden by keyword arguments, validated for this model."""
        options = GenerationOptions.create(self.manifest.generation_defaults, **overrides)
        if options.eos_token_id is None and self.manifest.eos_token_id is not None:
            options = GenerationOptions.create({**options.__dict__, "eos_token_id": self.manifest.eos_token_id})
        options.validate(vocab_size=self.manifest.architecture.vocab_size)
        return options

    def pad_token_id(self, options: GenerationOptions) -> int:
        for candidate in (options.pad_token_id, self.manifest.pad_token_id, *options.eos_token_ids):
            if candidate is not None:
                return candidate
        return 0

    def encode(self, prompt: PromptInput = None, input_ids: IdsInput = None) -> EncodedPrompts:
        """Token ids of each prompt; an empty prompt starts from the BOS token, as transformers does with no input."""
        if (prompt is None) == (input_ids is None):
            raise InvalidInputError("give either a prompt (text or list of texts) or input_ids, not both or neither")
        if prompt is not None:
            if not isinstance(prompt, (str, list, tuple)):
                raise InvalidInputError(f"a prompt must be a string or a list of strings, got {type(prompt).__name__}")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise InvalidInputError("the list of prompts is empty")
            for text in prompts:
                _check_text(text)
            rows = self.tokenizer.encode_batch(prompts)
        else:
            rows = _id_rows(input_ids)
            prompts = [None] * len(rows)
        vocab = self.manifest.architecture.vocab_size
        for row in rows:
            for token in row:
                if not 0 <= token < vocab:
                    raise InvalidInputError(f"token id {token} is outside the vocabulary (0..{vocab - 1})")
        bos = self.manifest.bos_token_id
        if any(not row for row in rows):
            if bos is None:
                raise InvalidInputError("empty prompt, and this model has no BOS token to start from")
            rows = [row or [bos] for row in rows]
        return EncodedPrompts(prompts, rows)

    def _check_context(self, rows: list[list[int]], max_new_tokens: int) -> None:
        longest = max(len(row) for row in rows)
        if longest + max_new_tokens > self.context_length:
            over = longest + max_new_tokens - self.context_length
            raise InvalidInputError(
                f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
                f"{self.context_length} tokens by {over}"
            )

    def generate(self, prompt: PromptInput = None, *, input_ids: IdsInput = None, **options: Any) -> GenerationOutput:
        """Generate from a prompt, a list of prompts, or input_ids (a list of ids, or a list of such lists).

        Options are transformers' GenerationConfig names (max_new_tokens, min_new_tokens, eos_token_id, ...).
        """
        config = self.options(**options)
        encoded = self.encode(prompt, input_ids)
        self._check_context(encoded.rows, config.max_new_tokens)
        pad = self.pad_token_id(config)
        batch = PaddedBatch.from_rows(encoded.rows, pad)
        start = time.perf_counter()
        generated: list[list[int]] = [[] for _ in encoded.rows]
        ended = [False] * len(encoded.rows)
        prefill_s = 0.0
        steps = 0
        for step in self._steps(batch, config, pad):
            if steps == 0:
                prefill_s = time.perf_counter() - start
            steps += 1
            for row, token in enumerate(step.tokens.tolist()):
                if not ended[row]:
                    generated[row].append(token)
                    ended[row] = bool(step.finished[row])
        total_s = time.perf_counter() - start
        timing = Timing(
            prefill_ms=prefill_s * 1000,
            decode_ms_per_token=(total_s - prefill_s) * 1000 / (steps - 1) if steps > 1 else 0.0,
            tokens_generated=sum(len(tokens) for tokens in generated),
        )
        results = [
            PromptResult(text, row, [self._sequence(row, tokens, config, done)])
            for text, row, tokens, done in zip(encoded.prompts, encoded.rows, generated, ended, strict=True)
        ]
        return GenerationOutput(results, timing)

    def stream(
        self, prompt: str | None = None, *, input_ids: Sequence[int] | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield text pieces of one prompt's continuation as tokens arrive; never splits a UTF-8 character."""
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidInputError("stream() takes one prompt (a string), not a list")
        if input_ids is not None and _id_rows(input_ids) and len(_id_rows(input_ids)) != 1:
            raise InvalidInputError("stream() takes one sequence of input_ids, not a batch")
        config = self.options(**options)
        encoded = self.encode(prompt, input_ids)
        self._check_context(encoded.rows, config.max_new_tokens)
        pad = self.pad_token_id(config)
        decoder = self.tokenizer.stream_decoder()
        for step in self._steps(PaddedBatch.from_rows(encoded.rows, pad), config, pad):
            piece = decoder.push(int(step.tokens[0]))
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def next_token_probs(
        self, prompt: str | None = None, *, input_ids: Sequence[int] | None = None, top: int = 10
    ) -> list[TokenProbability]:
        """The `top` most likely next tokens after the prompt, with probabilities (softmax of the raw logits)."""
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise InvalidInputError(f"top must be a positive integer, got {top!r}")
        encoded = self.encode(prompt, input_ids)
        if len(encoded.rows) != 1:
            raise InvalidInputError("next_token_probs() takes one prompt")
        self._check_context(encoded.rows, 0)
        batch = PaddedBatch.from_rows(encoded.rows, 0)
        logits, _ = self.session.forward(
            batch.input_ids,
            batch.attention_mask,
            np.arange(batch.input_ids.shape[1])[None],
            self.session.empty_cache(1),
        )
        probabilities = softmax(logits[0, -1].astype(np.float64))
        order = np.argsort(-probabilities, kind="stable")[:top]
        texts = self._tokenizer.token_strings(order.tolist()) if self._tokenizer else [None] * len(order)
        return [TokenProbability(int(i), text, float(probabilities[i])) for i, text in zip(order, texts, strict=True)]

    def _steps(self, batch: PaddedBatch, config: GenerationOptions, pad: int) -> Iterator[Step]:
        processors = build_logits_processors(config, batch.input_ids.shape[1], config.eos_token_ids)
        return token_steps(
            self.session, batch, config.max_new_tokens, processors, greedy_choice, config.eos_token_ids, pad
        )

    def _sequence(
        self, prompt_ids: list[int], tokens: list[int], config: GenerationOptions, ended: bool
    ) -> GeneratedSequence:
        text = generated_text = None
        if self._tokenizer is not None:
            generated_text = self._tokenizer.decode(tokens, skip_special_tokens=True)
            text = self._tokenizer.decode(prompt_ids + tokens, skip_special_tokens=True)
        return GeneratedSequence(
            token_ids=prompt_ids + tokens,
            generated_token_ids=tokens,
            text=text if text is not None else "",
            generated_text=generated_text if generated_text is not None else "",
            finish_reason="stop" if ended else "length",
        )


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise InvalidInputError(f"a prompt must be a string, got {type(text).__name__}")
    if "\x00" in text:
        raise InvalidInputError("the prompt contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError("the prompt is not valid UTF-8 (it contains a lone surrogate)") from None


def _id_rows(input_ids: IdsInput) -> list[list[int]]:
    """input_ids as a list of rows: a flat list of ints is one row; numpy arrays are accepted."""
    if isinstance(input_ids, np.ndarray):
        input_ids = input_ids.tolist()
    if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence) or len(input_ids) == 0:
        raise InvalidInputError("input_ids must be a non-empty list of token ids, or a list of such lists")
    rows = [input_ids] if not isinstance(input_ids[0], (Sequence, np.ndarray)) else list(input_ids)
    result = []
    for row in rows:
        row = row.tolist() if isinstance(row, np.ndarray) else row
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise InvalidInputError("input_ids must be a list of token ids, or a list of such lists")
        for token in row:
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
                raise InvalidInputError(f"input_ids must hold integers, got {token!r}")
        result.append([int(token) for token in row])
    return result


def load(path: str | Path, provider: str = "auto", verify_hashes: bool = True, threads: int | None = None) -> GPT2Model:
    """Load a bundle folder written by export-gpt2, checking its manifest, sizes and (by default) hashes.

    provider: 'auto' (CUDA when usable, else CPU), 'cpu' or 'cuda' (an error if CUDA cannot be used).
    verify_hashes=False skips the sha256 check of the files (sizes are still checked).
    """
    manifest = read_manifest(path, verify_hashes=verify_hashes)
    tokenizer = None
    if manifest.tokenizer_path is not None:
        tokenizer = Tokenizer(manifest.tokenizer_path)
        if tokenizer.vocab_size > manifest.architecture.vocab_size:
            raise BundleError(
                f"bundle {manifest.folder}: the tokenizer has {tokenizer.vocab_size} tokens, "
                f"more than the model's vocabulary of {manifest.architecture.vocab_size}"
            )
    session = DecoderSession(manifest, provider=provider, intra_op_threads=threads)
    return GPT2Model(manifest, session, tokenizer)
