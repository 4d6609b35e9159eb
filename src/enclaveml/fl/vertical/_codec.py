"""The vertical-FL message format: a CBOR map whose arrays are RFC 8746 typed arrays.

Every message between a party and the server is one canonical CBOR map (RFC 8949 §4.2.1) of
text keys to plain CBOR values (int, float, text, bytes, bool, null, lists, maps) and numpy
arrays. An array is encoded as the RFC 8746 multi-dimensional array ``40([shape, typed])`` where
``typed`` is a little-endian typed-array tag over the C-order bytes::

    64 uint8   69 uint16  70 uint32  71 uint64
    72 int8    77 int16   78 int32   79 int64
    85 float32 86 float64

The receiver never unpickles anything and checks every length against the declared shape
before it makes an array, so a party cannot make the server allocate or misread memory. A
standard format, rather than ``np.save``, lets a party written in another language take part.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import cbor2
import numpy as np

from enclaveml.fl.vertical._errors import MessageError

__all__ = ["CONTENT_TYPE", "Payload", "decode", "encode"]

CONTENT_TYPE = "application/vnd.enclaveml.fl.vertical+cbor"

Payload = dict[str, Any]
"""A message: text keys to CBOR values and numpy arrays."""

_TAG_OF_DTYPE: dict[str, int] = {
    "|u1": 64, "<u2": 69, "<u4": 70, "<u8": 71,
    "|i1": 72, "<i2": 77, "<i4": 78, "<i8": 79,
    "<f4": 85, "<f8": 86,
}  # fmt: skip
_DTYPE_OF_TAG = {tag: np.dtype(dt) for dt, tag in _TAG_OF_DTYPE.items()}
_MULTI_DIM = 40
_MAX_DIMS = 8
_MAX_DEPTH = 16


def _default(encoder: cbor2.CBOREncoder, value: Any) -> None:
    if isinstance(value, np.generic):
        encoder.encode(value.item())
        return
    if not isinstance(value, np.ndarray):
        raise TypeError(f"cannot encode {type(value).__name__} in a vertical-FL message")
    if value.dtype == np.bool_:
        value = value.astype(np.uint8)
    dtype = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
    tag = _TAG_OF_DTYPE.get(dtype.str)
    if tag is None:
        raise TypeError(f"arrays of dtype {value.dtype} are not part of the vertical-FL format")
    data = np.ascontiguousarray(value, dtype=dtype).tobytes()
    encoder.encode(cbor2.CBORTag(_MULTI_DIM, [list(value.shape), cbor2.CBORTag(tag, data)]))


def encode(payload: Mapping[str, Any]) -> bytes:
    """Encode ``payload`` canonically. Equal payloads give equal bytes."""
    try:
        return cbor2.dumps(dict(payload), canonical=True, default=_default)
    except (TypeError, ValueError, cbor2.CBOREncodeError) as exc:
        raise MessageError(f"message cannot be encoded: {exc}") from None


def _array(shape: Any, typed: Any) -> np.ndarray:
    if not (
        isinstance(shape, list | tuple)
        and len(shape) <= _MAX_DIMS
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise MessageError("array shape must be a list of at most 8 non-negative integers")
    typed_ok = isinstance(typed, cbor2.CBORTag) and typed.tag in _DTYPE_OF_TAG
    if not (typed_ok and isinstance(typed.value, bytes)):
        raise MessageError("array data must be a little-endian RFC 8746 typed array")
    dtype = _DTYPE_OF_TAG[typed.tag]
    if len(typed.value) != math.prod(shape) * dtype.itemsize:
        raise MessageError("array data length does not match its shape")
    return np.frombuffer(typed.value, dtype=dtype).reshape(shape)


def _convert(value: Any, depth: int, seen: set[int]) -> Any:
    if depth > _MAX_DEPTH:
        raise MessageError("message nested too deeply")
    if isinstance(value, list | tuple | dict):
        # cbor2 resolves shared references (tags 28/29) to one object used many times: copying
        # each use would let a few hundred bytes expand exponentially. Each container once.
        if id(value) in seen:
            raise MessageError("shared or cyclic CBOR references are not accepted")
        seen.add(id(value))
    if isinstance(value, cbor2.CBORTag):
        # cbor2 decodes arrays inside tags as tuples.
        if value.tag == _MULTI_DIM and isinstance(value.value, list | tuple) and len(value.value) == 2:
            return _array(*value.value)
        if value.tag in _DTYPE_OF_TAG and isinstance(value.value, bytes):
            return _array([len(value.value) // _DTYPE_OF_TAG[value.tag].itemsize], value)
        raise MessageError(f"unexpected CBOR tag {value.tag}")
    if isinstance(value, list | tuple):
        return [_convert(v, depth + 1, seen) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise MessageError("map keys must be text")
        return {k: _convert(v, depth + 1, seen) for k, v in value.items()}
    if isinstance(value, cbor2.CBORSimpleValue | cbor2.frozendict) or value is cbor2.undefined:
        raise MessageError("unexpected CBOR value")
    return value


def decode(data: bytes) -> Payload:
    """Decode a message; arrays come back read-only, backed by ``data``.

    :raises MessageError: not CBOR, not a map of text keys, or an array that does not add up.
    """
    try:
        value = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError):
        raise MessageError("message is not valid CBOR") from None
    if not isinstance(value, dict):
        raise MessageError("message must be a CBOR map")
    converted = _convert(value, 0, set())
    assert isinstance(converted, dict)
    return converted
