"""Beam search and beam sampling, step for step as transformers 5.x `GenerationMixin._beam_search`: a search
strategy over the Generator's rows (runtime/generator.py runs the model; this chooses and reorders the beams).

Vectorised over prompts and beams like transformers: each step keeps the best (or, sampling, a random draw of)
K = max(2, 1 + number of EOS ids) * num_beams continuations of all beams, continues the best num_beams of them that
did not just end, and merges those that ended (EOS, a stop string, or the length limit) among the top num_beams
into the finished hypotheses, scored sum_logprobs / generated_length ** length_penalty. Scores are float32 and
every -1e9 mask is added in transformers' order, so rankings agree with it; exact ties go to the lower index
(torch.topk leaves their order unspecified).
"""

from __future__ import annotations

import numpy as np

from .options import GenerationOptions
from .processors import top_k
from .search import Continuation, Sampler, is_eos
from .stopping import Criterion

NEG = np.float32(-1.0e9)
History = dict[str, np.ndarray]  # per-beam arrays [batch, beams, ...] that move together with their beam


def _gather(history: History, indices: np.ndarray) -> History:
    """Each array's beams at `indices` [batch, n] (along axis 1)."""
    result = {}
    for name, array in history.items():
        index = indices.reshape(indices.shape + (1,) * (array.ndim - 2))
        result[name] = np.take_along_axis(array, index, axis=1)
    return result


