"""Vertical-FL test data: column splits of scikit-learn datasets, parties, and the central xgboost reference.

"Same bins" for the parity with xgboost: the reference trains on each party's bin *codes*
(concatenated in party order, missing as NaN) with ``max_bin`` at least the number of codes, so
xgboost's cut points fall between exactly our codes (checked by :func:`central_booster`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xgboost as xgb
from sklearn.datasets import load_breast_cancer, load_diabetes, make_classification
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from enclaveml.fl.vertical._binning import BinEdges
from enclaveml.fl.vertical._channel import InProcessChannel
from enclaveml.fl.vertical.boosting import BoostingParams, BoostingParty


@dataclass
class VerticalData:
    """Rows split into named datasets, columns into parties (party 0 holds the labels)."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    columns: list[np.ndarray]

    def parties(self, names: Sequence[str] | None = None) -> list[BoostingParty]:
        names = names or [f"party{i}" for i in range(len(self.columns))]
        return [
            BoostingParty(
                name,
                {k: v[:, cols] for k, v in self.x.items()},
                labels=dict(self.y) if i == 0 else None,
            )
            for i, (name, cols) in enumerate(zip(names, self.columns, strict=True))
        ]

    def channels(self) -> list[InProcessChannel]:
        return [InProcessChannel(p) for p in self.parties()]

    def codes(self, max_bin: int) -> dict[str, np.ndarray]:
        """Every dataset as our bin codes (float, NaN = missing), party by party: xgboost's input."""
        out: dict[str, list[np.ndarray]] = {k: [] for k in self.x}
        for cols in self.columns:
            edges = BinEdges.fit(self.x["train"][:, cols], max_bin)
            for k, v in self.x.items():
                c = edges.transform(v[:, cols]).astype(np.float64)
                c[c == max_bin] = np.nan
                out[k].append(c)
        return {k: np.hstack(v) for k, v in out.items()}


def _split(
    x: np.ndarray, y: np.ndarray, n_parties: int, seed: int, valid: bool, test_size: float
) -> VerticalData:
    stratify = y if len(np.unique(y)) == 2 else None
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=stratify
    )
    xs, ys = {"train": x_train, "test": x_test}, {"train": y_train, "test": y_test}
    if valid:
        strat = y_train if stratify is not None else None
        xs["train"], xs["valid"], ys["train"], ys["valid"] = train_test_split(
            x_train, y_train, test_size=0.2, random_state=seed, stratify=strat
        )
    columns = np.array_split(np.arange(x.shape[1]), n_parties)
    return VerticalData(xs, {k: v.astype(np.float64) for k, v in ys.items()}, columns)


def breast_cancer(n_parties: int = 2, *, valid: bool = False, seed: int = 0) -> VerticalData:
    x, y = load_breast_cancer(return_X_y=True)
    return _split(x, y, n_parties, seed, valid, 0.3)


def diabetes(n_parties: int = 2, *, valid: bool = False, seed: int = 0) -> VerticalData:
    x, y = load_diabetes(return_X_y=True)
    return _split(x, y, n_parties, seed, valid, 0.3)


def synthetic(n_rows: int, n_parties: int = 3, *, valid: bool = False, seed: int = 0) -> VerticalData:
    """``make_classification`` with ``n_rows`` training rows and a quarter as many test rows."""
    x, y = make_classification(
        n_samples=n_rows + n_rows // 4, n_features=30, n_informative=10, n_redundant=10,
        random_state=seed,
    )  # fmt: skip
    return _split(x, y, n_parties, seed, valid, 0.2)


def xgb_params(params: BoostingParams, n_threads: int = 2) -> dict[str, object]:
    """The central xgboost parameters equal to ``params``, ``tree_method="hist"``."""
    out: dict[str, object] = {
        "objective": params.objective,
        "tree_method": "hist",
        "eta": params.learning_rate,
        "max_depth": params.max_depth,
        "lambda": params.reg_lambda,
        "gamma": params.gamma,
        "min_child_weight": params.min_child_weight,
        "subsample": params.subsample,
        "colsample_bytree": params.colsample_bytree,
        "colsample_bylevel": params.colsample_bylevel,
        "colsample_bynode": params.colsample_bynode,
        "max_bin": params.max_bin,
        "nthread": n_threads,
        "seed": params.seed,
    }
    if params.base_score is not None:
        out["base_score"] = params.base_score
    if params.eval_metric is not None:
        out["eval_metric"] = params.eval_metric
    return out


