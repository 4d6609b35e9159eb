"""Coordinate-wise trimmed mean (Yin et al., 2018): drop the extremes per parameter, average the rest.

Why: with ``beta`` at least the fraction of malicious clients, every value a malicious client
sends that lies outside the honest range is trimmed away, so the result stays within the range
of the honest values; unlike the median it still averages the middle, which is kinder to honest
heterogeneity. Example counts are ignored (each client counts once). Integer and bool arrays are
the coordinate-wise median, as in every built-in strategy (:mod:`._discrete`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from enclaveml.fl.strategies._common import check_number, require_updates
from enclaveml.fl.strategies._discrete import with_discrete_medians
from enclaveml.fl.strategies._kernels import cast_like, coordinate_reduce
from enclaveml.fl.strategies._round_updates import update_rows
from enclaveml.fl.strategy import ClientUpdate, Strategy, Weights

__all__ = ["TrimmedMean"]


class TrimmedMean(Strategy):
    """Per parameter, the mean after removing the ``floor(beta · n)`` largest and smallest values."""

    name: ClassVar[str] = "trimmed-mean"

    def __init__(self, beta: float) -> None:
        self.beta = check_number("TrimmedMean beta", beta, low=0.0, high=0.5)

    def aggregate_train(
        self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]
    ) -> Weights:
        """The coordinate-wise trimmed mean of the updates' weights (never empty: ``beta < 0.5``)."""
        require_updates(self.name, updates)
        n = len(updates)
        k = math.floor(self.beta * n)

        def trimmed(stacked: np.ndarray, out: np.ndarray) -> None:
            if k:
                stacked.sort(axis=0)  # vectorised; faster than np.partition on two cut points
            np.mean(stacked[k : n - k], axis=0, out=out)

        rows = update_rows(updates)
        means = coordinate_reduce(rows, global_weights, trimmed)
        return cast_like(with_discrete_medians(means, rows, global_weights), global_weights)

    def plan(self) -> dict[str, Any]:
        """Name and ``beta``."""
        return {"name": self.name, "beta": self.beta}
