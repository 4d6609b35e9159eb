"""Norm clipping (Sun et al., 2019, "Can you really backdoor federated learning?").

Every update's change ``d_i = w_i - w_global`` is scaled down to L2 norm at most ``max_norm``
(over all arrays together) before the inner strategy sees it. Why: a boosted (scaled-up)
malicious update then has no more influence than an honest one of norm ``max_norm``, whatever
the inner strategy; honest updates below the bound pass unchanged (and are not copied).

On the aggregator's own rows (:class:`~enclaveml.fl.strategies._round_updates.RoundUpdates` with
``owned``) the norms are those computed as the uploads arrived and the clipped deltas are written
back into the rows: no pass to measure them and no second copy of the round. Anything else is
clipped into new arrays, leaving the caller's arrays alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategies._common import check_number
from enclaveml.fl.strategies._kernels import accumulator_dtype, delta_sq_norms, scale_deltas
from enclaveml.fl.strategies._round_updates import RoundUpdates, delta_norms_of, update_rows
from enclaveml.fl.strategy import ClientUpdate, Strategy, Weights

__all__ = ["NormClipping", "clip_factors"]


def clip_factors(global_weights: Weights, updates: Sequence[ClientUpdate], max_norm: float) -> np.ndarray:
    """Per update, ``min(1, max_norm / ||w_i - w_global||)`` (1 for an unchanged model)."""
    known = delta_norms_of(updates)
    norms = np.sqrt(known if known is not None else delta_sq_norms(global_weights, update_rows(updates)))
    with np.errstate(divide="ignore"):
        factors: np.ndarray = np.minimum(1.0, max_norm / norms)
    return factors


def clipped(global_weights: Weights, update: ClientUpdate, factor: float) -> ClientUpdate:
    """``update`` with weights ``w_global + factor · (w - w_global)`` (itself when ``factor == 1``)."""
    if factor >= 1.0:
        return update
    weights: Weights = []
    for g, w in zip(global_weights, update.weights, strict=True):
        if g.dtype.kind != "f":
            weights.append(w)  # counters are not model directions: left as they are
            continue
        d = np.subtract(w, g, dtype=accumulator_dtype(g.dtype))
        d *= factor
        d += g
        weights.append(d.astype(g.dtype, copy=False))
    return replace(update, weights=weights)


class NormClipping(Strategy):
    """Clip each update's delta to ``max_norm``, then aggregate with ``inner``."""

    name: ClassVar[str] = "norm-clipping"

    def __init__(self, inner: Strategy, max_norm: float) -> None:
        if not isinstance(inner, Strategy):
            raise ConfigurationError("NormClipping inner must be a Strategy")
        self.inner = inner
        self.max_norm = check_number("NormClipping max_norm", max_norm, low=0.0, low_open=True)

    def configure_train(self, server_round: int, global_weights: Weights) -> dict[str, Any]:
        """The inner strategy's configuration (e.g. FedProx's ``proximal_mu``)."""
        return self.inner.configure_train(server_round, global_weights)

    def aggregate_train(
        self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]
    ) -> Weights:
        """``inner.aggregate_train`` on the clipped updates."""
        factors = clip_factors(global_weights, updates, self.max_norm)
        bounded: Sequence[ClientUpdate]
        if isinstance(updates, RoundUpdates) and updates.owned:
            scale_deltas(global_weights, updates.rows, factors)
            bounded = updates.with_norms(updates.delta_sq_norms * np.square(factors))
        else:
            bounded = [clipped(global_weights, u, float(f)) for u, f in zip(updates, factors, strict=True)]
        return self.inner.aggregate_train(server_round, global_weights, bounded)

    def plan(self) -> dict[str, Any]:
        """Name, ``max_norm`` and the inner strategy's plan."""
        return {"name": self.name, "max_norm": self.max_norm, "inner": self.inner.plan()}

    def state(self) -> dict[str, np.ndarray]:
        """The inner strategy's state (clipping itself has none)."""
        return self.inner.state()

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the inner strategy's state."""
        self.inner.load_state(state)
