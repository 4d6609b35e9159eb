"""Argument checks shared by the strategies, with messages that say what to change."""

from __future__ import annotations

import math
from collections.abc import Sequence

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategy import ClientUpdate

__all__ = ["check_number", "require_updates"]


def require_updates(name: str, updates: Sequence[ClientUpdate], minimum: int = 1) -> None:
    """Refuse to aggregate fewer than ``minimum`` accepted updates (the round must be retried)."""
    if len(updates) < minimum:
        raise ConfigurationError(
            f"strategy {name!r} needs at least {minimum} accepted update(s) per round, got {len(updates)}:"
            f" raise the plan's min_clients to {minimum} or more"
        )


def check_number(
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_closed: bool = False,
) -> float:
    """``value`` as a float in ``[low, high)``; ``low_open`` / ``high_closed`` move the brackets."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, got {value!r}")
    number = float(value)
    too_low = number < low or (low_open and number == low)
    too_high = number > high or (not high_closed and number == high)
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if high_closed else ')'}"
        raise ConfigurationError(f"{name} must lie in {interval}, got {number}")
    return number
