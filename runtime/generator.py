"""The Generator: the one decode loop, opened up; the caller owns the `while` (onnxruntime-genai's verbs).

    gen = model.generator(max_new_tokens=30, do_sample=True, seed=0)
    gen.append_tokens("Artificial intelligence")
    while not gen.is_done():
        gen.generate_next_token()
        print(gen.get_next_tokens())

State: rows of token ids with their attention mask and position ids (left padding, as transformers pads a batch),
the session's key/value cache, and the tokens appended or chosen but not yet run through the model (`pending`). A
step runs the pending tokens (the whole prompt at first, later the one chosen token), applies the processors to
the last position's logits, chooses a token per row and checks which rows end. The model runs lazily, at the start
of the next step (or get_logits()), so the last token of a generation is never run for nothing.

Search strategies over that state: greedy search and sampling (a SamplerChain per generator), and beam search
(BeamSearch), which reorders the rows of the cache after every step. generate(), stream(), next_token_probs() and
the server are drivers of this class.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .beam_search import BeamSearch, CacheRows
from .cache import KVCache
from .errors import InvalidInputError, counted
from .options import GenerationOptions
from .processors import LogitsProcessor, LogitsProcessorChain, build_logits_processors, log_softmax
from .prompts import EncodedPrompts, check_ids, encode_prompts, id_rows, is_text
from .search import Continuation, Sampler, SamplerChain, StepLogprobs, greedy_choice, is_eos, step_logprobs
from .session import DecoderSession
from .stop_strings import StopStringCriterion
from .stopping import Criterion, UserCriteria, UserCriterion, combined
from .tokenizer import Tokenizer

NO_TOKENIZER = "this model has no tokenizer: append token ids"


class Generator:
    """A batch of rows decoded step by step. Not thread-safe: one generator per thread (a model is shared)."""

    def __init__(
        self,
        session: DecoderSession,
        tokenizer: Tokenizer | None,
        options: GenerationOptions,
        *,
        pad_token_id: int,
        bos_token_id: int | None,
        logits_processor: Sequence[LogitsProcessor] = (),
        stopping_criteria: Sequence[UserCriterion] = (),
    ) -> None:
        if options.stop and tokenizer is None:
            raise InvalidInputError("stop strings need a tokenizer, and this model has none", option="stop")
        self.options = options
        self._session = session
        self._tokenizer = tokenizer
        self._pad, self._bos = pad_token_id, bos_token_id
        self._vocab, self._context = session.architecture.vocab_size, session.architecture.n_positions
        self._user_processors = tuple(logits_processor)
        self._user_criteria = UserCriteria(stopping_criteria) if stopping_criteria else None
        self._eos = np.asarray(options.eos_token_ids, dtype=np.int64)
        self._copies = options.num_beams if options.num_beams > 1 else options.num_return_sequences
        self._beams: BeamSearch | None = None  # the beam search, once its prompts are known
        self._cache_rows: CacheRows | None = None
        self._chain: SamplerChain | None = None
        self._criterion: Criterion | None = None
        self._cache: KVCache | None = None
        self._rows = 0
        self._width = 0  # positions written (left padding included): token_count
        self._cached = 0  # positions whose keys and values are in the cache; [cached, width) are pending
        self._turn_start = 0  # width after the latest append_tokens: max_new_tokens counts from here
        self._prompt_rows = 0  # before the first run: rows to run once and copy `self._copies` times
        self._logits: np.ndarray | None = None  # [rows, vocab] at each row's last position, once run
        self._forced: np.ndarray | None = None  # set_logits(): used by the next step instead
        self._last: np.ndarray | None = None
        self._records: list[StepLogprobs] = []
        self._finished = self._stopped = np.zeros(0, dtype=bool)
        self._ended_at = np.zeros(0, dtype=np.int64)  # per row: the width when it ended, -1 while it runs
        self._any_finished = False
        self._done = False
        self._records_logprobs = False
        self._in_batch = False  # a DecodeBatch holds this generator's cache and runs its model steps
        self.prefill_seconds = 0.0  # the first run of the model (the prompt), for generate()'s timing
        self.steps = 0  # generate_next_token() calls since the latest append_tokens

    # --- state -----------------------------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Rows being decoded: prompts x num_return_sequences, or prompts x num_beams for beam search."""
        return self._rows

    @property
    def token_count(self) -> int:
        """Positions per row so far, prompt included (for one row: len(get_sequence(0)); a batch counts its left
        padding)."""
        return self._width

    @property
    def final_token_count(self) -> int:
        """The most positions per row this turn can reach: token_count once every row has run to max_new_tokens
        (or to the end of the context)."""
        return min(self._context, self._turn_start + self.options.max_new_tokens)

    def is_done(self) -> bool:
        """Whether every row has finished (EOS, a stop string or criterion, max_new_tokens, or the context's end)."""
        return self._done

    def get_next_tokens(self) -> np.ndarray:
        """The token each row chose at the last step, np.int64 [rows] (a finished row gets the pad token; beam
        search: each running beam's, [prompts x num_beams])."""
        if self._last is None:
            raise InvalidInputError("no token has been generated yet: call generate_next_token() first")
        return self._last.copy()

    def get_sequence(self, index: int) -> np.ndarray:
        """Row `index`'s ids so far, prompt included, without padding. Beam search: the index-th returned sequence
        (prompt by prompt, num_return_sequences each, best first): a finished hypothesis once done, else a running
        beam."""
        if self._beams is not None:
            return self._beam_sequence(index)
        self._check_index(index, self._rows, "row")
        end = self._end_of(index)
        return self._ids[index, :end][self._mask[index, :end] == 1].copy()

    def get_logits(self) -> np.ndarray:
        """float32 [rows, vocab]: the raw logits at each row's last position (the pending tokens are run first); for
        beam search, of each running beam."""
        return self._current_logits().copy()

    def set_logits(self, logits: Any) -> None:
        """The next step chooses from these [rows, vocab] scores instead of the model's logits (the processors and
        the choice apply to them as usual)."""
        forced = np.asarray(logits, dtype=np.float32)
        expected = (self._rows, self._vocab)
        if forced.shape != expected:
            raise InvalidInputError(f"set_logits needs an array of shape {expected}, got {forced.shape}")
        self._need_tokens()
        self._forced = forced.copy()

    def get_logprobs(self) -> StepLogprobs:
        """The last step's log-probabilities under the processed scores (greedy search or sampling, with
        output_scores or top_logprobs): of each row's chosen token [rows], and the top_logprobs best alternatives,
        ids and values [rows, top_logprobs] (None when top_logprobs is 0)."""
        if not self._records_logprobs:
            raise InvalidInputError("log-probabilities are recorded with output_scores=True or top_logprobs > 0")
        if not self._records:
            raise InvalidInputError("no token has been generated yet: call generate_next_token() first")
        return self._records[-1]

    def finish_reasons(self) -> list[str | None]:
        """Per row: None while it runs, 'stop' (EOS, a stop string or criterion) or 'length' once it ended."""
        return [
            None if not finished else "stop" if stopped else "length"
            for finished, stopped in zip(self._finished.tolist(), self._stopped.tolist(), strict=True)
        ]

    # --- input -----------------------------------------------------------------------------------------------------

    def append_tokens(self, tokens: Any) -> None:
        """The prompt, on a fresh generator: a list of ids, a list of id lists (one per prompt; lengths may differ:
        left-padded), a text, or a list of texts. Later, more input after the generated tokens (a chat turn): one
        list of ids or text for every row, or one per row; only the new tokens run through the model (the cache is
        kept), finished rows go on, and max_new_tokens counts again from here."""
        if self._rows == 0:
            self._start(tokens)
            return
        if self._in_batch:
            raise InvalidInputError("a generator in a DecodeBatch takes no more input")
        if self._beams is not None:
            raise InvalidInputError("beam search takes its prompt once: append_tokens after the first is not supported")
        rows = self._rows_of(tokens)
        if len(rows) == 1 and self._rows > 1:
            rows = rows * self._rows
        if len(rows) != self._rows:
            raise InvalidInputError(f"append_tokens got {len(rows)} rows for a generator of {self._rows}")
        if any(not row for row in rows):
            raise InvalidInputError("append_tokens got an empty row: every row needs at least one token")
        for row in np.flatnonzero(self._ended_at >= 0):  # the pads a finished row was fed drop out of its past
            self._mask[row, self._ended_at[row] : self._width] = 0
        longest = max(map(len, rows))
        if self._width + longest >= self._context:
            raise InvalidInputError(
                f"appending {counted(longest, 'token')} to {self._width} would reach the end of the model's context "
                f"of {self._context} tokens, with no room to generate"
            )
        self._write_rows(rows, longest)
        self._finished = np.zeros(self._rows, dtype=bool)
        self._stopped = np.zeros(self._rows, dtype=bool)
        self._ended_at = np.full(self._rows, -1)
        self._any_finished = self._done = False
        self._prepare_ahead()
        self._begin_turn()

    def rewind_to(self, length: int) -> None:
        """Keep the first `length` tokens (prompt included) and drop the rest, their cache included, so that the
        next step continues from there (one row, greedy search or sampling)."""
        if self._beams is not None or self._rows != 1 or self._in_batch:
            raise InvalidInputError(
                f"rewind_to works on a generator of one row (not beam search, not in a batch); this one has "
                f"{self._rows}"
            )
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= self._width:
            raise InvalidInputError(f"rewind_to needs a length from 1 to {self._width} (token_count), got {length!r}")
        if length == self._width:
            return
        self._width = length
        self._cached = min(self._cached, length - 1)  # the last kept token is run again for its logits
        self._cache.truncate(self._cached)
        self._logits = self._forced = None
        self._turn_start = min(self._turn_start, length)
        del self._records[length - self._turn_start :]
        self._last = self._ids[:, length - 1].copy()
        self._finished, self._stopped, self._ended_at = np.zeros(1, dtype=bool), np.zeros(1, dtype=bool), np.full(1, -1)
        self._any_finished = self._done = False
        self._prepare_ahead()

    # --- one step --------------------------------------------------------------------------------------------------

    def generate_next_token(self) -> None:
        """Run the pending tokens, then choose one token per row (processors, then greedy, sampling or a beam step)
        and check which rows end."""
        if self._done:
            raise InvalidInputError(
                "the generator is done: every row has finished (append_tokens or rewind_to to go on)"
            )
        logits = self._current_logits()
        self._forced = None
        self.steps += 1
        if self._beams is not None:
            self._beam_step(logits)
        else:
            self._token_step(logits)

    def _token_step(self, logits: np.ndarray) -> None:
        # Kept to few numpy calls: between two runs of the graph every call starts from cold caches. The mask and
        # positions of the columns ahead are written in advance (_prepare_ahead), so a step writes only the token.
        width = self._width
        tokens, scores = self._chain(self._ids[:, :width], logits)
        if self._any_finished:
            tokens[self._finished] = self._pad
        if width == self._ids.shape[1]:
            self._ensure_room(width + 1)
        self._ids[:, width] = tokens
        self._width = width = width + 1
        self._last = tokens
        if self._records_logprobs:
            self._records.append(step_logprobs(scores, tokens, self.options.top_logprobs))
        ended = is_eos(tokens, self._eos)
        if self._criterion is not None:
            rows = np.flatnonzero(~(self._finished | ended))
            ended[rows] |= self._criterion(self._ids, width, rows, scores)
        if self._any_finished:
            ended &= ~self._finished
        if ended.any():
            self._end_rows(ended, stopped=True)
        if width - self._turn_start >= self.options.max_new_tokens or width >= self._context:
            self._end_rows(~self._finished, stopped=False)  # the length limit (or the context's end)
        if self._chain.accepting:
            self._chain.accept(tokens)

    def _end_rows(self, rows: np.ndarray, stopped: bool) -> None:
        """Rows (bool [rows]) end here: from the next column on they are fed the pad token (attended, as transformers
        feeds it, so that every row's keys run up to the last column; a later turn masks those columns out)."""
        if stopped:
            self._stopped = self._stopped | rows
        self._ended_at[rows & ~self._finished] = self._width
        self._finished = self._finished | rows
        self._any_finished = True
        self._done = bool(self._finished.all())

    def _end_of(self, row: int) -> int:
        """The columns that belong to row's sequence: up to where it ended, or all written."""
        return int(self._ended_at[row]) if self._ended_at[row] >= 0 else self._width

    def _beam_step(self, logits: np.ndarray) -> None:
        beams, rows = self._beams, self._cache_rows
        step = self._width - self._turn_start
        log_probs = self._chain.processors(beams.running_sequences(step), log_softmax(logits))
        parents, tokens, done = beams.advance(log_probs, step)
        self._last = tokens
        if done:
            self._done = True
            return
        self._cache = self._cache.reorder(rows.follow(parents))  # in place, copying only the rows given to children
        self._ensure_room(self._width + 1)
        # The beams' sequences live in the BeamSearch; the rows here only feed each cache row its beam's new token
        # (a prompt's beams share their mask and positions).
        self._ids[rows.of_beam, self._width] = tokens
        self._width += 1

    # --- stepped inside a DecodeBatch (continuous batching: runtime/batching.py) --------------------------------------

    def prefill(self) -> None:
        """Run the pending tokens (the prompts) now, on this generator's own cache."""
        self._current_logits()

    def hand_over(self) -> tuple[KVCache, np.ndarray, np.ndarray]:
        """Give this generator's cache to a DecodeBatch, which runs its model steps from now on (advance()): the
        cache (every position but the pending token's), the attention mask of those positions [rows, length], and each
        row's pending token and its position [rows, 2]. Greedy search or sampling only, after a step."""
        if self._beams is not None or self._last is None or self._in_batch:
            raise InvalidInputError("only a generator that has chosen a token (not beam search) joins a batch")
        if self._cached != self._width - 1:
            raise InvalidInputError("a generator joins a batch with one pending token per row")
        cache, self._cache, self._in_batch = self._cache, None, True
        column = self._width - 1
        pending = np.stack([self._ids[:, column], self._positions[:, column]], axis=1)
        return cache, self._mask[:, :column].copy(), pending

    def advance(self, logits: np.ndarray) -> None:
        """One step whose model run a DecodeBatch made (this generator's pending tokens among other rows): choose
        from these logits [rows, vocab] (rows that ended may hold anything)."""
        self._cached, self._logits = self._width, logits
        self.generate_next_token()

    # --- results, for generate() -----------------------------------------------------------------------------------

    def continuations(self) -> list[Continuation]:
        """What each row generated since the latest append (tokens, why it ended, log-probabilities); beam search:
        the num_return_sequences best hypotheses of each prompt, best first."""
        if self._beams is not None:
            return self._beams.results()
        records = [None, None, None]
        if self._records:
            records = [None if part[0] is None else np.stack(part, axis=1) for part in zip(*self._records, strict=True)]
        found = []
        for row in range(self._rows):
            end = self._end_of(row)
            kept = self._mask[row, self._turn_start : end] == 1
            tokens = self._ids[row, self._turn_start : end][kept]
            length = len(tokens)
            found.append(
                Continuation(
                    tokens,
                    bool(self._stopped[row]),
                    None,
                    *(None if array is None else array[row, :length] for array in records),
                )
            )
        return found

    # --- internals -------------------------------------------------------------------------------------------------

    def _start(self, tokens: Any) -> None:
        """The first append: the prompts, each copied to num_return_sequences (or num_beams) rows once run."""
        encoded = self._encode(tokens)
        options = self.options.for_prompt(max(map(len, encoded.rows)))
        self.options = options
        longest = max(map(len, encoded.rows))
        beams = options.num_beams > 1
        if longest + (options.max_new_tokens if beams else 0) > self._context:
            limit = f" plus max_new_tokens={options.max_new_tokens}" if beams else ""
            raise InvalidInputError(
                f"prompt of {counted(longest, 'token')}{limit} exceeds the model's context of {self._context} tokens",
                option="max_new_tokens",
            )
        self._prompt_rows = len(encoded.rows)
        self._rows = len(encoded.rows) * self._copies
        capacity = min(self._context, longest + options.max_new_tokens)
        self._ids = np.full((self._rows, capacity), self._pad, dtype=np.int64)
        self._mask = np.zeros((self._rows, capacity), dtype=np.int64)
        self._positions = np.zeros((self._rows, capacity), dtype=np.int64)
        self._write_rows([row for row in encoded.rows for _ in range(self._copies)], longest)
        self._stopped = np.zeros(self._rows, dtype=bool)
        self._finished = np.full(self._rows, longest == self._context)  # a full context: logits, but no next token
        self._ended_at = np.where(self._finished, self._width, -1)
        self._any_finished = self._done = longest == self._context
        if beams:
            stopping = combined([self._stop_criterion(longest), self._user_criteria])
            self._beams = BeamSearch(self._ids[:: self._copies, :longest], options, stopping)
            self._cache_rows = CacheRows(self._rows)
        self._records_logprobs = options.records_logprobs and not beams
        self._prepare_ahead()
        self._begin_turn()

    def _begin_turn(self) -> None:
        """max_new_tokens, min_new_tokens and stop strings count from here; the processors are built for it."""
        self._turn_start = self._width
        self._records = []
        self.steps = 0
        options = self.options
        padding = self._mask[:, : self._width] == 0  # the repetition penalty skips padding, as transformers does
        built = build_logits_processors(options, self._width, options.eos_token_ids, padding)
        processors = LogitsProcessorChain([*built, *self._user_processors])
        choose = Sampler(options.seed) if options.do_sample else greedy_choice
        if self._chain is not None and options.do_sample:
            choose = self._chain.choose  # a new turn keeps the random stream
        self._chain = SamplerChain(processors, choose)
        self._criterion = combined([self._stop_criterion(self._width), self._user_criteria])

    def _stop_criterion(self, start: int) -> Criterion | None:
        return StopStringCriterion(self._tokenizer, self.options.stop, start) if self.options.stop else None

    def _encode(self, tokens: Any) -> EncodedPrompts:
        """The prompts of the first append (an empty one starts from the BOS token)."""
        text, ids = (tokens, None) if is_text(tokens) else (None, tokens)
        return encode_prompts(self._tokenizer, text, ids, self._vocab, self._bos, NO_TOKENIZER)

    def _rows_of(self, tokens: Any) -> list[list[int]]:
        """A later append's rows: text (or texts) encoded, ids checked; an empty row stays empty."""
        if is_text(tokens):
            return self._encode(tokens).rows
        rows = id_rows(tokens)
        check_ids(rows, self._vocab)
        return rows

    def _write_rows(self, rows: list[list[int]], length: int) -> None:
        """Each row's new tokens at the same columns, right-aligned: shorter rows get padding (mask 0) before them."""
        start = self._width
        self._ensure_room(start + length)
        counts = self._mask[:, :start].sum(axis=1)
        for index, row in enumerate(rows):
            begin = start + length - len(row)
            self._ids[index, start:begin] = self._pad
            self._mask[index, start:begin] = 0
            self._positions[index, start:begin] = 0
            self._ids[index, begin : start + length] = row
            self._mask[index, begin : start + length] = 1
            self._positions[index, begin : start + length] = counts[index] + np.arange(len(row))
        self._width = start + length

    def _prepare_ahead(self, start: int | None = None) -> None:
        """The columns from `start` (default: width) on, before any token is there: mask 1 (finished rows too: they
        are fed the pad token, attended), and positions that go on from each row's count of tokens."""
        start = self._width if start is None else start
        counts = self._mask[:, :start].sum(axis=1)
        self._mask[:, start:] = 1
        self._positions[:, start:] = counts[:, None] + np.arange(self._ids.shape[1] - start)

    def _ensure_room(self, width: int) -> None:
        """Columns for `width` positions in the row buffers (doubling, up to the context)."""
        capacity = self._ids.shape[1]
        if width <= capacity:
            return
        grown = min(self._context, max(width, 2 * capacity))
        for name in ("_ids", "_mask", "_positions"):
            old = getattr(self, name)
            new = np.full((self._rows, grown), self._pad if name == "_ids" else 0, dtype=np.int64)
            new[:, :capacity] = old
            setattr(self, name, new)
        self._prepare_ahead(capacity)

    def _need_tokens(self) -> None:
        if self._rows == 0:
            raise InvalidInputError("the generator has no tokens yet: call append_tokens() first")

    def _check_index(self, index: int, count: int, what: str) -> None:
        self._need_tokens()
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < count:
            raise InvalidInputError(f"{what} index must be from 0 to {count - 1}, got {index!r}")

    def _current_logits(self) -> np.ndarray:
        """The last position's logits of every row (beam order for beams), running the pending tokens first."""
        if self._rows == 0:
            self._need_tokens()
        if self._cached < self._width:
            if self._in_batch:
                raise InvalidInputError("this generator is stepped by a DecodeBatch: the batch runs its model steps")
            self._run_pending()
        if self._forced is not None:
            return self._forced
        if self._cache_rows is not None:
            return self._logits[self._cache_rows.of_beam]
        return self._logits

    def _run_pending(self) -> None:
        session, start, end = self._session, self._cached, self._width
        first = self._cache is None
        begun = time.perf_counter() if first else 0.0
        if first and self._copies > 1:  # run each prompt once, then copy its cache to its rows
            prompts = slice(None, None, self._copies)
            self._cache = session.empty_cache(self._prompt_rows, capacity=self._ids.shape[1])
            logits, self._cache = session.forward(
                self._ids[prompts, :end], self._mask[prompts, :end], self._positions[prompts, :end], self._cache
            )
            copies = np.repeat(np.arange(self._prompt_rows), self._copies)
            self._cache = self._cache.select(copies)
            self._logits = logits[copies, -1]
        else:
            if first:
                self._cache = session.empty_cache(self._rows, capacity=self._ids.shape[1])
            ids, positions = self._ids[:, start:end], self._positions[:, start:end]
            mask = self._mask[:, :end]
            if end - start > 1 and start > 0 and self._rows > 1 and session.cache_kind == "preallocated":
                self._logits = self._run_rows_alone(ids, mask, positions)
            else:
                logits, self._cache = session.forward(ids, mask, positions, self._cache)
                self._logits = logits[:, -1]
        self._cached = end
        if first:
            self.prefill_seconds = time.perf_counter() - begun

    def _run_rows_alone(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Several new tokens on top of a past, in a batch: GroupQueryAttention takes that at batch 1 only, so each
        row runs alone, into its own row of the shared cache."""
        self._cache.ensure_capacity(mask.shape[1], self._context)  # the rows write into these buffers
        logits = []
        for row in range(self._rows):
            view = slice(row, row + 1)
            step, _ = self._session.forward(ids[view], mask[view], positions[view], self._cache.row(row))
            logits.append(step[0, -1])
        self._cache.length = mask.shape[1]
        return np.stack(logits)

    def _beam_sequence(self, index: int) -> np.ndarray:
        beams, per_prompt = self._beams, self.options.num_return_sequences
        self._check_index(index, beams.batch * per_prompt, "sequence")
        prompt, rank = divmod(int(index), per_prompt)
        prompt_ids = self.get_prompt(prompt)
        if self._done:
            generated = beams.results()[index].tokens
        else:
            step = self._width - self._turn_start
            generated = beams.running["sequences"][prompt, rank, beams.prompt_length : beams.prompt_length + step]
        return np.concatenate([prompt_ids, generated]).astype(np.int64)

    def get_prompt(self, index: int) -> np.ndarray:
        """Prompt `index`'s ids (as given, without padding)."""
        row = index * self._copies
        width = self._beams.prompt_length if self._beams is not None else self._turn_start
        return self._ids[row, :width][self._mask[row, :width] == 1].copy()
