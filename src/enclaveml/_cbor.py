"""Strict CBOR decoding: one item, nothing after it, no duplicate map keys, definite lengths.

``cbor2.loads`` decodes the first item of its input and ignores any bytes that follow, keeps the
last of duplicate map keys, and accepts indefinite-length items, so many different byte strings
decode to the same value. Where the bytes are what is bound (a hash over RA-TLS claims, evidence
envelopes, answers checked against a nonce), those variants are refused. (Other alternative
encodings still decode, which cbor2 has no check for: map key order, integer and float widths,
bignum and shared-reference tags.)
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

__all__ = ["loads_exact"]


def loads_exact(data: bytes) -> Any:
    """Decode one CBOR item that spans all of ``data`` (see the module docstring).

    :raises cbor2.CBORDecodeError: bytes follow the item, a map repeats a key, an item has an
        indefinite length (and whatever ``cbor2`` raises on malformed input, as ``loads`` does).
    """
    stream = io.BytesIO(data)
    value = cbor2.CBORDecoder(stream, allow_duplicate_keys=False, allow_indefinite=False).decode()
    if stream.tell() != len(data):
        raise cbor2.CBORDecodeError(f"{len(data) - stream.tell()} bytes follow the CBOR item")
    return value
