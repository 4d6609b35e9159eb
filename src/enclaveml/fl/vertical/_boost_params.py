"""The hyperparameters of vertical boosting (see :mod:`enclaveml.fl.vertical.boosting`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.fl.vertical._binning import MAX_MAX_BIN
from enclaveml.fl.vertical._boost_grower import OBJECTIVES

__all__ = ["METRICS", "BoostingParams", "unfit_labels"]

METRICS = ("logloss", "auc", "rmse")


_MAX_LABEL_SUM = 1e18  # a sum of gradients below this squares to at most ~1e36, inside float32


def unfit_labels(y: np.ndarray, objective: str) -> str | None:
    """Why ``objective`` cannot train on the finite labels ``y``, or None if it can.

    The label party checks its own labels with this before it connects (so a mistake is reported
    to it alone); the server checks what it receives again, and tells the parties only that the
    labels were refused (the reason is a fact about the labels).
    """
    if objective == "binary:logistic" and not ((y >= 0) & (y <= 1)).all():
        return "labels outside [0, 1] for a classifier"
    # Training runs in float32, where split gains square sums of gradients over the rows: labels
    # whose sums could pass ~1e18 overflow there (wrong splits, or inf and a NaN model).
    if len(y) and float(np.abs(y).max()) * len(y) > _MAX_LABEL_SUM:
        return f"labels too large for float32 training (max |label| x rows > {_MAX_LABEL_SUM:g}): scale them"
    return None


def _fraction(value: float) -> bool:
    return isinstance(value, int | float) and 0 < value <= 1


@dataclass(frozen=True)
class BoostingParams:
    """The hyperparameters, with xgboost's names, defaults and meanings; :meth:`to_dict` is what
    a vertical job's plan carries."""

    objective: str = "binary:logistic"
    n_estimators: int = 100
    learning_rate: float = 0.3
    max_depth: int = 6
    reg_lambda: float = 1.0
    gamma: float = 0.0
    min_child_weight: float = 1.0
    subsample: float = 1.0
    colsample_bytree: float = 1.0
    colsample_bylevel: float = 1.0
    colsample_bynode: float = 1.0
    max_bin: int = 256
    base_score: float | None = None
    early_stopping_rounds: int | None = None
    eval_metric: str | None = None
    seed: int = 0
    histograms: str = "tee"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigurationError(f"objective must be one of {sorted(OBJECTIVES)}")
        if not (isinstance(self.n_estimators, int) and self.n_estimators >= 1):
            raise ConfigurationError("n_estimators must be an integer >= 1")
        if not (isinstance(self.max_depth, int) and 1 <= self.max_depth <= 30):
            raise ConfigurationError("max_depth must be an integer in [1, 30] (depthwise growth)")
        if not (isinstance(self.max_bin, int) and 2 <= self.max_bin <= MAX_MAX_BIN):
            raise ConfigurationError(f"max_bin must be an integer in [2, {MAX_MAX_BIN}]")
        for name in ("learning_rate", "reg_lambda", "gamma", "min_child_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < math.inf):
                raise ConfigurationError(f"{name} must be a finite number >= 0")
        for name in ("subsample", "colsample_bytree", "colsample_bylevel", "colsample_bynode"):
            if not _fraction(getattr(self, name)):
                raise ConfigurationError(f"{name} must be in (0, 1]")
        if self.base_score is not None and not (isinstance(self.base_score, int | float)):
            raise ConfigurationError("base_score must be a number or None (the mean label)")
        if (
            self.objective == "binary:logistic"
            and self.base_score is not None
            and not 0 < self.base_score < 1
        ):
            raise ConfigurationError("base_score of binary:logistic is a probability in (0, 1)")
        rounds = self.early_stopping_rounds
        if rounds is not None and not (isinstance(rounds, int) and rounds >= 1):
            raise ConfigurationError("early_stopping_rounds must be None or an integer >= 1")
        if self.eval_metric is not None and self.eval_metric not in METRICS:
            raise ConfigurationError(f"eval_metric must be one of {METRICS}")
        if self.objective == "reg:squarederror" and self.eval_metric in ("logloss", "auc"):
            raise ConfigurationError("regression is evaluated with rmse")
        if self.histograms not in ("tee", "party"):
            raise ConfigurationError("histograms must be 'tee' or 'party'")
        if not isinstance(self.seed, int):
            raise ConfigurationError("seed must be an integer")

    @property
    def metric(self) -> str:
        return self.eval_metric or OBJECTIVES[self.objective].default_metric

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BoostingParams:
        unknown = set(data) - set(cls().to_dict())
        if unknown:
            raise ConfigurationError(f"unknown boosting parameters: {sorted(unknown)}")
        return cls(**data)
