"""Exact CBOR decoding: one item and nothing after it.

``cbor2.loads`` decodes the first item of its input and ignores any bytes that follow, so two
different byte strings (an item, and the item followed by junk) decode to the same value. Where
the bytes are what is bound (a hash over RA-TLS claims, evidence envelopes, answers checked
against a nonce), a decoder must accept exactly one encoding of what it returns.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

__all__ = ["loads_exact"]


def loads_exact(data: bytes) -> Any:
    """Decode one CBOR item that spans all of ``data``.

    :raises cbor2.CBORDecodeError: bytes follow the item (and whatever ``cbor2`` raises on
        malformed input, as ``cbor2.loads`` does).
    """
    stream = io.BytesIO(data)
    value = cbor2.CBORDecoder(stream).decode()
    if stream.tell() != len(data):
        raise cbor2.CBORDecodeError(f"{len(data) - stream.tell()} bytes follow the CBOR item")
    return value
