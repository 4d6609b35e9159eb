"""FedYogi: Yogi on the server's pseudo-gradient (see :mod:`._server_optimizer` for the update)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from enclaveml.fl.strategies._server_optimizer import ServerOptimizer

__all__ = ["FedYogi"]


class FedYogi(ServerOptimizer):
    """``v ← v - (1-β2)·Δ²·sign(v - Δ²)``: ``v`` moves towards ``Δ²`` by an additive step.

    Unlike Adam's multiplicative decay, ``v`` cannot collapse after a few large pseudo-gradients,
    which makes the effective step size change more slowly (Zaheer et al., 2018). Same
    hyperparameters as :class:`~enclaveml.fl.strategies.FedAdam`.
    """

    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v -= (1.0 - self.beta_2) * delta_sq * np.sign(v - delta_sq)
