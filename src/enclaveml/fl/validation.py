"""Update validation: what the aggregator checks, inside the TEE, before any strategy sees an update.

Checks, in order; the first that fails rejects the update with a short reason:

1. ``client_id`` unique in the round (two updates under one id are both rejected);
2. ``num_examples`` is a positive integer (FedAvg weights by it);
3. the number of arrays, then each array's type, dtype and shape match the global model;
4. no NaN or Inf (found through the norm below: a non-finite norm triggers the element check);
5. the L2 norm of the change ``w - w_global`` over the float arrays is at most ``max_norm``;
6. that norm is at most ``norm_outlier_factor`` times the median norm of the updates that passed
   1-5 (skipped when that median is 0). Scaled-up ("boosted") model-replacement updates are the
   typical catch. With one or two updates the rule cannot reject anything (for a factor >= 2):
   there is no majority to compare with.

The round goes on without the rejected updates. Reasons are fixed phrases plus array indices,
shapes and dtypes from the model's layout: never parameter values or statistics of them (a
norm says something about a client's data), because the reasons are logged and returned to
operators outside the TEE.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategies._kernels import delta_sq_norms
from enclaveml.fl.strategy import ClientUpdate, Weights

__all__ = ["DEFAULT_NORM_OUTLIER_FACTOR", "ValidationResult", "validate_updates"]

DEFAULT_NORM_OUTLIER_FACTOR = 10.0


@dataclass(frozen=True)
class ValidationResult:
    """The updates that may be aggregated, in input order, and why each other one was not."""

    accepted: list[ClientUpdate]
    rejected: dict[str, str] = field(default_factory=dict)


def validate_updates(
    global_weights: Weights,
    updates: Sequence[ClientUpdate],
    *,
    max_norm: float | None = None,
    norm_outlier_factor: float | None = DEFAULT_NORM_OUTLIER_FACTOR,
) -> ValidationResult:
    """Split ``updates`` into accepted ones and ``{client_id: reason}`` for the rest.

    ``max_norm`` (off by default) bounds the L2 norm of each update's change from
    ``global_weights``; ``norm_outlier_factor`` (default 10, ``None`` to disable) bounds it
    relative to the median over the round. Both come from the training plan, so participants
    see them in the attested plan.
    """
    _check_options(max_norm, norm_outlier_factor)
    counts = Counter(u.client_id for u in updates)
    rejected: dict[str, str] = {}
    well_formed: list[ClientUpdate] = []
    for update in updates:
        # Two updates under one id: neither can be trusted to be the client's own.
        reason = (
            "duplicate client_id"
            if counts[update.client_id] > 1
            else _structure_problem(global_weights, update)
        )
        if reason is None:
            well_formed.append(update)
        else:
            rejected[update.client_id] = reason

    norms = np.sqrt(delta_sq_norms(global_weights, [u.weights for u in well_formed]))
    bounded: list[tuple[ClientUpdate, float]] = []
    for update, norm in zip(well_formed, norms, strict=True):
        if not math.isfinite(norm):
            finite = all(np.isfinite(w).all() for w in update.weights if w.dtype.kind in "fc")
            rejected[update.client_id] = "update norm overflows" if finite else "contains NaN or Inf"
        elif max_norm is not None and norm > max_norm:
            rejected[update.client_id] = "update norm exceeds max_norm"
        else:
            bounded.append((update, float(norm)))

    accepted = [u for u, _ in bounded]
    if norm_outlier_factor is not None and bounded:
        median = float(np.median([n for _, n in bounded]))
        if median > 0:
            accepted = []
            for update, norm in bounded:
                if norm > norm_outlier_factor * median:
                    rejected[update.client_id] = "update norm is an outlier (above factor x median)"
                else:
                    accepted.append(update)
    return ValidationResult(accepted=accepted, rejected=rejected)


def _check_options(max_norm: float | None, factor: float | None) -> None:
    for name, value, low in (("max_norm", max_norm, 0.0), ("norm_outlier_factor", factor, 1.0)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not low < value < math.inf:
            raise ConfigurationError(f"validation option {name} must be a number > {low} or None")


def _structure_problem(global_weights: Weights, update: ClientUpdate) -> str | None:
    """Why ``update`` cannot be aggregated with ``global_weights`` as template, or None."""
    count = update.num_examples
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count <= 0:
        return "num_examples must be a positive integer"
    weights = update.weights
    if not isinstance(weights, list | tuple) or len(weights) != len(global_weights):
        got = len(weights) if isinstance(weights, list | tuple) else "no list of"
        return f"expected {len(global_weights)} arrays, got {got}"
    for k, (w, g) in enumerate(zip(weights, global_weights, strict=True)):
        if not isinstance(w, np.ndarray):
            return f"array {k} is not a numpy array"
        if w.dtype != g.dtype:
            return f"array {k} has dtype {_dtype_name(w.dtype)}, expected {g.dtype}"
        if w.shape != g.shape:
            return f"array {k} has shape {w.shape}, expected {g.shape}"
    return None


def _dtype_name(dtype: np.dtype) -> str:
    """A dtype's name, but not a structured dtype's field names (client-chosen text)."""
    return "structured" if dtype.fields is not None else dtype.name
