"""Update validation: what the aggregator checks, inside the TEE, before any strategy sees an update.

Checks, in order; the first that fails rejects the update with a short reason:

1. ``client_id`` unique in the round (two updates under one id are both rejected);
2. ``num_examples`` is a positive integer (FedAvg weights by it);
3. the number of arrays, then each array's type, dtype and shape match the global model;
4. no NaN or Inf (found through the norm below: a non-finite norm triggers the element check),
   and no bool array holding a byte other than 0 or 1 (:func:`bool_problem`);
5. the L2 norm of the change ``w - w_global`` over the float arrays is at most ``max_norm``;
6. that norm is at most ``norm_outlier_factor`` times the median norm of the updates that passed
   1-5 (skipped when that median is 0). Scaled-up ("boosted") model-replacement updates are the
   typical catch. With one or two updates the rule cannot reject anything (for a factor >= 2):
   there is no majority to compare with.

Integer and bool arrays (counters such as BatchNorm's ``num_batches_tracked``, masks) are left
out of the norms on purpose: they are not model directions, a counter's change (the local step
count) would dwarf the weights', and no bound fits every model. What keeps them in check is the
aggregation instead: every built-in strategy takes their coordinate-wise median over the accepted
updates, exactly in their dtype (:mod:`enclaveml.fl.strategies._discrete`), which fewer than half
of the clients cannot move outside the honest values. Rule 4 refuses what a dtype cannot hold:
NaN/Inf in a float, and in a bool any byte but 0 and 1 (the wire carries raw bytes; numpy reads
such a byte as True but keeps it, so a strategy that passes it on would hand it to everyone).

The aggregator applies the same rules in two steps (:mod:`enclaveml.fl._round`): 2-4 on each
upload as it arrives (:func:`structure_problem`, then the norm of the change computed while the
upload is copied into its row, :func:`nonfinite_reason` and :func:`bool_problem` on the copy),
5-6 on the norms alone when the round closes (:func:`judge_norms`); so closing a round reads no
update a second time. :func:`validate_updates` applies all of them to a list of updates at once.

The round goes on without the rejected updates. Reasons are fixed phrases plus array indices,
shapes and dtypes from the model's layout: never parameter values or statistics of them (a
norm says something about a client's data), because the reasons are logged and returned to
operators outside the TEE.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategies._kernels import delta_sq_norms
from enclaveml.fl.strategy import ClientUpdate, Weights

__all__ = [
    "DEFAULT_NORM_OUTLIER_FACTOR",
    "ValidationResult",
    "bool_problem",
    "check_options",
    "judge_norms",
    "nonfinite_reason",
    "structure_problem",
    "validate_updates",
    "validation_options",
]

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
    check_options(max_norm, norm_outlier_factor)
    counts = Counter(u.client_id for u in updates)
    rejected: dict[str, str] = {}
    well_formed: list[ClientUpdate] = []
    for update in updates:
        # Two updates under one id: neither can be trusted to be the client's own.
        reason = (
            "duplicate client_id"
            if counts[update.client_id] > 1
            else _examples_problem(update.num_examples) or structure_problem(global_weights, update.weights)
        )
        if reason is None:
            well_formed.append(update)
        else:
            rejected[update.client_id] = reason

    sq_norms = delta_sq_norms(global_weights, [u.weights for u in well_formed])
    finite: list[ClientUpdate] = []
    finite_sq: list[float] = []
    for update, sq in zip(well_formed, sq_norms, strict=True):
        reason = bool_problem(update.weights) if math.isfinite(sq) else nonfinite_reason(update.weights)
        if reason is None:
            finite.append(update)
            finite_sq.append(float(sq))
        else:
            rejected[update.client_id] = reason
    verdicts = judge_norms(
        np.array(finite_sq, dtype=np.float64), max_norm=max_norm, norm_outlier_factor=norm_outlier_factor
    )
    accepted = []
    for update, verdict in zip(finite, verdicts, strict=True):
        if verdict is None:
            accepted.append(update)
        else:
            rejected[update.client_id] = verdict
    return ValidationResult(accepted=accepted, rejected=rejected)


def judge_norms(
    sq_norms: np.ndarray, *, max_norm: float | None, norm_outlier_factor: float | None
) -> list[str | None]:
    """Rules 5 and 6 on the (finite) squared norms of the changes: a reason per update, or None."""
    norms = [math.sqrt(float(sq)) for sq in sq_norms]  # a few hundred at most: plain Python is faster
    verdicts: list[str | None] = [None] * len(norms)
    bounded: list[int] = []
    for i, norm in enumerate(norms):
        if max_norm is not None and norm > max_norm:
            verdicts[i] = "update norm exceeds max_norm"
        else:
            bounded.append(i)
    if norm_outlier_factor is not None and bounded:
        median = statistics.median(norms[i] for i in bounded)
        if median > 0:
            for i in bounded:
                if norms[i] > norm_outlier_factor * median:
                    verdicts[i] = "update norm is an outlier (above factor x median)"
    return verdicts


def nonfinite_reason(weights: Weights) -> str:
    """Why an update whose norm is not finite is rejected: NaN/Inf, or a float overflow."""
    finite = all(np.isfinite(w).all() for w in weights if w.dtype.kind in "fc")
    return "update norm overflows" if finite else "contains NaN or Inf"


def bool_problem(weights: Weights) -> str | None:
    """Why an update with a bool array holding a byte other than 0 or 1 is rejected, or None."""
    for k, w in enumerate(weights):
        if w.dtype.kind == "b" and w.size and int(w.view(np.uint8).max()) > 1:
            return f"array {k} holds bool bytes other than 0 and 1"
    return None


def validation_options(options: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """``max_norm`` and ``norm_outlier_factor`` from a plan's validation options, checked now."""
    unknown = set(options) - {"max_norm", "norm_outlier_factor"}
    if unknown:
        known = "max_norm, norm_outlier_factor"
        raise ConfigurationError(f"unknown validation options {sorted(unknown)}; known: {known}")
    max_norm = options.get("max_norm")
    factor = options.get("norm_outlier_factor", DEFAULT_NORM_OUTLIER_FACTOR)
    check_options(max_norm, factor)
    return max_norm, factor


def check_options(max_norm: float | None, factor: float | None) -> None:
    """Refuse validation options that are not numbers in range (they come from the plan)."""
    for name, value, low in (("max_norm", max_norm, 0.0), ("norm_outlier_factor", factor, 1.0)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not low < value < math.inf:
            raise ConfigurationError(f"validation option {name} must be a number > {low} or None")


def _examples_problem(count: object) -> str | None:
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count <= 0:
        return "num_examples must be a positive integer"
    return None


def structure_problem(global_weights: Weights, weights: object) -> str | None:
    """Why ``weights`` cannot be aggregated with ``global_weights`` as template, or None."""
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
