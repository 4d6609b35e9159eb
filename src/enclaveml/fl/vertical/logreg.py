"""Vertical logistic regression: each party keeps its columns and its weights; the TEE joins the logits.

The rows are aligned already (PSI). Party *k* holds the columns ``X_k`` of every row, standardises
them with its own mean and standard deviation and owns the weights ``w_k`` of those columns; the
*label party* also owns the intercept. The model minimises, exactly as scikit-learn's
``LogisticRegression(C=C)`` on the same standardised columns::

    mean_i logloss(y_i, sum_k X_k[i] @ w_k + b)  +  (1 / (2 C n)) * sum_k ||w_k||^2

Each iteration is one round of calls from the server in the TEE (``logreg.step``, concurrently):

1. every party applies the update of the previous iteration from the residuals the server sends,
   ``r_i = sigmoid(z_i) - y_i`` of that batch (the gradient of the loss w.r.t. the logit ``z_i``):
   Nesterov's accelerated gradient, ``g_k = X_k[B]^T r / |B| + w_k / (C n)``, step ``lr``,
   momentum ``t / (t + 3)``; it answers the squared size of its step;
2. it answers its partial logits ``z_k = X_k[B'] @ w_k`` of the next batch (at the look-ahead point);
3. the server sums them and computes the next residuals.

Full batch by default (deterministic, converges to scikit-learn's optimum); mini-batches of seeded
permutations on request. The step is ``1 / L`` with ``L = (sum_k d_k + 1) / 4 + 1 / (C n)``, a
bound on the loss's smoothness that needs only each party's *number* of columns: a standardised
column has unit mean square, so ``||X_k||_2^2 / n <= d_k``. Training stops once the joint step
``sqrt(sum_k step_k)`` falls below ``tol`` or after ``max_iter`` updates.

**Where the labels go.** The label party sends its labels to the TEE once (``logreg.setup``),
and the server computes the residuals itself. The alternative, the label party computing ``r`` from
the joint logits the server sends it, would keep the labels off the server but hand the label
party every row's sum of the *other* parties' partial logits at every iteration, from which it
learns their model, and it would cost a second round per iteration. The server is the attested
party that everyone already trusts with their contributions, so the labels go there.

**What the passive parties learn, and it is inherent to this flow.** A passive party receives the
per-row residuals of every batch, and ``r_i < 0`` exactly when ``y_i = 1``: the *sign* of one
residual is the row's label. Passive parties never receive the label array itself (the tests assert
on the bytes that cross), but a curious one recovers every label of the rows it was sent from the
very first iteration. Keeping the residuals inside the TEE would need the parties' columns inside
the TEE too (then it is central training); adding noise to ``r`` (differential privacy) is not done
here. The server learns the labels and the partial logits of every party, never a feature value.

Methods of :class:`LogRegParty` (payloads of :mod:`enclaveml.fl.vertical._codec`)::

    logreg.setup           {rows, l2, label_party, model_id} -> {features} (+ {labels} from the label party)
    logreg.step            {t, lr, want_z, [r, r_rows], [z_rows]}  -> {step_sq, [z]}
    logreg.partial_logits  {dataset, [rows]}          -> {z, model_id} (all alike, or no prediction)

An absent ``*_rows`` means all rows; ``t`` counts the updates so far and must match the party's.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from enclaveml.errors import ConfigurationError
from enclaveml.fl.vertical._channel import PartyChannel, call_all, require
from enclaveml.fl.vertical._codec import Payload
from enclaveml.fl.vertical._errors import ProtocolError
from enclaveml.fl.vertical._logreg_party import LogRegParty, LogRegShare

__all__ = ["LogRegParams", "LogRegParty", "LogRegShare", "LogRegTraining", "predict_logreg", "train_logreg"]

Float = NDArray[np.float64]


@dataclass(frozen=True)
class LogRegParams:
    """The hyperparameters; :meth:`to_dict` is what a vertical job's plan carries."""

    C: float = 1.0  # scikit-learn's name, on purpose
    max_iter: int = 500
    tol: float = 1e-6
    batch_size: int | None = None
    seed: int = 0
    learning_rate: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.C, int | float) and 0 < self.C < math.inf):
            raise ConfigurationError("C must be a positive number")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ConfigurationError("max_iter must be an integer >= 1")
        if not (isinstance(self.tol, int | float) and self.tol >= 0):
            raise ConfigurationError("tol must be >= 0")
        if self.batch_size is not None and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigurationError("batch_size must be None (full batch) or an integer >= 1")
        if self.learning_rate is not None and not (0 < self.learning_rate < math.inf):
            raise ConfigurationError("learning_rate must be None (the 1/L bound) or positive")

    def to_dict(self) -> dict[str, Any]:
        return {
            "C": float(self.C),
            "max_iter": self.max_iter,
            "tol": float(self.tol),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "learning_rate": self.learning_rate,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogRegParams:
        unknown = set(data) - set(cls().to_dict())
        if unknown:
            raise ConfigurationError(f"unknown logistic-regression parameters: {sorted(unknown)}")
        return cls(**data)


@dataclass
class LogRegTraining:
    """What the server knows after training: no weights (the parties hold those)."""

    iterations: int
    converged: bool
    losses: list[float] = field(default_factory=list)
    """The mean log-loss of each iteration's batch, before that iteration's update."""


def _sigmoid(z: Float) -> Float:
    result: Float = 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for any finite z
    return result


def _logits(answer: Payload, party: str, size: int) -> Float:
    z = require(answer, "z", np.ndarray)
    assert isinstance(z, np.ndarray)
    if z.dtype != np.float64 or z.shape != (size,) or not np.isfinite(z).all():
        raise ProtocolError(f"party {party!r} sent partial logits of the wrong shape or non-finite values")
    return z


def _setup(
    channels: Sequence[PartyChannel], n: int, l2: float, model_id: str
) -> tuple[NDArray[np.uint8], int]:
    """Tell every party the run (and its random id, kept in every share); returns the labels (from the
    first channel) and the total columns."""
    answers = call_all(
        channels,
        "logreg.setup",
        [{"rows": n, "l2": l2, "label_party": i == 0, "model_id": model_id} for i in range(len(channels))],
    )
    labels = require(answers[0], "labels", np.ndarray)
    assert isinstance(labels, np.ndarray)
    if labels.shape != (n,) or labels.dtype.kind not in "ui" or not np.isin(labels, (0, 1)).all():
        raise ProtocolError(f"label party {channels[0].name!r} sent labels that are not one 0/1 per row")
    features = 0
    for channel, answer in zip(channels, answers, strict=True):
        if channel is not channels[0] and "labels" in answer:
            raise ProtocolError(f"party {channel.name!r} sent labels but is not the label party")
        d = require(answer, "features", int)
        assert isinstance(d, int)
        # The count sets everyone's step size (1 / L): one far too large would end training at
        # once, "converged" at weights of ~0. A party can still lie within the bound.
        if not 0 <= d <= _MAX_COLUMNS:
            raise ProtocolError(f"party {channel.name!r} reported a column count outside 0..{_MAX_COLUMNS}")
        features += d
    return labels.astype(np.uint8), features


_MAX_COLUMNS = 1 << 20


def _batches(n: int, params: LogRegParams) -> Any:
    """Row indices of each iteration's batch, or None for all rows (full batch)."""
    if params.batch_size is None or params.batch_size >= n:
        while True:
            yield None
    rng = np.random.default_rng(params.seed)
    while True:
        order = rng.permutation(n).astype(np.int64)
        for start in range(0, n, params.batch_size):
            yield order[start : start + params.batch_size]


def train_logreg(
    label_channel: PartyChannel, passive_channels: Sequence[PartyChannel], params: LogRegParams
) -> LogRegTraining:
    """Train jointly (see the module docstring); runs in the server, returns once every party has its weights.

    :raises ProtocolError: a party answered with arrays of the wrong shape, or labels that are not 0/1.
    :raises PartyFailedError: a party's handler raised (for example on a message it found malformed).
    """
    channels = [label_channel, *passive_channels]
    if len({ch.name for ch in channels}) != len(channels):
        raise ConfigurationError("every party takes part once")
    answer = label_channel.call("logreg.setup", {"rows": -1, "l2": 0.0, "label_party": True, "probe": True})
    n = require(answer, "rows", int)
    assert isinstance(n, int)
    if n < 1:
        raise ProtocolError("the label party reported no rows")
    l2 = 1.0 / (params.C * n)
    labels, features = _setup(channels, n, l2, secrets.token_hex(16))
    lr = params.learning_rate or 1.0 / ((features + 1) / 4.0 + l2)
    batches = _batches(n, params)
    result = LogRegTraining(iterations=0, converged=False)
    residual: Float | None = None
    residual_rows: NDArray[np.int64] | None = None
    for t in range(params.max_iter + 1):
        final = t == params.max_iter
        rows = None if final else next(batches)
        request: Payload = {"t": max(t - 1, 0), "lr": lr, "want_z": not final}  # updates so far
        if residual is not None:
            request["r"] = residual
            if residual_rows is not None:
                request["r_rows"] = residual_rows
        if rows is not None:
            request["z_rows"] = rows
        answers = call_all(channels, "logreg.step", request)
        step = 0.0
        for channel, answer in zip(channels, answers, strict=True):
            step_sq = require(answer, "step_sq", float)
            assert isinstance(step_sq, float)
            if not (0.0 <= step_sq < math.inf):
                raise ProtocolError(f"party {channel.name!r} reported an invalid step size")
            step += step_sq
        result.iterations = t
        if t > 0 and math.sqrt(step) <= params.tol:
            result.converged = True
            break
        if final:
            break
        size = n if rows is None else len(rows)
        z = sum(_logits(a, ch.name, size) for ch, a in zip(channels, answers, strict=True))
        assert isinstance(z, np.ndarray)
        y = labels if rows is None else labels[rows]
        p = _sigmoid(z)
        eps = np.finfo(np.float64).tiny
        result.losses.append(float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log1p(-p + eps))))
        residual, residual_rows = p - y, rows
    return result


def predict_logreg(
    label_channel: PartyChannel,
    passive_channels: Sequence[PartyChannel],
    dataset: str,
    rows: ArrayLike | None = None,
) -> Float:
    """P(y = 1) of the rows of ``dataset`` (a name every party registered), summed over the parties."""
    channels = [label_channel, *passive_channels]
    request: Payload = {"dataset": dataset}
    if rows is not None:
        request["rows"] = np.asarray(rows, dtype=np.int64)
    answers = call_all(channels, "logreg.partial_logits", request)
    # Every share must come from the same training run: shares of different runs sum to nonsense.
    if len({str(a.get("model_id", "")) for a in answers}) != 1:
        raise ProtocolError("the parties' model shares come from different training runs")
    first = require(answers[0], "z", np.ndarray)
    assert isinstance(first, np.ndarray)
    size = first.shape[0] if first.ndim == 1 else -1
    z = sum(_logits(a, ch.name, size) for ch, a in zip(channels, answers, strict=True))
    assert isinstance(z, np.ndarray)
    return _sigmoid(z)
