"""Stopping criteria: which rows end after this step, beside EOS and the length limit.

Inside the runtime a criterion is called as criterion(sequences, length, rows, scores) -> bool [len(rows)]: sequences
[all rows, capacity] of which the first `length` columns are written (the prompt, left padding included, and the
new token), the rows to check, and the step's processed scores [all rows, vocab] (None for beam candidates). Stop
strings are one such criterion; transformers-style ones (g(input_ids, scores) -> bool [rows], as a
StoppingCriteria) are wrapped by UserCriteria.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Criterion = Callable[[np.ndarray, int, np.ndarray, "np.ndarray | None"], np.ndarray]
UserCriterion = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


class UserCriteria:
    """transformers-style criteria g(input_ids [rows, length], scores) -> bool [rows]; a row stops when any says so."""

    def __init__(self, criteria: Sequence[UserCriterion]) -> None:
        self.criteria = tuple(criteria)

    def __call__(self, sequences: np.ndarray, length: int, rows: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
        input_ids = sequences[:, :length]
        stop = np.zeros(len(sequences), dtype=bool)
        for criterion in self.criteria:
            answer = np.asarray(criterion(input_ids, scores), dtype=bool).reshape(-1)
            if answer.shape != stop.shape:
                raise ValueError(
                    f"a stopping criterion returned {answer.shape[0]} values for {len(sequences)} rows; it must "
                    "return one bool per row of input_ids"
                )
            stop |= answer
        return stop[rows]


class AnyCriterion:
    """Several criteria as one: a row stops when any of them says so."""

    def __init__(self, criteria: Sequence[Criterion]) -> None:
        self.criteria = tuple(criteria)

    def __call__(self, sequences: np.ndarray, length: int, rows: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
        stop = np.zeros(len(rows), dtype=bool)
        for criterion in self.criteria:
            stop |= criterion(sequences, length, rows, scores)
        return stop


def combined(criteria: Sequence[Criterion | None]) -> Criterion | None:
    """One criterion of those given (None for none)."""
    present = [criterion for criterion in criteria if criterion is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else AnyCriterion(present)
