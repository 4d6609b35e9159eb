"""A round's accepted updates as the aggregator hands them to a strategy: rows of one matrix.

:class:`RoundUpdates` is a ``Sequence[ClientUpdate]``, so every strategy (including one written by a
user that reads ``update.weights``) works on it unchanged; the weights of each update are views of
its row, made on first access. The built-in strategies take the faster road through
:func:`update_rows`, which gives the kernels the rows themselves (a
:class:`~enclaveml.fl.strategies._update_matrix.MatrixRows`: one BLAS call per run of rows), and
use the squared norms of the deltas that the aggregator already computed while each upload arrived
(so clipping at round close does not read every update once more).

``owned`` says the rows are the aggregator's scratch for this round, dropped after aggregation:
a strategy may overwrite them (norm clipping scales the deltas in place instead of copying them,
which at 100 clients x 10M parameters would be another 4 GB).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import overload

import numpy as np

from enclaveml.fl.strategies._update_matrix import MatrixRows
from enclaveml.fl.strategy import ClientUpdate, Weights

__all__ = ["RoundUpdates", "delta_norms_of", "example_counts", "select_rows", "update_rows"]


class RoundUpdates(Sequence[ClientUpdate]):
    """Accepted updates whose weights are the rows of ``rows``, with their delta norms."""

    def __init__(
        self,
        rows: MatrixRows,
        client_ids: Sequence[str],
        num_examples: Sequence[int],
        metrics: Sequence[Mapping[str, float]],
        delta_sq_norms: np.ndarray,
        *,
        owned: bool,
    ) -> None:
        n = len(rows)
        if not len(client_ids) == len(num_examples) == len(metrics) == len(delta_sq_norms) == n:
            raise ValueError("RoundUpdates needs one id, example count, metrics and norm per row")
        self.rows = rows
        self.client_ids = list(client_ids)
        self.num_examples = list(num_examples)
        self.metrics = list(metrics)
        self.delta_sq_norms = np.asarray(delta_sq_norms, dtype=np.float64)
        self.owned = owned

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> ClientUpdate: ...

    @overload
    def __getitem__(self, index: slice) -> RoundUpdates: ...

    def __getitem__(self, index: int | slice) -> ClientUpdate | RoundUpdates:
        if isinstance(index, slice):
            return self.select(range(len(self))[index])
        i = range(len(self))[index]
        return ClientUpdate(self.client_ids[i], self.rows[i], self.num_examples[i], self.metrics[i])

    def select(self, positions: Sequence[int]) -> RoundUpdates:
        """The updates at ``positions``, in that order (rows are shared, not copied)."""
        return RoundUpdates(
            self.rows.select(positions),
            [self.client_ids[p] for p in positions],
            [self.num_examples[p] for p in positions],
            [self.metrics[p] for p in positions],
            self.delta_sq_norms[list(positions)],
            owned=self.owned,
        )

    def with_norms(self, delta_sq_norms: np.ndarray) -> RoundUpdates:
        """The same rows with new delta norms (after a strategy scaled the deltas in place)."""
        return RoundUpdates(
            self.rows, self.client_ids, self.num_examples, self.metrics, delta_sq_norms, owned=self.owned
        )


def update_rows(updates: Sequence[ClientUpdate]) -> Sequence[Weights]:
    """The weights of ``updates`` for the kernels: the matrix rows themselves where there are some."""
    if isinstance(updates, RoundUpdates):
        return updates.rows
    return [u.weights for u in updates]


def select_rows(rows: Sequence[Weights], positions: Sequence[int]) -> Sequence[Weights]:
    """``[rows[p] for p in positions]``, keeping a :class:`MatrixRows` one (no copy either way)."""
    if isinstance(rows, MatrixRows):
        return rows.select(positions)
    return [rows[p] for p in positions]


def delta_norms_of(updates: Sequence[ClientUpdate]) -> np.ndarray | None:
    """The squared delta norms the aggregator computed on arrival, if ``updates`` carries them."""
    return updates.delta_sq_norms if isinstance(updates, RoundUpdates) else None


def example_counts(updates: Sequence[ClientUpdate]) -> np.ndarray:
    """Each update's ``num_examples`` as float64 (without touching the weights)."""
    counts = updates.num_examples if isinstance(updates, RoundUpdates) else [u.num_examples for u in updates]
    return np.array(counts, dtype=np.float64)
