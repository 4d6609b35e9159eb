"""The payload format between HTTP front ends and queue workers: named tensors, described in CBOR.

Layout (the queue encrypts the whole payload)::

    offset  size  field
    0       1     version, 0x01
    1       4     n = length of the description, unsigned big-endian
    5       n     description, CBOR: [[name: tstr, dtype: tstr (numpy name, e.g. "float32",
                  or "str" for text), shape: [uint]], ...], one entry per tensor
    5+n     ...   each tensor's data in description order: little-endian, row-major, unpadded;
                  a "str" tensor's elements are each a 4-byte little-endian length and that
                  many bytes of UTF-8 (the OIP's BYTES layout); nothing may follow the last one

A front end and a worker that disagree on the version fail the request with a message that
says so (upgrade them together), never by misreading tensors.

The data is not wrapped in CBOR byte strings on purpose: the tensors are hundreds of kilobytes
(an image) and travel as they are. :func:`encode_tensors` returns the payload as parts whose
data parts are views of the arrays, for the queue to encrypt without first joining them;
:func:`decode_tensors` returns arrays that are read-only views of the payload (text tensors, the
OIP's BYTES, as object arrays of ``str``, which is what ONNX Runtime takes and returns).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import cbor2
import numpy as np

from enclaveml.errors import EnclaveMLError
from enclaveml.serving._bytes_elements import ElementsError, pack_elements, unpack_elements

__all__ = ["decode_tensors", "encode_tensors"]

_ALLOWED = frozenset(
    {"bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32"}
    | {"float64"}
)
_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in _ALLOWED}
_MAX_DIMS = 32
_VERSION = 0x01
_LENGTH = struct.Struct(">BI")
_TEXT = "str"


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> list[bytes | memoryview]:
    """The payload of ``tensors`` as parts (their concatenation is the payload); data is not copied."""
    description: list[list[Any]] = []
    data: list[bytes | memoryview] = []
    for name, value in tensors.items():
        array = np.asarray(value)
        if not array.flags.c_contiguous:  # (ascontiguousarray would also make a 0-d array 1-d)
            array = np.ascontiguousarray(array)
        if array.dtype.kind in "OU":
            description.append([name, _TEXT, list(array.shape)])
            data.append(_encode_text(array, name))
            continue
        if array.dtype.name not in _ALLOWED:
            raise EnclaveMLError(f"tensor {name!r}: dtype {array.dtype} cannot travel through the queue")
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        description.append([name, array.dtype.name, list(array.shape)])
        # A view of the array's memory: the queue reads it once, while encrypting.
        data.append(little.data.cast("B") if little.size else b"")
    head = cbor2.dumps(description)
    return [_LENGTH.pack(_VERSION, len(head)) + head, *data]


def decode_tensors(payload: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Arrays viewing ``payload`` (read-only when it is ``bytes``); raises EnclaveMLError if malformed."""
    view = memoryview(payload).cast("B")
    if len(view) < _LENGTH.size:
        raise EnclaveMLError("queue payload is too short")
    version, length = _LENGTH.unpack_from(view)
    if version != _VERSION:
        raise EnclaveMLError(
            f"queue payload format {version} is not {_VERSION}: run front ends and workers of one release"
        )
    offset = _LENGTH.size + length
    if offset > len(view):
        raise EnclaveMLError("queue payload description exceeds the payload")
    try:
        description = cbor2.loads(view[_LENGTH.size : offset])
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise EnclaveMLError("queue payload description is not valid CBOR") from exc
    if not isinstance(description, list):
        raise EnclaveMLError("queue payload description must be a list of tensors")
    tensors: dict[str, np.ndarray] = {}
    for item in description:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise EnclaveMLError("queue payload tensors must be [name, dtype, shape]")
        name, dtype_name, shape = item
        if name in tensors:
            raise EnclaveMLError(f"tensor {name!r} appears twice in the queue payload")
        known = dtype_name in _ALLOWED or dtype_name == _TEXT
        if not isinstance(dtype_name, str) or not known or not isinstance(shape, list):
            raise EnclaveMLError(f"tensor {name!r} has an invalid dtype or shape")
        if len(shape) > _MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
            raise EnclaveMLError(f"tensor {name!r} has an invalid shape")
        if dtype_name == _TEXT:
            tensors[name], offset = _decode_text(view, offset, shape, name)
            continue
        dtype = _DTYPES[dtype_name]
        count = math.prod(shape)
        size = count * dtype.itemsize
        if size > len(view) - offset:
            raise EnclaveMLError(f"tensor {name!r}: its data exceeds the payload")
        if count:
            array = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
        else:  # frombuffer refuses an offset at the very end of the buffer
            array = np.empty(shape, dtype=dtype)
        tensors[name] = array.astype(dtype.newbyteorder("="), copy=False)
        offset += size
    if offset != len(view):
        raise EnclaveMLError(f"{len(view) - offset} bytes follow the last tensor of the queue payload")
    return tensors


def _encode_text(array: np.ndarray, name: str) -> bytes:
    for item in array.flat:
        if not isinstance(item, str):
            kind = type(item).__name__
            raise EnclaveMLError(f"tensor {name!r}: text tensors hold str elements, not {kind}")
    return pack_elements(array.flat)


def _decode_text(view: memoryview, offset: int, shape: list[int], name: str) -> tuple[np.ndarray, int]:
    count = math.prod(shape)
    try:
        items, offset = unpack_elements(view, offset, count)
    except ElementsError:
        raise EnclaveMLError(f"tensor {name!r}: its data exceeds the payload") from None
    except UnicodeDecodeError:
        raise EnclaveMLError(f"tensor {name!r}: a text element is not UTF-8") from None
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape), offset
