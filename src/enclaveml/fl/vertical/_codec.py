"""The vertical-FL message format: a CBOR map whose arrays are RFC 8746 typed arrays.

Every message between a party and the server is one canonical CBOR map (RFC 8949 §4.2.1) of
text keys to plain CBOR values (int, float, text, bytes, bool, null, lists, maps) and numpy
arrays. An array is encoded as the RFC 8746 multi-dimensional array ``40([shape, typed])`` where
``typed`` is a little-endian typed-array tag over the C-order bytes::

    64 uint8   69 uint16  70 uint32  71 uint64
    72 int8    77 int16   78 int32   79 int64
    85 float32 86 float64

The receiver never unpickles anything and checks every length against the declared shape
before it makes an array, so a party cannot make the server allocate or misread memory. Before
anything is decoded, the item heads are walked without allocating (:func:`_check_items`): at most
``_MAX_ITEMS`` items in a message (stored models, read after they were unsealed, have no item
budget), lists and maps nested at most ``_MAX_DEPTH`` deep, definite lengths only, no tag but
those above and bignums (tags 2 and 3, at most 32 bytes), no tag directly inside a tag, and no
trailing bytes. Without that, a message of a few MiB of one-byte empty lists
decodes to a couple of GiB of Python objects, and cbor2's semantic tags (sets, decimals, MIME
messages, shared references) would reach protocol code. A standard format, rather than
``np.save``, lets a party written in another language take part.
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
_MAX_DIM = 1 << 40  # per dimension; the data length is checked against the product as well
_MAX_DEPTH = 16
_MAX_ITEMS = 1 << 18  # CBOR items per message (an array is 3 items, however many elements)
_BIGNUM_TAGS = frozenset({2, 3})
_MAX_BIGNUM_BYTES = 32
_ALLOWED_TAGS = frozenset({_MULTI_DIM, *_DTYPE_OF_TAG, *_BIGNUM_TAGS})
_PLAIN = (str, bytes, int, float)


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
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in shape)
    ):
        raise MessageError("array shape must be a list of at most 8 non-negative integers below 2**40")
    typed_ok = isinstance(typed, cbor2.CBORTag) and typed.tag in _DTYPE_OF_TAG
    if not (typed_ok and isinstance(typed.value, bytes)):
        raise MessageError("array data must be a little-endian RFC 8746 typed array")
    dtype = _DTYPE_OF_TAG[typed.tag]
    if len(typed.value) != math.prod(shape) * dtype.itemsize:
        raise MessageError("array data length does not match its shape")
    return np.frombuffer(typed.value, dtype=dtype).reshape(shape)


def _convert(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise MessageError("message nested too deeply")
    if isinstance(value, cbor2.CBORTag):
        # cbor2 decodes arrays inside tags as tuples.
        if value.tag == _MULTI_DIM and isinstance(value.value, list | tuple) and len(value.value) == 2:
            return _array(*value.value)
        if value.tag in _DTYPE_OF_TAG and isinstance(value.value, bytes):
            return _array([len(value.value) // _DTYPE_OF_TAG[value.tag].itemsize], value)
        raise MessageError(f"unexpected CBOR tag {value.tag}")
    if isinstance(value, list | tuple):
        return [_convert(v, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise MessageError("map keys must be text")
        return {k: _convert(v, depth + 1) for k, v in value.items()}
    if value is None or isinstance(value, _PLAIN):  # bool is an int
        return value
    raise MessageError("unexpected CBOR value")


def _check_items(data: bytes, max_items: int | None) -> None:
    """Walk the CBOR item heads of ``data`` without decoding: the limits of the module docstring."""
    end, pos = len(data), 0
    # Items still to read in each open container (lists and maps count toward the depth) or tag.
    frames: list[list[int]] = [[1, 0]]  # [remaining, is_container]
    depth = items = 0
    after_tag: int | None = None  # the tag whose item comes next
    while frames:
        frame = frames[-1]
        if frame[0] == 0:
            frames.pop()
            depth -= frame[1]
            continue
        frame[0] -= 1
        items += 1
        if max_items is not None and items > max_items:
            raise MessageError(f"message holds more than {max_items} CBOR items")
        if pos >= end:
            raise MessageError("message is not valid CBOR")
        major, info = data[pos] >> 5, data[pos] & 0x1F
        pos += 1
        if info < 24:
            argument = info
        elif info <= 27:
            size = 1 << (info - 24)
            if pos + size > end:
                raise MessageError("message is not valid CBOR")
            argument = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        else:  # indefinite lengths (31) never occur in canonical CBOR; 28-30 are reserved
            raise MessageError("message is not canonical CBOR")
        tag, after_tag = after_tag, None
        if tag in _BIGNUM_TAGS and not (major == 2 and argument <= _MAX_BIGNUM_BYTES):
            raise MessageError(f"a bignum is a byte string of at most {_MAX_BIGNUM_BYTES} bytes")
        if major in (2, 3):  # byte and text strings: skip the contents
            pos += argument
            if pos > end:
                raise MessageError("message is not valid CBOR")
        elif major in (4, 5):  # lists, maps: their items (each at least one byte) follow
            count = argument * (2 if major == 5 else 1)
            if count > end - pos:
                raise MessageError("message is not valid CBOR")
            if count:
                depth += 1
                # The message's own map is one level more, and an array's [shape, data] and its
                # shape two: the exact limit on lists and maps is _convert's, this bounds the walk.
                if depth > _MAX_DEPTH + 3:
                    raise MessageError("message nested too deeply")
                frames.append([count, 1])
        elif major == 6:
            if argument not in _ALLOWED_TAGS:
                raise MessageError(f"unexpected CBOR tag {argument}")
            if tag is not None:
                raise MessageError("a CBOR tag inside a tag")
            after_tag = argument
            frames.append([1, 0])
        # majors 0, 1 (integers) and 7 (simple values, floats): the head was all of it
    if pos != end:
        raise MessageError("message has bytes after its CBOR item")


def decode(data: bytes, *, max_items: int | None = _MAX_ITEMS) -> Payload:
    """Decode a message; arrays come back read-only, backed by ``data``.

    ``max_items=None`` lifts the item budget, for stored models read after they were unsealed
    (a model of many trees is many items; what a peer sends is never read that way).

    :raises MessageError: not CBOR, over the limits, not a map of text keys, or an array that does
        not add up.
    """
    _check_items(data, max_items)
    try:
        value = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError):
        raise MessageError("message is not valid CBOR") from None
    if not isinstance(value, dict):
        raise MessageError("message must be a CBOR map")
    converted = _convert(value, 0)
    assert isinstance(converted, dict)
    return converted
