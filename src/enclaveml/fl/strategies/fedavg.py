"""FedAvg (McMahan et al., 2017): the next global model is the example-weighted mean of the updates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from enclaveml.fl.strategies._common import require_updates
from enclaveml.fl.strategies._discrete import with_discrete_medians
from enclaveml.fl.strategies._kernels import cast_like, weighted_sum
from enclaveml.fl.strategies._round_updates import example_counts, update_rows
from enclaveml.fl.strategy import ClientUpdate, Strategy, Weights

__all__ = ["FedAvg", "example_weighted_mean"]


def example_weighted_mean(global_weights: Weights, updates: Sequence[ClientUpdate]) -> Weights:
    """``Σ n_i w_i / Σ n_i`` in the accumulator dtype (float32 for float32 models), flat arrays.

    The coefficients are computed in float64 so that a client with many examples does not lose
    the others to rounding.
    """
    counts = example_counts(updates)
    return weighted_sum(update_rows(updates), counts / counts.sum(), global_weights)


class FedAvg(Strategy):
    """Example-weighted average of the participants' float weights.

    Each client's weight is its reported ``num_examples``. That count is not verifiable by the
    aggregator: a participant that lies about it gains influence, so use a robust strategy (or
    :class:`~enclaveml.fl.strategies.NormClipping`) when participants may be malicious.

    Integer and bool arrays (counters, masks) are the coordinate-wise median over the updates,
    each counted once, as in every built-in strategy: no norm rule bounds them, so a mean would
    let one client set them (see :mod:`~enclaveml.fl.strategies._discrete`).
    """

    name: ClassVar[str] = "fedavg"

    def aggregate_train(
        self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]
    ) -> Weights:
        """The example-weighted mean of ``updates``, in ``global_weights``' dtypes and shapes."""
        require_updates(self.name, updates)
        mean = example_weighted_mean(global_weights, updates)
        return cast_like(with_discrete_medians(mean, update_rows(updates), global_weights), global_weights)

    def plan(self) -> dict[str, Any]:
        """``{"name": "fedavg"}``: FedAvg has no hyperparameters on the server."""
        return {"name": self.name}
