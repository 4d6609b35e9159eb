"""The one interface every aggregation strategy implements, and the types it exchanges.

Model parameters are framework-neutral: a list of numpy arrays (PyTorch helpers convert
``state_dict`` to and from this form). A strategy has two hooks, as in Flower:
``configure_train`` (what each participant is told for a round: learning rate, proximal term…)
and ``aggregate_train`` (turn the validated updates of a round into the next global model).
Update validation (shapes, dtypes, NaN/Inf, norm outliers) happens *before* aggregation, in
:mod:`enclaveml.fl.validation`, inside the TEE; strategies receive only accepted updates. The norm
rules see float arrays only: integer and bool arrays (counters, masks) are bounded by the
aggregation instead, and every built-in strategy takes their coordinate-wise median (see
:mod:`enclaveml.fl.strategies._discrete`). A strategy of one's own that averages them lets a
single client set them; the aggregator only rounds floats returned for them and refuses values
their dtype cannot hold.

A strategy's :meth:`Strategy.plan` is plain data (name and every hyperparameter) that the
aggregator binds into its attestation evidence, so a participant verifies the rules as well as
the code before it uploads anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

__all__ = ["ClientUpdate", "Strategy", "Weights"]

Weights = list[np.ndarray]


@dataclass(frozen=True)
class ClientUpdate:
    """One participant's result for a round: new local weights (not deltas) and its example count."""

    client_id: str
    weights: Weights
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class Strategy(ABC):
    """Aggregation strategy: stateless across processes except through :meth:`state` / :meth:`load_state`."""

    name: ClassVar[str]

    def configure_train(self, server_round: int, global_weights: Weights) -> dict[str, Any]:
        """Per-round configuration sent to every participant (default: none)."""
        return {}

    @abstractmethod
    def aggregate_train(
        self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]
    ) -> Weights:
        """The next global weights from the accepted updates of ``server_round`` (at least one)."""

    @abstractmethod
    def plan(self) -> dict[str, Any]:
        """Name and every hyperparameter, as JSON-ready plain data (bound into the attestation)."""

    def state(self) -> dict[str, np.ndarray]:
        """Server-side optimizer state to checkpoint (e.g. FedAdam moments); default none."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state` returned, after an aggregator restart (default: nothing to do)."""
