"""The public model object: load a bundle, then generate, stream, and look at next-token probabilities."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .beam_search import BeamSearch, beam_search
from .bundle import Manifest, check_hashes, read_manifest
from .errors import BundleError, InvalidInputError, counted
from .generation import PaddedBatch, Step, token_steps
from .options import GenerationOptions
from .outputs import GeneratedSequence, GenerationOutput, PromptResult, Timing
from .processors import build_logits_processors, softmax
from .search import Continuation, Sampler, StepLogprobs, greedy_choice, row_continuations, step_logprobs
from .session import DecoderSession
from .stop_strings import StopStringCriterion, cut_at_stop
from .streaming import TextStream
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
        defaults = {"eos_token_id": self.manifest.eos_token_id, **self.manifest.generation_defaults}
        return GenerationOptions.create(defaults, vocab_size=self.manifest.architecture.vocab_size, **overrides)

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

    def check_context(self, rows: list[list[int]], max_new_tokens: int) -> None:
        """InvalidInputError if the longest row plus max_new_tokens does not fit the model's context."""
        longest = max(len(row) for row in rows)
        if longest + max_new_tokens > self.context_length:
            over = longest + max_new_tokens - self.context_length
            raise InvalidInputError(
                f"prompt of {counted(longest, 'token')} plus max_new_tokens={max_new_tokens} exceeds the model's "
                f"context of {self.context_length} tokens by {over}",
                option="max_new_tokens",
            )

    def _check_request(self, rows: list[list[int]], config: GenerationOptions) -> None:
        self.check_context(rows, config.max_new_tokens)
        if config.stop and self._tokenizer is None:
            raise InvalidInputError(f"stop strings need a tokenizer, and bundle {self.manifest.folder} has none")

    def generate(self, prompt: PromptInput = None, *, input_ids: IdsInput = None, **options: Any) -> GenerationOutput:
        """Generate from a prompt, a list of prompts, or input_ids (a list of ids, or a list of such lists).

        Options are transformers' GenerationConfig names (max_new_tokens, do_sample, num_beams, ...) plus seed,
        stop (strings that end a sequence and are cut from its text), output_scores and top_logprobs (per-step
        log-probabilities of the chosen tokens and of the N best alternatives).
        """
        config = self.options(**options)
        encoded = self.encode(prompt, input_ids)
        config = config.for_prompt(max(len(row) for row in encoded.rows))
        self._check_request(encoded.rows, config)
        batch = PaddedBatch.from_rows(encoded.rows, self.pad_token_id(config))
        start = time.perf_counter()
        if config.num_beams > 1:
            continuations, steps, prefill_s = self._beam_search(batch, config)
        else:
            continuations, steps, prefill_s = self._sample(batch, config)
        total_s = time.perf_counter() - start
        timing = Timing(
            prefill_ms=prefill_s * 1000,
            decode_ms_per_token=(total_s - prefill_s) * 1000 / (steps - 1) if steps > 1 else 0.0,
            tokens_generated=sum(len(item.tokens) for item in continuations),
        )
        count = config.num_return_sequences
        results = [
            PromptResult(
                text, row, [self._sequence(row, item, config) for item in continuations[i * count : (i + 1) * count]]
            )
            for i, (text, row) in enumerate(zip(encoded.prompts, encoded.rows, strict=True))
        ]
        return GenerationOutput(results, timing)

    def _sample(self, batch: PaddedBatch, config: GenerationOptions) -> tuple[list[Continuation], int, float]:
        """Greedy search or sampling: num_return_sequences rows per prompt, one token per row and step."""
        tokens: list[np.ndarray] = []
        finished: list[np.ndarray] = []
        logprobs: list[StepLogprobs] = []
        start = time.perf_counter()
        prefill_s = 0.0
        for step in self._steps(batch, config, config.num_return_sequences):
            if not tokens:
                prefill_s = time.perf_counter() - start
            tokens.append(step.tokens)
            finished.append(step.finished)
            if config.records_logprobs:
                logprobs.append(step_logprobs(step.scores, step.tokens, config.top_logprobs))
        return row_continuations(tokens, finished, logprobs), len(tokens), prefill_s

    def _beam_search(self, batch: PaddedBatch, config: GenerationOptions) -> tuple[list[Continuation], int, float]:
        prompt_length = batch.input_ids.shape[1]
        pad_lengths = np.repeat(batch.pad_lengths(), config.num_beams)
        processors = build_logits_processors(config, prompt_length, config.eos_token_ids, pad_lengths)
        search = BeamSearch(batch, config, self._stopping(config, prompt_length))
        output = beam_search(self.session, batch, processors, search)
        return output.continuations, output.steps, output.prefill_seconds

    def stream(
        self, prompt: str | None = None, *, input_ids: Sequence[int] | None = None, **options: Any
    ) -> TextStream:
        """Text pieces of one prompt's continuation as tokens arrive (greedy search or sampling), as a TextStream.

        Never splits a UTF-8 character, and never yields text that turns out to belong to a stop string: the pieces
        join to exactly generate(...).text; after the last piece the stream's finish_reason and token_ids are set.
        Arguments are checked at the call, before the first piece is asked for.
        """
        config = self.options(**options)
        if config.num_beams > 1:
            raise InvalidInputError("stream() works with greedy search and sampling, not beam search (num_beams > 1)")
        if config.num_return_sequences > 1:
            raise InvalidInputError("stream() yields one sequence: num_return_sequences must be 1")
        encoded = self.encode(prompt, input_ids)
        if len(encoded.rows) != 1:
            raise InvalidInputError("stream() takes one prompt or one sequence of input_ids, not a batch")
        config = config.for_prompt(len(encoded.rows[0]))
        self._check_request(encoded.rows, config)
        batch = PaddedBatch.from_rows(encoded.rows, self.pad_token_id(config))
        return TextStream(self._steps(batch, config), self.tokenizer.stream_decoder(), config.stop)

    def next_token_probs(
        self, prompt: str | None = None, *, input_ids: Sequence[int] | None = None, top: int = 10
    ) -> list[TokenProbability]:
        """The `top` most likely next tokens after the prompt, with probabilities (softmax of the raw logits)."""
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise InvalidInputError(f"top must be a positive integer, got {top!r}")
        encoded = self.encode(prompt, input_ids)
        if len(encoded.rows) != 1:
            raise InvalidInputError("next_token_probs() takes one prompt")
        self.check_context(encoded.rows, 0)
        batch = PaddedBatch.from_rows(encoded.rows, 0)
        logits, _ = self.session.forward(
            batch.input_ids,
            batch.attention_mask,
            np.arange(batch.input_ids.shape[1])[None],
            self.session.empty_cache(1, capacity=batch.input_ids.shape[1]),
        )
        probabilities = softmax(logits[0, -1].astype(np.float64))
        order = np.argsort(-probabilities, kind="stable")[:top]
        texts = self._tokenizer.token_strings(order.tolist()) if self._tokenizer else [None] * len(order)
        return [TokenProbability(int(i), text, float(probabilities[i])) for i, text in zip(order, texts, strict=True)]

    def _steps(self, batch: PaddedBatch, config: GenerationOptions, repeat: int = 1) -> Iterator[Step]:
        prompt_length = batch.input_ids.shape[1]
        pad_lengths = np.repeat(batch.pad_lengths(), repeat)
        processors = build_logits_processors(config, prompt_length, config.eos_token_ids, pad_lengths)
        choose = Sampler(config.seed) if config.do_sample else greedy_choice
        return token_steps(
            self.session,
            batch,
            repeat,
            config.max_new_tokens,
            processors,
            choose,
            config.eos_token_ids,
            self.pad_token_id(config),
            self._stopping(config, prompt_length),
        )

    def _stopping(self, config: GenerationOptions, prompt_length: int) -> StopStringCriterion | None:
        return StopStringCriterion(self.tokenizer, config.stop, prompt_length) if config.stop else None

    def _sequence(
        self, prompt_ids: list[int], continuation: Continuation, config: GenerationOptions
    ) -> GeneratedSequence:
        tokens = continuation.tokens.tolist()
        text = generated_text = ""
        if self._tokenizer is not None:
            generated_text = self._tokenizer.decode(tokens, skip_special_tokens=True)
            text = self._tokenizer.decode(prompt_ids + tokens, skip_special_tokens=True)
            kept, _ = cut_at_stop(generated_text, config.stop)
            text, generated_text = text[: len(text) - (len(generated_text) - len(kept))], kept
        return GeneratedSequence(
            token_ids=prompt_ids + tokens,
            generated_token_ids=tokens,
            text=text,
            generated_text=generated_text,
            score=continuation.score,
            logprobs=continuation.token_logprobs(),
            finish_reason="stop" if continuation.stopped else "length",
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
    manifest = read_manifest(path, verify_hashes=False)
    if not verify_hashes:
        return _open(manifest, provider, threads)
    # Hashing (hashlib) and loading (onnxruntime) both run without the GIL: check the hashes while loading.
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashes_checked = pool.submit(check_hashes, manifest)
        try:
            model = _open(manifest, provider, threads)
        except Exception:
            hashes_checked.result()  # a damaged file explains a failed load better than the loader's own message
            raise
        hashes_checked.result()
    return model


def _open(manifest: Manifest, provider: str, threads: int | None) -> GPT2Model:
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