def central_booster(
    data: VerticalData, params: BoostingParams, *, on_codes: bool = True, n_threads: int = 1
) -> tuple[xgb.Booster, dict[str, xgb.DMatrix]]:
    """xgboost trained centrally on the same rows: on our codes (same bins) or on raw values.

    One thread by default: on a shared machine, xgboost's OpenMP threads spin at every barrier
    while another process holds a core, and a test taking seconds takes minutes."""
    inputs = data.codes(params.max_bin) if on_codes else data.x
    matrices = {k: xgb.DMatrix(v, label=data.y[k], nthread=n_threads) for k, v in inputs.items()}
    if on_codes:
        # The premise of "same bins": xgboost keeps one bin per code we use (plus its empty
        # bin below the minimum, cut at -1e-5), so its candidate splits are exactly ours.
        cuts = xgb.QuantileDMatrix(inputs["train"], max_bin=params.max_bin)
        ptr, _ = cuts.get_quantile_cut()
        ours = np.concatenate(
            [BinEdges.fit(data.x["train"][:, c], params.max_bin).n_bins for c in data.columns]
        )
        present = ~np.all(np.isnan(inputs["train"]), axis=0)
        assert (np.diff(ptr)[present] == ours[present] + 1).all(), "xgboost did not keep one bin per code"
    evals = [(matrices["valid"], "valid")] if "valid" in matrices else []
    booster = xgb.train(
        xgb_params(params, n_threads),
        matrices["train"],
        num_boost_round=params.n_estimators,
        evals=evals,
        early_stopping_rounds=params.early_stopping_rounds,
        verbose_eval=False,
    )
    return booster, matrices


def auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p))


def canonical_ours(tree: object, node: int = 0) -> object:
    """A tree as nested tuples: (feature, bin, default_left, left, right) or the leaf value."""
    t = tree  # a boosting.Tree
    if t.feature[node] < 0:  # type: ignore[attr-defined]
        return float(t.value[node])  # type: ignore[attr-defined]
    return (
        int(t.feature[node]),  # type: ignore[attr-defined]
        int(t.bin[node]),  # type: ignore[attr-defined]
        bool(t.default_left[node]),  # type: ignore[attr-defined]
        canonical_ours(t, int(t.left[node])),  # type: ignore[attr-defined]
        canonical_ours(t, int(t.right[node])),  # type: ignore[attr-defined]
    )


def canonical_xgb(node: dict[str, object]) -> object:
    """An xgboost JSON dump node trained on our codes, in the form of :func:`canonical_ours`.

    xgboost's condition ``code < c`` with ``c = b + 1`` is our bin ``b`` (``c = -1e-5``: bin -1).
    """
    if "leaf" in node:
        return float(node["leaf"])  # type: ignore[arg-type]
    children = {c["nodeid"]: c for c in node["children"]}  # type: ignore[attr-defined,index]
    return (
        int(str(node["split"])[1:]),
        round(float(node["split_condition"])) - 1,  # type: ignore[arg-type]
        node["missing"] == node["yes"],
        canonical_xgb(children[node["yes"]]),
        canonical_xgb(children[node["no"]]),
    )


def same_tree(a: object, b: object, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    """Equal structure and splits, leaf values close: a small leaf's gradient sum cancels, so the
    order of summation (xgboost sums by thread blocks) moves its float32 value in the 5th digit."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, float) and isinstance(b, float) and abs(a - b) <= rtol * abs(b) + atol
    assert isinstance(a, tuple)
    assert isinstance(b, tuple)
    return a[:3] == b[:3] and same_tree(a[3], b[3], rtol, atol) and same_tree(a[4], b[4], rtol, atol)


def xgb_trees(booster: xgb.Booster) -> list[object]:
    import json

    return [canonical_xgb(json.loads(d)) for d in booster.get_dump(dump_format="json")]