class BeamSearch:
    """The state of a beam search over a batch of prompts; `advance` takes one step's processed log-probabilities."""

    def __init__(self, prompts: np.ndarray, options: GenerationOptions, stopping: Criterion | None = None) -> None:
        """prompts: the padded prompt ids [batch, prompt_length]."""
        self.options = options
        self.batch, self.prompt_length = prompts.shape
        self.beams = options.num_beams
        self.eos = np.asarray(options.eos_token_ids, dtype=np.int64)
        self.keep = max(2, 1 + len(self.eos)) * self.beams
        self.stopping = stopping
        self.sampler = Sampler(options.seed) if options.do_sample else None
        total = self.prompt_length + options.max_new_tokens
        sequences = np.zeros((self.batch, self.beams, total), dtype=np.int64)
        sequences[:, :, : self.prompt_length] = prompts[:, None, :]
        self.running: History = {"sequences": sequences}
        if options.records_logprobs:
            self.running["logprobs"] = np.zeros((self.batch, self.beams, options.max_new_tokens), np.float32)
        if options.top_logprobs:
            shape = (self.batch, self.beams, options.max_new_tokens, options.top_logprobs)
            self.running["top_ids"] = np.zeros(shape, np.int64)
            self.running["top_logprobs"] = np.zeros(shape, np.float32)
        # Only beam 0 starts live, so the first step does not pick the same token from identical beams.
        self.running_scores = np.zeros((self.batch, self.beams), np.float32)
        self.running_scores[:, 1:] = NEG
        self.finished: History = {
            **{name: array.copy() for name, array in self.running.items()},
            "length": np.zeros((self.batch, self.beams), np.int64),
            "stopped": np.zeros((self.batch, self.beams), bool),
            "done": np.zeros((self.batch, self.beams), bool),
        }
        self.finished_scores = np.full((self.batch, self.beams), NEG, np.float32)
        self.improvable = np.ones((self.batch, 1), bool)  # transformers' is_early_stop_heuristic_unsatisfied

    def running_sequences(self, step: int) -> np.ndarray:
        """The running beams' ids so far (prompt included), [batch * beams, prompt_length + step]."""
        return self.running["sequences"][:, :, : self.prompt_length + step].reshape(self.batch * self.beams, -1)

    def advance(self, log_probs: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """One step from processed log-probabilities [batch * beams, vocab].

        Returns the current beams each new beam continues (its parent, which CacheRows maps to a cache row), the new
        beams' tokens (both [batch * beams]), and whether the search is over.
        """
        batch, beams, vocab = self.batch, self.beams, log_probs.shape[-1]
        cur_len = self.prompt_length + step
        flat = log_probs.reshape(batch, beams * vocab)
        totals = (log_probs.reshape(batch, beams, vocab) + self.running_scores[:, :, None]).reshape(batch, -1)
        if self.sampler is not None:
            drawn = self.sampler.without_replacement(totals, self.keep)
            values = np.take_along_axis(totals, drawn, axis=1)
            order = np.argsort(-values, axis=1, kind="stable")
            values, indices = np.take_along_axis(values, order, axis=1), np.take_along_axis(drawn, order, axis=1)
        else:
            values, indices = top_k(totals, self.keep)
        source, tokens = indices // vocab, indices % vocab
        candidates = _gather(self.running, source)
        candidates["sequences"][:, :, cur_len] = tokens
        if self.options.records_logprobs:
            candidates["logprobs"][:, :, step] = np.take_along_axis(flat, indices, axis=1)
        if self.options.top_logprobs:
            best, best_ids = top_k(log_probs, self.options.top_logprobs)
            step_top = {"top_ids": best_ids.reshape(batch, beams, -1), "top_logprobs": best.reshape(batch, beams, -1)}
            for name, array in _gather(step_top, source).items():
                candidates[name][:, :, step] = array
        stopped = is_eos(tokens, self.eos)
        if self.stopping is not None:
            ids = candidates["sequences"].reshape(batch * self.keep, -1)  # a view: _gather made it contiguous
            checked = np.arange(batch * self.keep)
            stopped |= self.stopping(ids, cur_len + 1, checked, None).reshape(batch, self.keep)
        ends = stopped | (cur_len + 1 >= self.prompt_length + self.options.max_new_tokens)

        # Continue with the best num_beams candidates that did not just end.
        live_scores = values + ends.astype(np.float32) * NEG
        _, live = top_k(live_scores, beams)
        self.running = _gather(candidates, live)
        self.running_scores = np.take_along_axis(live_scores, live, axis=1)
        parents = np.take_along_axis(source, live, axis=1) + np.arange(batch)[:, None] * beams

        self._finish(candidates, values, ends, stopped, step)
        self._update_improvable(step)
        go_on = (
            self.improvable.any()
            and not (self.finished["done"].all() and self.options.early_stopping is True)
            and not ends.all()
        )
        return parents.reshape(-1), self.running["sequences"][:, :, cur_len].reshape(-1), not go_on

    def _finish(
        self, candidates: History, values: np.ndarray, ends: np.ndarray, stopped: np.ndarray, step: int
    ) -> None:
        """Merge the candidates among the top num_beams that just ended into the finished hypotheses."""
        just_ended = ends & (np.arange(self.keep) < self.beams)[None, :]
        full = self.finished["done"].all(axis=1, keepdims=True) & (self.options.early_stopping is True)
        if not (just_ended & ~full & self.improvable).any():
            return  # every candidate would score below -1e9, under all finished hypotheses: nothing changes
        scores = values / np.float32((step + 1) ** self.options.length_penalty)
        scores = scores + full.astype(np.float32) * NEG
        scores = scores + (~self.improvable).astype(np.float32) * NEG
        scores = scores + (~just_ended).astype(np.float32) * NEG
        merged_scores = np.concatenate([self.finished_scores, scores], axis=1)
        _, best = top_k(merged_scores, self.beams)
        candidates["length"] = np.full(values.shape, step + 1, np.int64)
        candidates["stopped"] = stopped
        candidates["done"] = just_ended
        merged = {name: np.concatenate([self.finished[name], candidates[name]], axis=1) for name in self.finished}
        self.finished = _gather(merged, best)
        self.finished_scores = np.take_along_axis(merged_scores, best, axis=1)

    def _update_improvable(self, step: int) -> None:
        """transformers' _check_early_stop_heuristic: can a running beam still beat the worst finished one?"""
        # With "never" and a positive length penalty the best score could still come at the full length.
        penalty = self.options.length_penalty
        never = self.options.early_stopping == "never" and penalty > 0.0
        length = self.options.max_new_tokens if never else step + 1
        best_running = self.running_scores[:, :1] / np.float32(length**penalty)
        worst_finished = np.where(
            self.finished["done"], self.finished_scores.min(axis=1, keepdims=True), np.float32(-1.0e9)
        )
        self.improvable &= (best_running > worst_finished).any(axis=-1, keepdims=True)

    def results(self) -> list[Continuation]:
        """The best num_return_sequences finished hypotheses of each prompt, best first, prompt after prompt."""
        found = []
        for row in range(self.batch):
            for rank in range(self.options.num_return_sequences):
                length = int(self.finished["length"][row, rank])
                recorded = {
                    name: self.finished[name][row, rank, :length] if name in self.finished else None
                    for name in ("logprobs", "top_ids", "top_logprobs")
                }
                found.append(
                    Continuation(
                        tokens=self.finished["sequences"][row, rank, self.prompt_length : self.prompt_length + length],
                        stopped=bool(self.finished["stopped"][row, rank]),
                        score=float(self.finished_scores[row, rank]),
                        **recorded,
                    )
                )
        return found


class CacheRows:
    """Which KV cache row holds each beam. When a beam has several children, the first keeps its row and the others
    take the rows of beams that had none, so only those rows are copied (about 1 row a step instead of 3 for five
    beams): the cache's rows are a permutation of the beams, which stays within each prompt's group of rows."""

    def __init__(self, count: int) -> None:
        self.of_beam = np.arange(count)

    def follow(self, parents: np.ndarray) -> np.ndarray:
        """Assign rows to the new beams, children of `parents` (previous beam indices); returns the cache reorder
        (new row r holds old row rows[r]) that puts every new beam's parent cache in its row."""
        parent_rows = self.of_beam[parents]
        _, first = np.unique(parent_rows, return_index=True)
        keeps = np.zeros(len(parents), bool)
        keeps[first] = True
        # Rows no child keeps, ascending, and the other children, in beam order: both run group by group, and a
        # group has as many of one as of the other, so every child lands in a row of its own prompt's group.
        free = np.setdiff1d(np.arange(len(parents)), parent_rows[first], assume_unique=True)
        self.of_beam = parent_rows.copy()
        self.of_beam[~keeps] = free
        rows = np.arange(len(parents))
        rows[free] = parent_rows[~keeps]
        return rows
