"""Verification time: injectable everywhere so tests can pin the clock to a vector's window."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from enclaveml.errors import ConfigurationError

__all__ = ["Instant", "to_datetime", "to_unix"]

Instant = int | float | datetime | None


def to_unix(now: Instant) -> int:
    """Return ``now`` as integer Unix seconds; ``None`` means the current time."""
    if now is None:
        return int(time.time())
    if isinstance(now, datetime):
        if now.tzinfo is None:
            raise ConfigurationError("verification time must be timezone-aware")
        value = int(now.timestamp())
    elif isinstance(now, int | float):
        value = int(now)
    else:
        raise ConfigurationError(f"verification time must be Unix seconds or a datetime, got {now!r}")
    if value < 0:
        raise ConfigurationError("verification time must not be negative")
    return value


def to_datetime(unix: int) -> datetime:
    """Unix seconds to an aware UTC datetime."""
    return datetime.fromtimestamp(unix, tz=UTC)
