"""FedAdam: Adam on the server's pseudo-gradient (see :mod:`._server_optimizer` for the update)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from enclaveml.fl.strategies._server_optimizer import ServerOptimizer

__all__ = ["FedAdam"]


class FedAdam(ServerOptimizer):
    """``v ← β2·v + (1-β2)·Δ²``: an exponential average of the squared pseudo-gradient.

    Hyperparameters (keyword-only): ``eta`` (server learning rate, 0.1), ``beta_1`` (0.9),
    ``beta_2`` (0.99), ``tau`` (adaptivity, 1e-3).
    """

    name: ClassVar[str] = "fedadam"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v *= self.beta_2
        v += (1.0 - self.beta_2) * delta_sq
