"""A party's side of vertical boosting: its features, its bins, its answers.

The party checks every request before it touches its data (shapes, ranges, the tree it is
about), and answers only in codes, histograms and left/right bits: never a raw value, never a cut
point. Its cut points leave it only inside its own model part (:class:`PartyThresholds`), which it
keeps. See :mod:`enclaveml.fl.vertical.boosting` for what each message carries.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.fl.vertical._binning import MAX_MAX_BIN, BinEdges, goes_left, validate_features
from enclaveml.fl.vertical._boost_grower import partition_rows
from enclaveml.fl.vertical._boost_model import PartyThresholds
from enclaveml.fl.vertical._boost_params import unfit_labels
from enclaveml.fl.vertical._channel import PartyEndpoint, require
from enclaveml.fl.vertical._codec import Payload
from enclaveml.fl.vertical._errors import MessageError, ProtocolError
from enclaveml.fl.vertical._histogram import build_histograms
from enclaveml.fl.vertical._kernels import Codes

__all__ = ["BoostingParty"]


def _int(payload: Payload, key: str, low: int, high: int) -> int:
    value = require(payload, key, int)
    assert isinstance(value, int)
    if not low <= value <= high:
        raise MessageError(f"field {key!r} out of range")
    return value


def _array(payload: Payload, key: str, kinds: str, ndim: int) -> np.ndarray:
    value = require(payload, key, np.ndarray)
    assert isinstance(value, np.ndarray)
    if value.dtype.kind not in kinds or value.ndim != ndim:
        raise MessageError(f"field {key!r} must be a {ndim}-D array of kind {kinds!r}")
    return value


def _names(payload: Payload, key: str) -> list[str]:
    value = require(payload, key, list)
    assert isinstance(value, list)
    if not all(isinstance(v, str) for v in value) or len(set(value)) != len(value):
        raise MessageError(f"field {key!r} must be a list of distinct names")
    return value


class BoostingParty(PartyEndpoint):
    """One party of vertical boosting: ``datasets`` maps names the parties agreed on (PSI order)
    to its feature matrices (rows x features, NaN = missing); the label party also has ``labels``.

    A party that only predicts is built with its saved ``thresholds`` and the datasets to score.
    Given the plan's ``objective``, the label party checks its labels suit it before it connects.
    """

    def __init__(
        self,
        name: str,
        datasets: Mapping[str, object],
        *,
        labels: Mapping[str, object] | None = None,
        thresholds: PartyThresholds | None = None,
        objective: str | None = None,
    ) -> None:
        super().__init__(name)
        if thresholds is not None and thresholds.party != name:
            raise ConfigurationError(f"this model part is party {thresholds.party!r}'s, not {name!r}'s")
        self._thresholds = thresholds
        self._data: dict[str, np.ndarray] = {}
        self._codes: dict[str, Codes] = {}
        for key, x in datasets.items():
            self.add_dataset(key, x)
        self._labels: dict[str, np.ndarray] = {}
        for key, y in (labels or {}).items():
            array = np.asarray(y, dtype=np.float64)
            if array.ndim != 1 or key not in self._data or len(array) != len(self._data[key]):
                raise ConfigurationError(f"labels of {key!r} must be 1-D, one per row of that dataset")
            if not np.isfinite(array).all():
                raise ConfigurationError("labels must be finite")
            reason = None if objective is None else unfit_labels(array, objective)
            if reason is not None:  # here, before connecting: the other parties learn nothing of it
                raise ConfigurationError(f"{objective} cannot train on these labels: {reason}")
            self._labels[key] = array
        self._edges: BinEdges | None = None
        self._train = ""
        self._tree = -1
        self._gh = np.empty(0, dtype=np.complex128)
        self._features = np.empty(0, dtype=np.int64)
        for method, handler in {
            "boost.setup": self._setup,
            "boost.labels": self._send_labels,
            "boost.gradients": self._gradients,
            "boost.histograms": self._histograms,
            "boost.partition": self._partition,
            "boost.predict": self._predict,
            "boost.finish": self._finish,
        }.items():
            self.register(method, handler)

    def add_dataset(self, name: str, x: object) -> None:
        """Hold another dataset (e.g. new rows to score), under a name the server will use."""
        array = validate_features(x, f"dataset {name!r}")
        model = self._thresholds
        if model is not None and array.shape[1] != model.n_features:
            raise ConfigurationError(
                f"dataset {name!r} has {array.shape[1]} columns; this party's model part was trained on "
                f"{model.n_features}"
            )
        if self._data and array.shape[1] != self.n_features:
            raise ConfigurationError("every dataset of a party must have the same features")
        self._data[name] = array
        self._codes.pop(name, None)

    @property
    def n_features(self) -> int:
        return next(iter(self._data.values())).shape[1] if self._data else 0

    @property
    def thresholds(self) -> PartyThresholds:
        """This party's part of the trained model (after the server's ``boost.finish``)."""
        if self._thresholds is None:
            raise ConfigurationError(f"party {self.name!r} has no trained model part yet")
        return self._thresholds

    def _dataset(self, name: str) -> np.ndarray:
        if name not in self._data:
            raise MessageError("request names a dataset this party does not hold")
        return self._data[name]

    def _codes_of(self, name: str) -> Codes:
        """Codes of a dataset with the training edges (all features)."""
        if self._edges is None:
            raise ProtocolError("boost.setup has not run")
        if name not in self._codes:
            self._codes[name] = Codes(self._edges.transform(self._dataset(name)))
        return self._codes[name]

    def _setup(self, payload: Payload) -> Payload:
        max_bin = _int(payload, "max_bin", 2, MAX_MAX_BIN)
        train = require(payload, "train", str)
        assert isinstance(train, str)
        names = _names(payload, "datasets")
        upload = require(payload, "upload_codes", bool)
        if train not in names:
            raise MessageError("the training set must be among the datasets")
        self._edges = BinEdges.fit(self._dataset(train), max_bin)
        self._codes = {}
        self._train, self._tree, self._thresholds = train, -1, None
        answer: Payload = {
            "n_features": self.n_features,
            "n_bins": self._edges.n_bins,
            "n_rows": {name: len(self._dataset(name)) for name in names},
        }
        if upload:
            answer["codes"] = {name: self._codes_of(name).by_row for name in names}
        return answer

    def _send_labels(self, payload: Payload) -> Payload:
        names = _names(payload, "datasets")
        if any(name not in self._labels for name in names):
            raise MessageError("this party holds no labels for a requested dataset")
        return {"labels": {name: self._labels[name] for name in names}}

    def _gradients(self, payload: Payload) -> Payload:
        tree = _int(payload, "tree", self._tree + 1, 2**31)
        n = self._codes_of(self._train).n_rows
        grad = _array(payload, "grad", "f", 1)
        hess = _array(payload, "hess", "f", 1)
        features = _array(payload, "features", "iu", 1).astype(np.int64)
        if grad.dtype != np.float32 or hess.dtype != np.float32 or len(grad) != n or len(hess) != n:
            raise ProtocolError("gradients must be float32, one per training row")
        if not (np.isfinite(grad).all() and np.isfinite(hess).all() and (hess >= 0).all()):
            raise ProtocolError("gradients must be finite with non-negative hessians")
        if len(features) and (features.min() < 0 or features.max() >= self.n_features):
            raise ProtocolError("tree features out of range")
        if (np.diff(features) <= 0).any():
            raise ProtocolError("tree features must be sorted and distinct")
        self._tree, self._features = tree, features
        self._gh = np.empty(n, dtype=np.complex128)
        self._gh.real, self._gh.imag = grad, hess
        return {}

    def _rows(self, payload: Payload, n_nodes: int | None = None) -> tuple[np.ndarray | None, np.ndarray]:
        if _int(payload, "tree", 0, 2**31) != self._tree:
            raise ProtocolError("request is about another tree than the current gradients")
        counts = _array(payload, "counts", "iu", 1).astype(np.int64)
        n = len(self._gh)
        if (counts < 0).any() or (n_nodes is not None and len(counts) != n_nodes):
            raise ProtocolError("node row counts malformed")
        if "rows" not in payload:
            if counts.tolist() != [n]:
                raise ProtocolError("without rows, the one node is all training rows")
            return None, counts
        rows = _array(payload, "rows", "iu", 1).astype(np.intp)
        if len(rows) != counts.sum() or (len(rows) and (rows.min() < 0 or rows.max() >= n)):
            raise ProtocolError("rows out of range or not matching the node counts")
        return rows, counts

    def _histograms(self, payload: Payload) -> Payload:
        rows, counts = self._rows(payload)
        assert self._edges is not None
        stride = self._edges.max_bin + 1
        hist = build_histograms(self._codes_of(self._train), self._features, self._gh, rows, counts, stride)
        return {"hist": hist.view(np.float64).reshape((*hist.shape, 2))}

    def _check_splits(self, payload: Payload, allowed: np.ndarray | None) -> np.ndarray:
        splits = _array(payload, "splits", "iu", 2).astype(np.int64)
        if splits.shape[1] != 3:
            raise ProtocolError("splits must be (feature, bin, default_left) rows")
        feature, bins, default_left = splits.T
        if len(splits) and (feature.min() < 0 or feature.max() >= self.n_features):
            raise ProtocolError("split feature out of range")
        if allowed is not None and not np.isin(feature, allowed).all():
            raise ProtocolError("split on a feature the model does not use")
        n_bins = self._n_bins()
        if len(splits) and ((bins < -1).any() or (bins >= n_bins[feature]).any()):
            raise ProtocolError("split bin out of range")
        if ((default_left != 0) & (default_left != 1)).any():
            raise ProtocolError("default_left must be 0 or 1")
        return splits

    def _n_bins(self) -> np.ndarray:
        if self._edges is not None:
            return self._edges.n_bins
        model = self.thresholds
        n_bins = np.zeros(self.n_features, dtype=np.int64)
        n_bins[model.features] = model.edges.n_bins
        return n_bins

    def _partition(self, payload: Payload) -> Payload:
        splits = self._check_splits(payload, self._features)
        rows, counts = self._rows(payload, len(splits))
        if rows is None:
            raise ProtocolError("a partition names its rows")
        assert self._edges is not None
        left = partition_rows(self._codes_of(self._train), rows, counts, splits, self._edges.max_bin)
        return {"left": np.packbits(left)}

    def _predict(self, payload: Payload) -> Payload:
        name = require(payload, "dataset", str)
        assert isinstance(name, str)
        x = self._dataset(name)
        if self._edges is not None:
            splits = self._check_splits(payload, None)
            codes, missing = self._codes_of(name), self._edges.max_bin
        else:
            model = self.thresholds
            if payload.get("model_id", "") != model.model_id:
                raise ProtocolError("the server's model is not the one this model part was trained with")
            splits = self._check_splits(payload, model.features)
            # Only the used features have edges: code them and renumber the splits.
            key = f"\0model:{name}"
            if key not in self._codes:
                self._codes[key] = Codes(model.edges.transform(x[:, model.features]))
            codes, missing = self._codes[key], model.edges.max_bin
            splits = splits.copy()
            splits[:, 0] = np.searchsorted(model.features, splits[:, 0])
        n = len(x)
        left = np.zeros((len(splits), (n + 7) // 8), dtype=np.uint8)
        for i, (feature, bin_index, default_left) in enumerate(splits.tolist()):
            left[i] = np.packbits(goes_left(codes.column(feature), bin_index, bool(default_left), missing))
        return {"left": left, "n_rows": n}

    def _finish(self, payload: Payload) -> Payload:
        features = _array(payload, "features", "iu", 1).astype(np.int64)
        if self._edges is None:
            raise ProtocolError("boost.setup has not run")
        if len(features) and (features.min() < 0 or features.max() >= self.n_features):
            raise ProtocolError("used features out of range")
        if (np.diff(features) <= 0).any():
            raise ProtocolError("used features must be sorted and distinct")
        model_id = payload.get("model_id", "")
        if not isinstance(model_id, str) or len(model_id) > 64:
            raise MessageError("field 'model_id' must be a short string")
        self._thresholds = PartyThresholds(
            self.name, self.n_features, features, self._edges.subset(features), model_id
        )
        return {}
