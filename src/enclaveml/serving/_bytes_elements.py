"""The Open Inference Protocol's BYTES layout, shared by the HTTP protocol and the queue payload.

Each element is a 4-byte little-endian length, then that many bytes; here always UTF-8 text (what
ONNX Runtime's string tensors hold). Callers turn the errors into their own typed ones.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

__all__ = ["ElementsError", "pack_elements", "unpack_elements"]

_LENGTH = struct.Struct("<I")


class ElementsError(ValueError):
    """The buffer does not hold the elements it should (too short, or an element runs past it)."""


def pack_elements(items: Iterable[str | bytes]) -> bytes:
    parts: list[bytes] = []
    for item in items:
        raw = item.encode() if isinstance(item, str) else bytes(item)
        parts += (_LENGTH.pack(len(raw)), raw)
    return b"".join(parts)


def unpack_elements(view: memoryview, offset: int, count: int) -> tuple[list[str], int]:
    """``count`` text elements from ``view[offset:]`` and the offset after them.

    Raises ElementsError, or UnicodeDecodeError for an element that is not UTF-8. ``count`` is
    checked against the bytes left before anything is allocated for it.
    """
    left = len(view) - offset
    if count * _LENGTH.size > left:
        raise ElementsError(f"{left} bytes cannot hold {count} BYTES elements")
    items: list[str] = []
    for _ in range(count):
        if offset + _LENGTH.size > len(view):
            raise ElementsError("BYTES data ends inside an element's length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if length > len(view) - offset:
            raise ElementsError("a BYTES element runs past the data")
        items.append(str(view[offset : offset + length], "utf-8"))
        offset += length
    return items, offset
