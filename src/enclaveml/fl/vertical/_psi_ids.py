"""A party's PSI identifiers as bytes, and the one canonical order of an intersection.

Both PSI modes work on byte strings, and every party must turn the same entity into the same bytes,
so there is exactly one normalisation:

- ``str`` → its UTF-8 encoding (no Unicode normalisation: ``"é"`` composed and decomposed differ);
- ``int`` (Python or numpy integers, not ``bool``) → its decimal ASCII digits, with a leading ``-``
  for negatives (``42`` and ``"42"`` are therefore the same ID);
- ``bytes`` / ``bytearray`` → as they are.

A party's IDs must all be of one of these kinds, and distinct after normalisation. Errors name
positions and counts, never an ID: they may end up in logs outside the party.

The canonical order of an intersection is ascending by these bytes (lexicographic, so ``"10"``
sorts before ``"9"``). Every party holds the same intersection IDs, so every party computes the
same order locally, whatever the PSI mode; no order ever crosses the wire.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import numpy as np
from numpy.typing import NDArray

from enclaveml.errors import ConfigurationError
from enclaveml.fl.vertical._errors import ProtocolError

__all__ = ["canonical_rows", "check_set_size", "normalise_ids"]

Rows = NDArray[np.int64]


def _kind(kind: type) -> str | None:
    if issubclass(kind, bool | np.bool_):
        return None
    if issubclass(kind, str):
        return "str"
    if issubclass(kind, int | np.integer):
        return "int"
    if issubclass(kind, bytes | bytearray):
        return "bytes"
    return None


def normalise_ids(ids: Iterable[object]) -> list[bytes]:
    """``ids`` as bytes (see the module docstring), or :class:`ConfigurationError`.

    :raises ConfigurationError: an ID of an unsupported type, a mix of kinds, a string that is not
        valid Unicode, or duplicates. The message gives positions and counts, never an ID.
    """
    if isinstance(ids, str | bytes | bytearray):
        raise ConfigurationError("PSI IDs must be a sequence of IDs, not one string")
    values = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    if not values:
        return []
    first = _kind(type(values[0]))
    if first is None or any(_kind(t) != first for t in set(map(type, values))):
        position = next(i for i, v in enumerate(values) if _kind(type(v)) != first or first is None)
        raise ConfigurationError(
            "PSI IDs must all be of one kind, str, int or bytes: the one at position "
            f"{position} is a {type(values[position]).__name__}, the first a {type(values[0]).__name__}"
        )
    out: list[bytes]
    if first == "str":
        texts = cast(list[str], values)
        try:
            out = [v.encode("utf-8") for v in texts]
        except UnicodeEncodeError:
            position = next(i for i, v in enumerate(texts) if not _encodes(v))
            raise ConfigurationError(f"the PSI ID at position {position} is not valid Unicode") from None
    elif first == "bytes":
        out = [bytes(v) for v in cast(list[bytes], values)]
    else:
        out = [b"%d" % v for v in cast(list[int], values)]
    repeated = len(out) - len(set(out))
    if repeated:
        raise ConfigurationError(
            f"the PSI IDs hold {repeated} repeated value(s) after normalisation; each row needs a unique ID"
        )
    return out


def _encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def canonical_rows(ids: Sequence[bytes], rows: Iterable[int] | Rows) -> Rows:
    """``rows`` (positions into ``ids``) sorted by their IDs' bytes: the canonical aligned order."""
    ordered = sorted(np.asarray(rows, dtype=np.int64).tolist(), key=ids.__getitem__)
    result = np.asarray(ordered, dtype=np.int64)
    result.flags.writeable = False
    return result


def check_set_size(party: str, size: int, max_ids: int | None) -> None:
    """The server's check of the plan's ``psi_max_ids`` on a set a party sent (ProtocolError)."""
    if max_ids is not None and size > max_ids:
        raise ProtocolError(
            f"party {party!r} sent {size} IDs; the plan allows at most {max_ids} (psi_max_ids)"
        )
