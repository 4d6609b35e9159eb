"""The party's side of vertical logistic regression: its columns, its scaling, its weights.

A :class:`LogRegParty` answers the server's ``logreg.*`` calls (see :mod:`enclaveml.fl.vertical.logreg`
for the protocol). Its data never leaves it: it sends partial logits ``X_k @ w_k`` and the size of
its own step, and receives residuals. What it learns is in the protocol module's docstring.

After training, :attr:`LogRegParty.share` is the party's part of the model (its column means and
scales, its weights, and the intercept if it is the label party); :meth:`LogRegShare.to_bytes`
is what the party seals for itself. :meth:`LogRegParty.from_share` makes a predicting party from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from enclaveml.errors import ConfigurationError
from enclaveml.fl.vertical._channel import PartyEndpoint, require
from enclaveml.fl.vertical._codec import Payload, decode, encode
from enclaveml.fl.vertical._errors import MessageError, ProtocolError

__all__ = ["TRAIN", "LogRegParty", "LogRegShare", "rows_of"]

Float = NDArray[np.float64]
TRAIN = "train"
_SHARE_VERSION = 1


def rows_of(payload: Payload, key: str, n: int) -> NDArray[np.int64] | None:
    """The row indices under ``key`` (absent: all rows), checked to lie in ``[0, n)``."""
    if key not in payload:
        return None
    rows = require(payload, key, np.ndarray)
    assert isinstance(rows, np.ndarray)
    if rows.ndim != 1 or rows.dtype != np.int64 or (rows.size and (rows.min() < 0 or rows.max() >= n)):
        raise MessageError(f"field {key!r} must be int64 row indices within the dataset")
    return rows


def _matrix(values: ArrayLike, what: str) -> Float:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2 or not np.isfinite(array).all():
        raise ConfigurationError(f"{what} must be a finite 2-D array of numbers (rows x columns)")
    return array


@dataclass(frozen=True)
class LogRegShare:
    """One party's part of a trained model; the other parties' parts are with them."""

    mean: Float
    scale: Float
    weights: Float
    intercept: float | None = None
    model_id: str = ""  # the training run's (random, from the server): prediction refuses a mix of runs

    def logits(self, features: Float) -> Float:
        z: Float = ((features - self.mean) / self.scale) @ self.weights
        return z + self.intercept if self.intercept is not None else z

    def to_bytes(self) -> bytes:
        payload: Payload = {"v": _SHARE_VERSION, "mean": self.mean, "scale": self.scale, "w": self.weights}
        if self.intercept is not None:
            payload["b"] = self.intercept
        if self.model_id:
            payload["id"] = self.model_id
        return encode(payload)

    @classmethod
    def from_bytes(cls, data: bytes) -> LogRegShare:
        payload = decode(data, max_items=None)  # a stored model, read once unsealed
        if payload.get("v") != _SHARE_VERSION:
            raise MessageError("not a vertical logistic-regression share of a known version")
        arrays = [require(payload, k, np.ndarray) for k in ("mean", "scale", "w")]
        shapes = {a.shape for a in arrays if isinstance(a, np.ndarray) and a.dtype == np.float64}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise MessageError("a logistic-regression share holds three float64 vectors of one length")
        mean, scale, weights = (np.array(a) for a in arrays)
        intercept = payload.get("b")
        if intercept is not None and not isinstance(intercept, float):
            raise MessageError("the intercept must be a float")
        model_id = payload.get("id", "")
        if not isinstance(model_id, str):
            raise MessageError("the model id must be text")
        return cls(mean, scale, weights, intercept, model_id)


class LogRegParty(PartyEndpoint):
    """A party's columns for every dataset it registered; the label party also holds the labels.

    ``datasets`` maps a name to the same columns for other rows (for ``predict_logreg``); the
    training rows are the dataset :data:`TRAIN` (aligned by PSI beforehand). Columns are scaled by
    this party's own training mean and standard deviation (constant columns by 1).
    """

    def __init__(
        self,
        name: str,
        features: ArrayLike,
        *,
        labels: ArrayLike | None = None,
        datasets: Mapping[str, ArrayLike] | None = None,
        share: LogRegShare | None = None,
    ) -> None:
        super().__init__(name)
        self.datasets: dict[str, Float] = {TRAIN: _matrix(features, "features")}
        for key, values in (datasets or {}).items():
            self.datasets[key] = _matrix(values, f"dataset {key!r}")
        train = self.datasets[TRAIN]
        if any(d.shape[1] != train.shape[1] for d in self.datasets.values()):
            raise ConfigurationError("every dataset of a party has the same columns")
        self.labels: NDArray[np.uint8] | None = None
        if labels is not None:
            y = np.asarray(labels)
            if y.shape != (train.shape[0],) or not np.isin(y, (0, 1)).all():
                raise ConfigurationError("labels must be one 0/1 value per training row")
            self.labels = y.astype(np.uint8)
        if share is None:
            mean = train.mean(axis=0) if train.shape[0] else np.zeros(train.shape[1])
            std = train.std(axis=0) if train.shape[0] else np.ones(train.shape[1])
            share = LogRegShare(mean, np.where(std > 0, std, 1.0), np.zeros(train.shape[1]))
        elif share.weights.shape != (train.shape[1],):
            raise ConfigurationError("the share was trained on another number of columns")
        self.share = share
        self._scaled: Float | None = None
        self._t = 0
        self._l2 = 0.0
        self._model_id = share.model_id
        self._x: Float = share.weights.copy()  # the iterate
        self._y: Float = share.weights.copy()  # the look-ahead point the logits were computed at
        self._bx = self._by = 0.0
        self.register("logreg.setup", self._setup)
        self.register("logreg.step", self._step)
        self.register("logreg.partial_logits", self._partial_logits)

    @classmethod
    def from_share(cls, name: str, share: LogRegShare, datasets: Mapping[str, ArrayLike]) -> LogRegParty:
        """A party that predicts with a trained share (``datasets`` must not be empty)."""
        first = next(iter(datasets.values()))
        return cls(name, first, datasets=datasets, share=share)

    @property
    def is_label_party(self) -> bool:
        return self.labels is not None

    def _setup(self, payload: Payload) -> Payload:
        rows = require(payload, "rows", int)
        l2 = require(payload, "l2", float)
        label_party = require(payload, "label_party", bool)
        train = self.datasets[TRAIN]
        if payload.get("probe"):
            if not self.is_label_party:
                raise ProtocolError("only the label party is asked for the number of rows")
            return {"rows": train.shape[0]}
        if rows != train.shape[0]:
            raise ProtocolError("the server's row count differs from this party's aligned rows")
        if label_party != self.is_label_party:
            raise ProtocolError("the server has this party's role wrong")
        assert isinstance(l2, float)
        if not (0.0 <= l2 < math.inf):
            raise MessageError("l2 must be a non-negative number")
        self._l2 = l2
        model_id = payload.get("model_id", "")
        if not isinstance(model_id, str) or len(model_id) > 64:
            raise MessageError("field 'model_id' must be a short string")
        self._model_id = model_id
        self._scaled = (train - self.share.mean) / self.share.scale
        self._t = 0
        self._x = np.zeros(train.shape[1])
        self._y = self._x.copy()
        self._bx = self._by = 0.0
        answer: Payload = {"features": int(train.shape[1])}
        if self.labels is not None:
            answer["labels"] = self.labels
        return answer

    def _step(self, payload: Payload) -> Payload:
        if self._scaled is None:
            raise ProtocolError("logreg.step before logreg.setup")
        t = require(payload, "t", int)
        lr = require(payload, "lr", float)
        want_z = require(payload, "want_z", bool)
        if t != self._t:
            raise ProtocolError("the server's iteration count differs from this party's")
        assert isinstance(lr, float)
        if not (0.0 < lr < math.inf):
            raise MessageError("lr must be a positive number")
        n = self._scaled.shape[0]
        step_sq = 0.0
        if "r" in payload:
            step_sq = self._update(payload, lr, n)
        answer: Payload = {"step_sq": step_sq}
        if want_z:
            rows = rows_of(payload, "z_rows", n)
            x = self._scaled if rows is None else self._scaled[rows]
            z = x @ self._y
            answer["z"] = z + self._by if self.is_label_party else z
        return answer

    def _update(self, payload: Payload, lr: float, n: int) -> float:
        """One accelerated gradient step from the residuals of the look-ahead point."""
        assert self._scaled is not None
        rows = rows_of(payload, "r_rows", n)
        x = self._scaled if rows is None else self._scaled[rows]
        r = require(payload, "r", np.ndarray)
        assert isinstance(r, np.ndarray)
        if r.dtype != np.float64 or r.shape != (x.shape[0],) or not np.isfinite(r).all() or not r.size:
            raise MessageError("residuals must be finite float64, one per row of the batch")
        grad = x.T @ r / r.size + self._l2 * self._y
        new_x = self._y - lr * grad
        momentum = self._t / (self._t + 3.0)
        step = new_x - self._x
        step_sq = float(step @ step)
        self._y = new_x + momentum * step
        self._x = new_x
        if self.is_label_party:  # the intercept: no penalty, same schedule
            new_b = self._by - lr * float(r.mean())
            step_sq += (new_b - self._bx) ** 2
            self._by = new_b + momentum * (new_b - self._bx)
            self._bx = new_b
        self._t += 1
        self.share = LogRegShare(
            self.share.mean,
            self.share.scale,
            self._x.copy(),
            self._bx if self.is_label_party else None,
            self._model_id,
        )
        return step_sq

    def _partial_logits(self, payload: Payload) -> Payload:
        name = require(payload, "dataset", str)
        assert isinstance(name, str)
        data = self.datasets.get(name)
        if data is None:
            raise ProtocolError("this party has no dataset of that name")
        rows = rows_of(payload, "rows", data.shape[0])
        return {"z": self.share.logits(data if rows is None else data[rows]), "model_id": self.share.model_id}
