"""The participant's side, independent of transport: the connection interface and the training loop.

:func:`participate` is the whole protocol from a participant's point of view: fetch the
global model, train on local data, upload, wait for the next round, until the plan's rounds
are done. It talks to an :class:`AggregatorConnection`: :class:`InProcessConnection` (an
:class:`~enclaveml.fl.aggregator.Aggregator` in this process) or
:class:`~enclaveml.fl.client.AggregatorClient` (HTTPS with RA-TLS, verified before first use).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from enclaveml.fl._errors import DuplicateUpdateError, RoundMismatchError, TrainingFinishedError
from enclaveml.fl._wire import ModelMessage
from enclaveml.fl.aggregator import Aggregator
from enclaveml.fl.strategy import Weights

__all__ = ["AggregatorConnection", "InProcessConnection", "TrainResult", "Trainer", "participate"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What local training returns: the new local weights (not a delta), examples used, metrics."""

    weights: Weights
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


Trainer = Callable[[Weights, dict[str, Any]], TrainResult]
"""``train(global_weights, round_config) -> TrainResult``: the participant's own code."""


class AggregatorConnection(Protocol):
    """One enrolled participant's channel to the aggregator."""

    client_id: str

    def fetch_model(self, wait_s: float = 0.0) -> ModelMessage:
        """The global model; waits up to ``wait_s`` while this client already uploaded for the open round."""
        ...

    def upload(self, round_: int, weights: Weights, num_examples: int, metrics: Mapping[str, float]) -> int:
        """Send this client's update for ``round_``; returns the number of updates the round holds."""
        ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class InProcessConnection:
    """A connection that calls an :class:`Aggregator` directly: same rules, no network, no TEE."""

    def __init__(self, aggregator: Aggregator, credential: str) -> None:
        self._aggregator = aggregator
        self.client_id = aggregator.authenticate(credential)

    def fetch_model(self, wait_s: float = 0.0) -> ModelMessage:
        if wait_s > 0:
            self._aggregator.wait_for_work(self.client_id, wait_s)
        return self._aggregator.global_model(self.client_id)

    def upload(self, round_: int, weights: Weights, num_examples: int, metrics: Mapping[str, float]) -> int:
        # A copy, as the network would make: the caller may keep training on its arrays.
        return self._aggregator.submit(
            self.client_id, round_, [w.copy() for w in weights], num_examples, dict(metrics)
        )

    def status(self) -> dict[str, Any]:
        return self._aggregator.status(self.client_id)

    def close(self) -> None:
        """Nothing to release."""


def participate(
    connection: AggregatorConnection,
    train: Trainer,
    *,
    wait_s: float = 10.0,
    stop: threading.Event | None = None,
    on_round: Callable[[ModelMessage], object] | None = None,
) -> ModelMessage:
    """Take part until the run finishes (or ``stop`` is set); returns the last global model seen.

    ``train`` runs once per round this client takes part in. An update that arrives after its
    round closed (a straggler past the deadline) is dropped and the client trains on the new
    model; a round re-run after failing validation is trained again. ``on_round`` sees every
    new global model (e.g. to evaluate it locally).
    """
    seen: tuple[int, int] | None = None
    while True:
        message = connection.fetch_model(wait_s=wait_s)
        if on_round is not None and (message.completed_rounds, message.round) != seen:
            seen = (message.completed_rounds, message.round)
            on_round(message)
        if message.finished or (stop is not None and stop.is_set()):
            return message
        if message.uploaded:
            continue  # still waiting for the others
        result = train(message.weights, message.config)
        try:
            connection.upload(message.round, result.weights, result.num_examples, result.metrics)
        except RoundMismatchError as exc:
            _log.info("%s: round %d closed before our update arrived (now %d)", connection.client_id,
                      message.round, exc.current)  # fmt: skip
        except (DuplicateUpdateError, TrainingFinishedError):
            pass  # a retried upload that had arrived, or the run ended meanwhile: fetch again
