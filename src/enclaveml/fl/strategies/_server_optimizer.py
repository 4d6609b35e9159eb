"""The common part of FedAdam and FedYogi (Reddi et al., "Adaptive Federated Optimization", 2021).

Each round the server treats the example-weighted mean change of the clients as a pseudo-gradient
``Δ = mean(w_i) - w`` and takes an adaptive step

    m ← β1·m + (1-β1)·Δ
    v ← (FedAdam) β2·v + (1-β2)·Δ²   or   (FedYogi) v - (1-β2)·Δ²·sign(v - Δ²)
    w ← w + η·m / (√v + τ)

with ``m = 0`` and ``v = τ²`` before the first round, as in the paper (no bias correction).
``τ`` bounds the step where ``v`` is small, so it is the "adaptivity" knob.

``m`` and ``v`` are the only state; :meth:`state` / :meth:`load_state` checkpoint them (keys
``m/<k>``, ``v/<k>`` per array and ``rounds``), so an aggregator that restarts continues the same
trajectory. Integer and bool arrays (e.g. BatchNorm's ``num_batches_tracked``) are the
coordinate-wise median over the updates, as in FedAvg (:mod:`._discrete`), and have no optimizer
state.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategies._common import check_number, require_updates
from enclaveml.fl.strategies._discrete import discrete_medians
from enclaveml.fl.strategies._kernels import cast_like, weighted_sum
from enclaveml.fl.strategies._round_updates import example_counts, update_rows
from enclaveml.fl.strategy import ClientUpdate, Strategy, Weights

__all__ = ["ServerOptimizer"]


class ServerOptimizer(Strategy):
    """Adaptive server optimizer on the pseudo-gradient; subclasses define the second moment."""

    def __init__(
        self, *, eta: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        self.eta = check_number(f"{self.name} eta", eta, low=0.0, low_open=True)
        self.beta_1 = check_number(f"{self.name} beta_1", beta_1, low=0.0, high=1.0)
        self.beta_2 = check_number(f"{self.name} beta_2", beta_2, low=0.0, high=1.0)
        self.tau = check_number(f"{self.name} tau", tau, low=0.0, low_open=True)
        self._m: Weights | None = None
        self._v: Weights | None = None
        self._rounds = 0

    @abstractmethod
    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        """Update ``v`` in place from ``Δ²`` (FedAdam's or FedYogi's rule)."""

    def aggregate_train(
        self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]
    ) -> Weights:
        """One adaptive step from ``global_weights`` along the mean pseudo-gradient of ``updates``."""
        require_updates(self.name, updates)
        counts = example_counts(updates)
        rows = update_rows(updates)
        means = weighted_sum(rows, counts / counts.sum(), global_weights)
        medians = discrete_medians(rows, global_weights)
        if self._m is None or self._v is None:
            self._m = [np.zeros(g.shape, _state_dtype(g)) for g in global_weights]
            self._v = [np.full(g.shape, self.tau**2, _state_dtype(g)) for g in global_weights]
        self._check_state(global_weights)
        # State kept by an older enclaveml in float16 (checkpoints) continues in float32, and moments
        # that already overflowed there (v = inf froze the weight) start again from m = 0, v = tau**2.
        self._m = [
            m.astype(_state_dtype(g), copy=False) for m, g in zip(self._m, global_weights, strict=True)
        ]
        self._v = [
            v.astype(_state_dtype(g), copy=False) for v, g in zip(self._v, global_weights, strict=True)
        ]
        for m, v in zip(self._m, self._v, strict=True):
            broken = ~(np.isfinite(m) & np.isfinite(v))
            if broken.any():
                m[broken], v[broken] = 0.0, self.tau**2
        new: Weights = []
        for j, (g, mean, m, v) in enumerate(zip(global_weights, means, self._m, self._v, strict=True)):
            mean = mean.reshape(g.shape)
            if j in medians:
                new.append(medians[j])  # counters and masks: no pseudo-gradient, no state
                continue
            delta = np.subtract(mean, g, dtype=m.dtype)
            m *= self.beta_1
            m += (1.0 - self.beta_1) * delta
            self._second_moment(v, np.square(delta))
            new.append(g + self.eta * m / (np.sqrt(v) + self.tau))
        self._rounds += 1
        return cast_like(new, global_weights)

    def plan(self) -> dict[str, Any]:
        """Name, ``eta``, ``beta_1``, ``beta_2`` and ``tau``."""
        return {
            "name": self.name,
            "eta": self.eta,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "tau": self.tau,
        }

    def state(self) -> dict[str, np.ndarray]:
        """Copies of ``m`` and ``v`` per array and the number of rounds taken (empty before the first)."""
        if self._m is None or self._v is None:
            return {}
        out = {"rounds": np.array(self._rounds, dtype=np.int64)}
        for k, (m, v) in enumerate(zip(self._m, self._v, strict=True)):
            out[f"m/{k}"], out[f"v/{k}"] = m.copy(), v.copy()
        return out

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state`'s output; shapes are checked against the model at the next round."""
        if not state:
            self._m = self._v = None
            self._rounds = 0
            return
        count = sum(1 for key in state if key.startswith("m/"))
        expected = {"rounds", *(f"m/{k}" for k in range(count)), *(f"v/{k}" for k in range(count))}
        if set(state) != expected:
            raise ConfigurationError(
                f"{self.name} state must have the keys rounds, m/<k> and v/<k>; got {sorted(state)}"
            )
        self._m = [np.array(state[f"m/{k}"], copy=True) for k in range(count)]
        self._v = [np.array(state[f"v/{k}"], copy=True) for k in range(count)]
        self._rounds = int(state["rounds"])

    def _check_state(self, global_weights: Weights) -> None:
        assert self._m is not None
        assert self._v is not None
        if len(self._m) != len(global_weights) or any(
            m.shape != g.shape or v.shape != g.shape
            for m, v, g in zip(self._m, self._v, global_weights, strict=False)
        ):
            raise ConfigurationError(f"{self.name} state does not match the model's layout (another model?)")


def _state_dtype(array: np.ndarray) -> np.dtype:
    """Moments in the model's float dtype, at least float32; float64 for non-float arrays.

    Not float16: the second moment squares a change, and float16 overflows past 256 (65504), so
    one large step (one participant's, or an honest BatchNorm statistic's) would leave ``v`` at
    infinity and freeze that weight for the rest of the run, checkpoints included.
    """
    if array.dtype.kind == "f":
        return np.promote_types(array.dtype, np.float32)
    return np.dtype(np.float64)
