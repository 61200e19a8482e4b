"""The public model object: load a bundle, then generate, stream, score, step a Generator, and look at next-token
probabilities. Every decoding call here is a short driver of runtime/generator.py's Generator."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Manifest, check_hashes, read_manifest
from .errors import BundleError, InvalidInputError, counted
from .generator import Generator
from .onnx_folder import is_onnx_folder, read_onnx_folder
from .options import GenerationOptions
from .outputs import GeneratedSequence, GenerationOutput, PromptResult, ScoreResult, Timing
from .processors import LogitsProcessor, softmax
from .prompts import EncodedPrompts, IdsInput, PromptInput, encode_prompts
from .scoring import PerplexityReport, perplexity, token_logprobs
from .search import Continuation
from .session import DecoderSession
from .stop_strings import cut_at_stop
from .stopping import UserCriterion
from .streaming import TextStream
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenProbability:
    """One row of the next-token table: a token, its text and its probability (softmax of the raw logits)."""

    token_id: int
    token: str | None
    probability: float


class GPT2Model:
    """A loaded bundle. Safe to share between threads: each call (and each Generator) keeps its own state."""

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
            raise InvalidInputError(self._no_tokenizer())
        return self._tokenizer

    def _no_tokenizer(self) -> str:
        return f"bundle {self.manifest.folder} has no tokenizer: pass input_ids, or export with --tokenizer DIR"

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
        arch = self.manifest.architecture
        return encode_prompts(
            self._tokenizer, prompt, input_ids, arch.vocab_size, self.manifest.bos_token_id, self._no_tokenizer()
        )

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

    def generator(
        self,
        *,
        logits_processor: Sequence[LogitsProcessor] = (),
        stopping_criteria: Sequence[UserCriterion] = (),
        **options: Any,
    ) -> Generator:
        """A Generator with these options (generate()'s names and defaults): append_tokens, then generate_next_token
        until is_done(). logits_processor: callables f(input_ids, scores) -> scores applied after the built-in
        processors; stopping_criteria: callables g(input_ids, scores) -> bool per row (True: that row is done)."""
        return self._generator(self.options(**options), logits_processor, stopping_criteria)

    def _generator(
        self,
        config: GenerationOptions,
        logits_processor: Sequence[LogitsProcessor] = (),
        stopping_criteria: Sequence[UserCriterion] = (),
    ) -> Generator:
        return Generator(
            self.session,
            self._tokenizer,
            config,
            pad_token_id=self.pad_token_id(config),
            bos_token_id=self.manifest.bos_token_id,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
        )

    def generate(
        self,
        prompt: PromptInput = None,
        *,
        input_ids: IdsInput = None,
        logits_processor: Sequence[LogitsProcessor] = (),
        stopping_criteria: Sequence[UserCriterion] = (),
        **options: Any,
    ) -> GenerationOutput:
        """Generate from a prompt, a list of prompts, or input_ids (a list of ids, or a list of such lists).

        Options are transformers' GenerationConfig names (max_new_tokens, do_sample, num_beams, ...) plus seed,
        stop (strings that end a sequence and are cut from its text), output_scores and top_logprobs (per-step
        log-probabilities of the chosen tokens and of the N best alternatives); logits_processor and
        stopping_criteria as for generator().
        """
        config = self.options(**options)
        encoded = self.encode(prompt, input_ids)
        config = config.for_prompt(max(len(row) for row in encoded.rows))
        self.check_context(encoded.rows, config.max_new_tokens)
        count = config.num_return_sequences
        continuations: list[Continuation] = [None] * (len(encoded.rows) * count)  # type: ignore[list-item]
        prefill_s = decode_s = 0.0
        steps = 0
        for group in self._step_groups(encoded.rows):
            generator = self._generator(config, logits_processor, stopping_criteria)
            start = time.perf_counter()
            generator.append_tokens([encoded.rows[i] for i in group])
            while not generator.is_done():
                generator.generate_next_token()
            decode_s += time.perf_counter() - start - generator.prefill_seconds
            prefill_s, steps = prefill_s + generator.prefill_seconds, steps + max(0, generator.steps - 1)
            produced = generator.continuations()
            for k, at in enumerate(group):
                continuations[at * count : (at + 1) * count] = produced[k * count : (k + 1) * count]
        timing = Timing(
            prefill_ms=prefill_s * 1000,
            decode_ms_per_token=decode_s * 1000 / steps if steps else 0.0,
            tokens_generated=sum(len(item.tokens) for item in continuations),
        )
        results = [
            PromptResult(
                text, row, [self._sequence(row, item, config) for item in continuations[i * count : (i + 1) * count]]
            )
            for i, (text, row) in enumerate(zip(encoded.prompts, encoded.rows, strict=True))
        ]
        return GenerationOutput(results, timing)

    def _step_groups(self, rows: list[list[int]]) -> list[list[int]]:
        """The prompts that run together: all of them, or, for a graph without position_ids (which numbers positions
        by column and so cannot take left padding), those of each length; each group is a Generator of its own, so
        seeded sampling draws each group's random stream from the seed."""
        if self.session.interface.position_ids:
            return [list(range(len(rows)))]
        groups: dict[int, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(len(row), []).append(index)
        return list(groups.values())

    def stream(
        self,
        prompt: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        logits_processor: Sequence[LogitsProcessor] = (),
        stopping_criteria: Sequence[UserCriterion] = (),
        **options: Any,
    ) -> TextStream:
        """Text pieces of one prompt's continuation as tokens arrive (greedy search or sampling), as a TextStream.

        Never splits a UTF-8 character, and never yields text that turns out to belong to a stop string: the pieces
        join to exactly generate(...).text; after the last piece the stream's finish_reason and token_ids are set.
        Arguments are checked at the call, before the first piece is asked for.
        """
        config = self.options(**options)
        refusal = config.streaming_refusal()
        if refusal:
            raise InvalidInputError(f"stream() {refusal}", option="num_beams")
        encoded = self.encode(prompt, input_ids)
        if len(encoded.rows) != 1:
            raise InvalidInputError("stream() takes one prompt or one sequence of input_ids, not a batch")
        config = config.for_prompt(len(encoded.rows[0]))
        self.check_context(encoded.rows, config.max_new_tokens)
        generator = self._generator(config, logits_processor, stopping_criteria)
        generator.append_tokens(encoded.rows)
        return TextStream(generator, self.tokenizer.stream_decoder(), config.stop)

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
        generator = self._generator(GenerationOptions(max_new_tokens=1, eos_token_id=self.manifest.eos_token_id))
        generator.append_tokens(encoded.rows)
        probabilities = softmax(generator.get_logits()[0].astype(np.float64))
        order = np.argsort(-probabilities, kind="stable")[:top]
        texts = self._tokenizer.token_strings(order.tolist()) if self._tokenizer else [None] * len(order)
        return [TokenProbability(int(i), text, float(probabilities[i])) for i, text in zip(order, texts, strict=True)]

    def score(self, text: str | None = None, *, input_ids: Sequence[int] | None = None) -> ScoreResult:
        """Teacher forcing: each token's log-probability under the model given the tokens before it, and the
        perplexity exp(-mean) of those; one text or one list of ids, at least 2 tokens, within the context."""
        encoded = self.encode(text, input_ids)
        if len(encoded.rows) != 1:
            raise InvalidInputError("score() takes one text or one sequence of input_ids, not a batch")
        ids = encoded.rows[0]
        if len(ids) < 2:
            raise InvalidInputError("score() needs at least 2 tokens: the first one has nothing before it")
        self.check_context(encoded.rows, 0)
        logprobs = token_logprobs(self.session, np.asarray(ids, dtype=np.int64))
        return ScoreResult(ids, logprobs.tolist(), float(np.exp(-logprobs.mean())))

    def perplexity(
        self,
        text: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        stride: int | None = None,
        compare: GPT2Model | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> PerplexityReport:
        """The perplexity of a text (or ids) of any length, by transformers' sliding-window method: windows of the
        context's length, `stride` tokens apart (default 512, or the context if it is shorter). compare: a reference
        model (e.g. the fp32 bundle of a quantised one) whose distributions at the same positions are measured
        against this model's (KL divergence, top-1 agreement, max |logits difference|). progress(done, total) is
        told each window."""
        stride = min(512, self.context_length) if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= self.context_length:
            raise InvalidInputError(
                f"stride must be from 1 to the context's {self.context_length} tokens, got {stride!r}", option="stride"
            )
        encoded = self.encode(text, input_ids)
        if len(encoded.rows) != 1:
            raise InvalidInputError("perplexity() takes one text or one sequence of input_ids, not a batch")
        ids = np.asarray(encoded.rows[0], dtype=np.int64)
        if len(ids) < 2:
            raise InvalidInputError("perplexity() needs at least 2 tokens: the first one has nothing before it")
        reference = None
        if compare is not None:
            if compare.manifest.architecture.vocab_size != self.manifest.architecture.vocab_size:
                raise InvalidInputError(
                    f"the compared models' vocabularies differ ({self.manifest.architecture.vocab_size} and "
                    f"{compare.manifest.architecture.vocab_size} tokens)"
                )
            if compare.context_length != self.context_length:
                raise InvalidInputError(
                    f"the compared models' contexts differ ({self.context_length} and {compare.context_length} tokens)"
                )
            reference = compare.session
        return perplexity(self.session, ids, stride, reference, progress)

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


def load(
    path: str | Path,
    provider: str = "auto",
    verify_hashes: bool = True,
    threads: int | None = None,
    onnx_file: str | None = None,
) -> GPT2Model:
    """Load a bundle folder written by export-gpt2, checking its manifest, sizes and (by default) hashes; or a GPT-2
    ONNX export made elsewhere (an optimum or transformers.js folder), as it is.

    provider: 'auto' (CUDA when usable, else CPU), 'cpu' or 'cuda' (an error if CUDA cannot be used).
    verify_hashes=False skips the sha256 check of the files (sizes are still checked).
    onnx_file: which graph of an optimum or transformers.js folder to run (e.g. 'onnx/model_quantized.onnx'; default
    model.onnx, else decoder_model_merged.onnx).
    """
    if is_onnx_folder(Path(path)):
        return _open(read_onnx_folder(path, onnx_file), provider, threads)
    if onnx_file is not None:
        raise InvalidInputError(
            f"{path} is not an optimum or transformers.js folder (config.json and a graph): onnx_file picks a graph "
            "of those only",
            option="onnx_file",
        )
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
    if session.interface.past_dtype != manifest.dtype:  # a folder made elsewhere: its graph tells
        manifest = dataclasses.replace(manifest, dtype=session.interface.past_dtype)
    return GPT2Model(manifest, session, tokenizer)
