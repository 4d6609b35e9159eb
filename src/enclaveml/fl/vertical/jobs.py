"""From a plan to what runs: the server's job for each task, and the party's endpoint for it.

The server (``enclaveml vfl server``) turns a :class:`~enclaveml.fl.vertical.plan.VerticalPlan` into a
:data:`~enclaveml.fl.vertical._session.Job` with :func:`server_job`; each party
(``enclaveml vfl psi|train|predict``) builds the matching endpoint. The same functions run in tests
over in-process channels and in the CLI over the network.

Predictions go to the label party only: after a ``predict`` job the server calls
``vfl.predictions`` ``{"p": float64[rows]}`` on it (:class:`PredictionSink` answers that call) and
keeps nothing. For ``binary:logistic`` boosting and for logistic regression they are P(y = 1);
for regression, the predicted values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from enclaveml.errors import ConfigurationError
from enclaveml.fl.vertical._channel import PartyChannel, PartyEndpoint, require
from enclaveml.fl.vertical._codec import Payload
from enclaveml.fl.vertical._errors import MessageError, ProtocolError
from enclaveml.fl.vertical._session import Job
from enclaveml.fl.vertical.boosting import (
    BoostedTrees,
    BoostingParams,
    BoostingParty,
    PartyThresholds,
    predict_boosting,
    train_boosting,
)
from enclaveml.fl.vertical.logreg import (
    LogRegParams,
    LogRegParty,
    LogRegShare,
    LogRegTraining,
    predict_logreg,
    train_logreg,
)
from enclaveml.fl.vertical.plan import VerticalPlan
from enclaveml.fl.vertical.psi import PsiSummary, run_psi

__all__ = ["JobResult", "PredictionSink", "party_for_prediction", "party_for_training", "server_job"]


@dataclass
class JobResult:
    """What the server keeps after a job: summaries and, for boosting, its part of the model (bytes)."""

    task: str
    psi: PsiSummary | None = None
    training: Any = None
    server_model: bytes | None = None
    predicted_rows: int | None = None


class PredictionSink:
    """Registers ``vfl.predictions`` on the label party's endpoint and keeps what arrives."""

    def __init__(self, endpoint: PartyEndpoint) -> None:
        self.predictions: NDArray[np.float64] | None = None
        endpoint.register("vfl.predictions", self._receive)

    def _receive(self, payload: Payload) -> Payload:
        values = require(payload, "p", np.ndarray)
        assert isinstance(values, np.ndarray)
        if values.dtype != np.float64 or values.ndim != 1 or not np.isfinite(values).all():
            raise MessageError("predictions must be a finite float64 vector")
        if self.predictions is not None:
            raise ProtocolError("predictions were delivered already")
        self.predictions = np.array(values)
        return {"rows": int(values.shape[0])}


def _deliver(label: PartyChannel, predictions: NDArray[np.float64]) -> int:
    answer = label.call("vfl.predictions", {"p": np.ascontiguousarray(predictions, dtype=np.float64)})
    if require(answer, "rows", int) != predictions.shape[0]:
        raise ProtocolError(f"label party {label.name!r} did not take the predictions")
    return int(predictions.shape[0])


def server_job(plan: VerticalPlan, *, server_model: bytes | None = None) -> Job:
    """The job of ``plan``; ``server_model`` is the server's part of the model for ``predict`` (boosting).

    :raises ConfigurationError: the model does not match the plan's ``model_sha256``, or is missing.
    """
    if plan.task == "psi":
        return lambda channels: JobResult(
            "psi",
            psi=run_psi(channels, mode=plan.psi_mode, max_ids=plan.psi_max_ids),  # type: ignore[arg-type]
        )
    if plan.algorithm == "logreg":
        return _logreg_job(plan)
    return _boosting_job(plan, server_model)


def _boosting_job(plan: VerticalPlan, server_model: bytes | None) -> Job:
    params = BoostingParams.from_dict(plan.params)

    def train(channels: Sequence[PartyChannel]) -> JobResult:
        model = train_boosting(channels[0], channels[1:], params, valid=plan.valid_dataset)
        return JobResult("train", training=model, server_model=model.to_bytes())

    if plan.task == "train":
        return train
    if server_model is None or hashlib.sha256(server_model).hexdigest() != plan.model_sha256:
        raise ConfigurationError("the server's model part is missing or is not the one the plan pins")
    model = BoostedTrees.from_bytes(server_model)

    def predict(channels: Sequence[PartyChannel]) -> JobResult:
        predictions = predict_boosting(model, channels, plan.dataset)
        return JobResult("predict", predicted_rows=_deliver(channels[0], predictions))

    return predict


def _logreg_job(plan: VerticalPlan) -> Job:
    params = LogRegParams.from_dict(plan.params)

    def train(channels: Sequence[PartyChannel]) -> JobResult:
        training: LogRegTraining = train_logreg(channels[0], channels[1:], params)
        return JobResult("train", training=training)

    def predict(channels: Sequence[PartyChannel]) -> JobResult:
        probabilities = predict_logreg(channels[0], channels[1:], plan.dataset)
        return JobResult("predict", predicted_rows=_deliver(channels[0], probabilities))

    return train if plan.task == "train" else predict


Array = NDArray[np.float64]


def party_for_training(
    plan: VerticalPlan,
    name: str,
    features: Array,
    labels: Array | None,
    *,
    valid: tuple[Array, Array | None] | None = None,
) -> tuple[PartyEndpoint, Callable[[], bytes]]:
    """The endpoint of party ``name`` for a ``train`` plan, and how to get its model part afterwards.

    ``valid`` is this party's validation rows (and the label party's validation labels) for a plan
    with a ``valid_dataset``.

    :raises ConfigurationError: the data does not suit the algorithm (e.g. labels that are not 0/1).
    """
    if (valid is not None) != (plan.valid_dataset is not None):
        raise ConfigurationError("give validation rows exactly when the plan names a valid_dataset")
    if plan.algorithm == "logreg":
        if valid is not None:
            raise ConfigurationError("logistic regression trains on every aligned row: no validation set")
        party = LogRegParty(name, features, labels=labels)
        return party, lambda: party.share.to_bytes()
    datasets: dict[str, Array] = {"train": features}
    label_sets: dict[str, Array] = {}
    if labels is not None:
        label_sets["train"] = labels
    if valid is not None and plan.valid_dataset is not None:
        datasets[plan.valid_dataset] = valid[0]
        if valid[1] is not None:
            label_sets[plan.valid_dataset] = valid[1]
    objective = BoostingParams.from_dict(plan.params).objective
    booster = BoostingParty(name, datasets, labels=label_sets or None, objective=objective)
    return booster, lambda: booster.thresholds.to_bytes()


def party_for_prediction(
    plan: VerticalPlan, name: str, part: bytes, features: NDArray[np.float64]
) -> PartyEndpoint:
    """The endpoint of party ``name`` for a ``predict`` plan: its model part, its rows of ``plan.dataset``."""
    data: Mapping[str, Array] = {plan.dataset: features}
    if plan.algorithm == "logreg":
        return LogRegParty.from_share(name, LogRegShare.from_bytes(part), data)
    return BoostingParty(name, data, thresholds=PartyThresholds.from_bytes(part))
