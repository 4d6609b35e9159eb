"""Vertical boosting against central xgboost ``hist`` on the same bins: same trees, same AUC.

The reference is xgboost trained centrally on our bin codes (see ``tests/vfl_data.py``), so
every candidate split is the same on both sides and the comparison is of the algorithm: the trees
must agree split by split, and test AUC within 0.005 (the acceptance bound). With row or column
sampling the random draws differ, so there the parity is statistical only (a looser bound, said so).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from enclaveml.fl.vertical.boosting import BoostingParams, predict_boosting, train_boosting
from tests import vfl_data as vd


def fit(data: vd.VerticalData, params: BoostingParams, valid: str | None = None):  # type: ignore[no-untyped-def]
    channels = data.channels()
    model = train_boosting(channels[0], channels[1:], params, valid=valid)
    return model, predict_boosting(model, channels, "test")


def assert_same_trees(model, booster, at_least: float = 1.0) -> None:  # type: ignore[no-untyped-def]
    ours = [vd.canonical_ours(t) for t in model.trees]
    theirs = vd.xgb_trees(booster)
    assert len(ours) == len(theirs)
    same = [vd.same_tree(a, b) for a, b in zip(ours, theirs, strict=True)]
    assert np.mean(same) >= at_least, f"trees differ: {[i for i, s in enumerate(same) if not s]}"


def with_missing(data: vd.VerticalData, fraction: float, seed: int = 1) -> vd.VerticalData:
    rng = np.random.default_rng(seed)
    for x in data.x.values():
        x[rng.random(x.shape) < fraction] = np.nan
    return data


@pytest.mark.parametrize(
    "params",
    [
        BoostingParams(n_estimators=40),
        BoostingParams(
            n_estimators=40, max_depth=3, learning_rate=0.1, reg_lambda=5.0, gamma=0.5, min_child_weight=3.0
        ),
        BoostingParams(n_estimators=30, max_bin=16, learning_rate=0.5),
    ],
    ids=["defaults", "regularised", "16-bins"],
)
def test_breast_cancer_grows_xgboosts_trees(params: BoostingParams) -> None:
    data = vd.breast_cancer(2)
    model, p = fit(data, params)
    booster, matrices = vd.central_booster(data, params)
    assert_same_trees(model, booster)
    reference = booster.predict(matrices["test"])
    np.testing.assert_allclose(p, reference, atol=1e-6)
    assert abs(vd.auc(data.y["test"], p) - vd.auc(data.y["test"], reference)) <= 0.005


def test_intercept_is_xgboosts_estimate() -> None:
    for data, objective in ((vd.breast_cancer(2), "binary:logistic"), (vd.diabetes(2), "reg:squarederror")):
        params = BoostingParams(objective=objective, n_estimators=1)
        model, _ = fit(data, params)
        booster, _ = vd.central_booster(data, params)
        theirs = json.loads(booster.save_config())["learner"]["learner_model_param"]["base_score"]
        assert model.params["base_score"] == pytest.approx(float(theirs.strip("[]")), rel=1e-6)


def test_missing_values_learn_xgboosts_default_directions() -> None:
    data = with_missing(vd.breast_cancer(3), 0.1)
    params = BoostingParams(n_estimators=40)
    model, p = fit(data, params)
    booster, matrices = vd.central_booster(data, params)
    assert_same_trees(model, booster)
    assert any(t.default_left[t.feature >= 0].any() for t in model.trees), "no split sent missing values left"
    assert (np.concatenate([t.bin for t in model.trees]) == -1).any() or True  # bin -1 is legal, not required
    np.testing.assert_allclose(p, booster.predict(matrices["test"]), atol=1e-6)


def test_regression_matches_xgboost() -> None:
    data = vd.diabetes(2)
    params = BoostingParams(objective="reg:squarederror", n_estimators=40, learning_rate=0.1)
    model, p = fit(data, params)
    booster, matrices = vd.central_booster(data, params)
    assert_same_trees(model, booster)
    reference = booster.predict(matrices["test"])
    np.testing.assert_allclose(p, reference, rtol=1e-5, atol=1e-3)
    rmse = float(np.sqrt(np.mean((p - data.y["test"]) ** 2)))
    assert rmse == pytest.approx(float(np.sqrt(np.mean((reference - data.y["test"]) ** 2))), rel=1e-5)


def test_synthetic_three_parties_20k_rows() -> None:
    data = vd.synthetic(20_000, 3)
    params = BoostingParams(n_estimators=50, learning_rate=0.1)
    model, p = fit(data, params)
    booster, matrices = vd.central_booster(data, params)
    # Leaf values can differ in the last float32 digit, so a later near-tie may in principle
    # break the other way; the trees must still agree almost everywhere.
    assert_same_trees(model, booster, at_least=0.95)
    assert abs(vd.auc(data.y["test"], p) - vd.auc(data.y["test"], booster.predict(matrices["test"]))) <= 0.005


def test_synthetic_three_parties_100k_rows() -> None:
    data = vd.synthetic(100_000, 3)
    params = BoostingParams(n_estimators=100, learning_rate=0.1)
    _model, p = fit(data, params)
    booster, matrices = vd.central_booster(data, params)
    assert abs(vd.auc(data.y["test"], p) - vd.auc(data.y["test"], booster.predict(matrices["test"]))) <= 0.005


def test_raw_features_with_xgboosts_own_bins_is_close() -> None:
    """Informational: xgboost on raw values cuts its own quantiles, so only near equality holds."""
    data = vd.breast_cancer(2)
    params = BoostingParams(n_estimators=40)
    _, p = fit(data, params)
    booster, matrices = vd.central_booster(data, params, on_codes=False)
    assert abs(vd.auc(data.y["test"], p) - vd.auc(data.y["test"], booster.predict(matrices["test"]))) <= 0.02


def test_sampling_is_statistically_equivalent() -> None:
    """Row and column sampling draw from different generators than xgboost's, so the trees differ;
    over several seeds the mean test AUC must still agree within 0.01 (a looser, honest bound)."""
    data = vd.synthetic(8_000, 3)
    ours, theirs = [], []
    for seed in range(3):
        params = BoostingParams(
            n_estimators=40, learning_rate=0.1, subsample=0.7, colsample_bytree=0.8,
            colsample_bylevel=0.8, colsample_bynode=0.8, seed=seed,
        )  # fmt: skip
        _, p = fit(data, params)
        booster, matrices = vd.central_booster(data, params)
        ours.append(vd.auc(data.y["test"], p))
        theirs.append(vd.auc(data.y["test"], booster.predict(matrices["test"])))
    assert abs(np.mean(ours) - np.mean(theirs)) <= 0.01


@pytest.mark.parametrize("metric", ["logloss", "auc"])
def test_early_stopping_keeps_xgboosts_best_iteration(metric: str) -> None:
    data = vd.breast_cancer(2, valid=True)
    params = BoostingParams(n_estimators=200, learning_rate=0.3, early_stopping_rounds=5, eval_metric=metric)
    model, p = fit(data, params, valid="valid")
    booster, matrices = vd.central_booster(data, params)
    assert model.best_iteration == booster.best_iteration
    assert len(model.trees) == model.best_iteration + 1
    assert len(model.evals) == model.best_iteration + 1 + 5  # stopped after 5 trees without improvement
    best = max(model.evals) if metric == "auc" else min(model.evals)
    assert model.evals[model.best_iteration] == best
    xgb_best = booster.predict(matrices["test"], iteration_range=(0, booster.best_iteration + 1))
    np.testing.assert_allclose(p, xgb_best, atol=1e-6)


def test_regression_early_stopping_on_rmse() -> None:
    data = vd.diabetes(2, valid=True)
    params = BoostingParams(
        objective="reg:squarederror", n_estimators=300, learning_rate=0.3, early_stopping_rounds=3
    )
    model, _ = fit(data, params, valid="valid")
    booster, _ = vd.central_booster(data, params)
    assert model.best_iteration == booster.best_iteration
    assert model.params["eval_metric"] is None
    assert len(model.evals) == model.best_iteration + 4
