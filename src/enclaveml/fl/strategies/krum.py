"""Krum and multi-Krum (Blanchard et al., 2017; El Mhamdi et al., 2018).

Each update is scored by the sum of squared distances to its ``n - f - 2`` nearest neighbours
(``f`` = ``num_malicious``); the ``multi`` lowest-scoring updates are averaged (uniformly: the
example counts are client claims). Why: an update far from the honest cluster has a high score
and is never chosen, provided ``n ≥ 2f + 3``; with ``multi = 1`` the result *is* one honest-looking
update, with larger ``multi`` it averages several and loses less accuracy.

Krum's distances see the float arrays only, so an update close to the others there may carry any
integer or bool arrays: those are the coordinate-wise median over *all* accepted updates, not the
chosen ones (as in every built-in strategy, :mod:`._discrete`).

Distances come from one Gram matrix of the deltas ``w_i - w_global``, computed block by block with
BLAS (see :func:`~enclaveml.fl.strategies._kernels.delta_gram`), not from ``n²`` passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategies._common import require_updates
from enclaveml.fl.strategies._discrete import with_discrete_medians
from enclaveml.fl.strategies._kernels import cast_like, delta_gram, weighted_sum
from enclaveml.fl.strategies._round_updates import select_rows, update_rows
from enclaveml.fl.strategy import ClientUpdate, Strategy, Weights

__all__ = ["Krum", "krum_scores"]


def krum_scores(gram: np.ndarray, num_malicious: int) -> np.ndarray:
    """Each row's sum of squared distances to its ``n - f - 2`` nearest other rows."""
    n = gram.shape[0]
    sq = np.diag(gram)
    distances = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    np.fill_diagonal(distances, np.inf)  # a point is not its own neighbour
    neighbours = n - num_malicious - 2
    scores: np.ndarray = np.sort(distances, axis=1)[:, :neighbours].sum(axis=1)
    return scores


class Krum(Strategy):
    """Multi-Krum: the uniform mean of the ``multi`` updates with the lowest Krum scores."""

    name: ClassVar[str] = "krum"

    def __init__(self, num_malicious: int, *, multi: int = 1) -> None:
        for label, value, low in (("num_malicious", num_malicious, 0), ("multi", multi, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(f"Krum {label} must be an integer >= {low}, got {value!r}")
        self.num_malicious = num_malicious
        self.multi = multi

    @property
    def min_updates(self) -> int:
        """Accepted updates per round: ``2f + 3`` for Krum's guarantee, ``f + multi`` to choose from."""
        return max(2 * self.num_malicious + 3, self.num_malicious + self.multi)

    def select(self, global_weights: Weights, updates: Sequence[ClientUpdate]) -> list[int]:
        """Indices of the chosen updates, best score first (ties: the earlier update)."""
        require_updates(self.name, updates, self.min_updates)
        scores = krum_scores(delta_gram(global_weights, update_rows(updates)), self.num_malicious)
        return [int(i) for i in np.argsort(scores, kind="stable")[: self.multi]]

    def aggregate_train(
        self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]
    ) -> Weights:
        """The uniform mean of the selected updates (integer and bool arrays: median of all)."""
        chosen = sorted(self.select(global_weights, updates))  # row order: consecutive rows stay one run
        coeffs = np.full(len(chosen), 1.0 / len(chosen))
        rows = update_rows(updates)
        mean = weighted_sum(select_rows(rows, chosen), coeffs, global_weights)
        return cast_like(with_discrete_medians(mean, rows, global_weights), global_weights)

    def plan(self) -> dict[str, Any]:
        """Name, ``num_malicious`` and ``multi``."""
        return {"name": self.name, "num_malicious": self.num_malicious, "multi": self.multi}
