"""Strategies by name, and a strategy rebuilt from its plan.

Why: the plan (:meth:`Strategy.plan`) is what participants verify in the attestation, so the
aggregator should run exactly the strategy a plan file describes. :func:`strategy_from_plan`
builds it (wrappers' ``inner`` plans recursively) and fails closed unless the result reports
the very same plan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategies.central_dp import CentralDP
from enclaveml.fl.strategies.clipping import NormClipping
from enclaveml.fl.strategies.fedadam import FedAdam
from enclaveml.fl.strategies.fedavg import FedAvg
from enclaveml.fl.strategies.fedprox import FedProx
from enclaveml.fl.strategies.fedyogi import FedYogi
from enclaveml.fl.strategies.krum import Krum
from enclaveml.fl.strategies.median import CoordinateMedian
from enclaveml.fl.strategies.trimmed_mean import TrimmedMean
from enclaveml.fl.strategy import Strategy

__all__ = ["STRATEGIES", "strategy_from_plan"]

STRATEGIES: Mapping[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg, FedProx, FedAdam, FedYogi, CoordinateMedian, TrimmedMean, Krum, NormClipping, CentralDP
    )
}  # fmt: skip


def strategy_from_plan(plan: Mapping[str, Any]) -> Strategy:
    """The strategy ``plan`` describes; ConfigurationError if unknown or not reproduced exactly."""
    name = plan.get("name") if isinstance(plan, Mapping) else None
    cls = STRATEGIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigurationError(f"unknown strategy {name!r}: expected one of {sorted(STRATEGIES)}")
    kwargs = {k: v for k, v in plan.items() if k != "name"}
    if "inner" in kwargs:
        kwargs["inner"] = strategy_from_plan(kwargs["inner"])
    try:
        strategy = cls(**kwargs)
    except TypeError as exc:
        raise ConfigurationError(f"strategy {name!r} does not take these parameters: {exc}") from exc
    if _canonical(strategy.plan()) != _canonical(plan):
        raise ConfigurationError(f"strategy {name!r} rebuilt from the plan reports another plan")
    return strategy


def _canonical(plan: Mapping[str, Any]) -> str:
    return json.dumps(plan, sort_keys=True)
