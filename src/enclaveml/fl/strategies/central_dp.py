"""Central differential privacy (DP-FedAvg, McMahan et al., 2018) with opacus' RDP accountant.

Each round, inside the TEE: every client's change ``d_i = w_i - w_global`` is clipped to L2 norm
``clip_norm``; the clipped changes are averaged *uniformly* over the ``n`` accepted clients
(example counts would make one client's influence depend on a private, unverified number);
Gaussian noise of standard deviation ``noise_multiplier · clip_norm / n`` is added to every
coordinate of that mean. That is the Gaussian mechanism with sensitivity ``clip_norm`` on the
sum (one client added or removed), so opacus' ``RDPAccountant`` stepped once per round with
``(noise_multiplier, sample_rate)`` gives the (ε, δ) spent so far; we do not compute it ourselves.
``n`` is treated as public (it is the plan's cohort less the rejected clients).

Only the noisy mean reaches the inner strategy, as a single update; FedAvg/FedProx then return
``w_global + noisy mean``, FedAdam/FedYogi take their adaptive step on it (post-processing, no
extra privacy cost). Robust aggregators have nothing to choose from after averaging and are
refused. Non-float arrays (counters such as ``num_batches_tracked``) keep their global value:
they are not released.

``sample_rate`` is 1.0 (every client takes part in every round). Set it lower only if the
aggregator really samples each client independently with that probability: the accountant's
amplification by subsampling assumes it.

``seed`` fixes the noise for tests. Never set it in deployment: after a restart the same noise
would be drawn again. Without it, each round's generator is seeded from ``os.urandom``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategies._common import check_number, require_updates
from enclaveml.fl.strategies._kernels import cast_like, weighted_sum
from enclaveml.fl.strategies._round_updates import update_rows
from enclaveml.fl.strategies._server_optimizer import ServerOptimizer
from enclaveml.fl.strategies.clipping import clip_factors
from enclaveml.fl.strategies.fedavg import FedAvg
from enclaveml.fl.strategy import ClientUpdate, Strategy, Weights

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant  # type: ignore[import-untyped]

__all__ = ["CentralDP"]

_HISTORY_KEY = "dp/history"


def _new_accountant() -> RDPAccountant:
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            "CentralDP needs opacus for privacy accounting: pip install 'opacus>=1.5'"
        ) from exc
    return RDPAccountant()


class CentralDP(Strategy):
    """Clip, average uniformly, add Gaussian noise; account the privacy spent with opacus (RDP)."""

    name: ClassVar[str] = "central-dp"

    def __init__(
        self,
        inner: Strategy,
        clip_norm: float,
        noise_multiplier: float,
        delta: float,
        seed: int | None = None,
        *,
        sample_rate: float = 1.0,
    ) -> None:
        if not isinstance(inner, FedAvg | ServerOptimizer):
            raise ConfigurationError(
                "CentralDP's inner strategy receives one noisy mean: use FedAvg, FedProx, FedAdam or FedYogi"
            )
        self.inner = inner
        self.clip_norm = check_number("CentralDP clip_norm", clip_norm, low=0.0, low_open=True)
        self.noise_multiplier = check_number(
            "CentralDP noise_multiplier", noise_multiplier, low=0.0, low_open=True
        )
        self.delta = check_number("CentralDP delta", delta, low=0.0, high=1.0, low_open=True)
        self.sample_rate = check_number(
            "CentralDP sample_rate", sample_rate, low=0.0, high=1.0, low_open=True, high_closed=True
        )
        self._seeded = None if seed is None else np.random.default_rng(seed)
        self._accountant = _new_accountant()

    def noise_std(self, num_clients: int) -> float:
        """Standard deviation of the noise on each coordinate of the mean of ``num_clients`` updates."""
        return self.noise_multiplier * self.clip_norm / num_clients

    def privacy_spent(self) -> tuple[float, float]:
        """``(epsilon, delta)`` after the rounds aggregated so far (opacus ``RDPAccountant``)."""
        if len(self._accountant) == 0:
            return 0.0, self.delta
        return float(self._accountant.get_epsilon(delta=self.delta)), self.delta

    def configure_train(self, server_round: int, global_weights: Weights) -> dict[str, Any]:
        """The inner strategy's configuration."""
        return self.inner.configure_train(server_round, global_weights)

    def aggregate_train(
        self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]
    ) -> Weights:
        """The inner strategy applied to the noisy clipped mean; one accountant step."""
        require_updates(self.name, updates)
        n = len(updates)
        factors = clip_factors(global_weights, updates, self.clip_norm)
        # The mean of g + f_i·(w_i - g) minus g is Σ (f_i/n)·w_i - (Σ f_i/n)·g.
        means = weighted_sum(update_rows(updates), factors / n, global_weights)
        kept = float(factors.sum() / n)
        rng = self._seeded if self._seeded is not None else np.random.default_rng()
        sigma = self.noise_std(n)
        released: Weights = []
        for g, mean in zip(global_weights, means, strict=True):
            if g.dtype.kind != "f":
                released.append(g)
                continue
            change = mean - kept * g.reshape(-1)
            noise = rng.standard_normal(change.size, dtype=change.dtype)
            noise *= sigma
            change += noise
            released.append(g + change.reshape(g.shape))
        self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        noisy = ClientUpdate(client_id=self.name, weights=cast_like(released, global_weights), num_examples=1)
        return self.inner.aggregate_train(server_round, global_weights, [noisy])

    def plan(self) -> dict[str, Any]:
        """Name, the DP parameters and the inner strategy's plan (never the seed)."""
        return {
            "name": self.name,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "sample_rate": self.sample_rate,
            "inner": self.inner.plan(),
        }

    def state(self) -> dict[str, np.ndarray]:
        """The inner strategy's state and the accountant's history (rows: noise, sample rate, steps)."""
        out = dict(self.inner.state())
        history = np.array(self._accountant.history, dtype=np.float64).reshape(-1, 3)
        out[_HISTORY_KEY] = history
        return out

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the inner state and the accountant, so ε keeps growing across restarts."""
        inner = {k: v for k, v in state.items() if k != _HISTORY_KEY}
        self.inner.load_state(inner)
        history = np.asarray(state.get(_HISTORY_KEY, np.zeros((0, 3))), dtype=np.float64)
        if history.ndim != 2 or history.shape[1] != 3 or not np.all(np.isfinite(history)):
            raise ConfigurationError("CentralDP state: dp/history must hold rows of (noise, rate, steps)")
        self._accountant.history = [(float(z), float(q), int(steps)) for z, q, steps in history]
