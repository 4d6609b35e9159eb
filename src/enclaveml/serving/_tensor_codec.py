"""The payload format between HTTP front ends and queue workers: named tensors in CBOR.

``{name: [dtype: tstr (numpy name, e.g. "float32"), shape: [uint], data: bstr (little-endian,
row-major)]}``. Only numeric and boolean dtypes travel; the queue encrypts the whole payload.
"""

from __future__ import annotations

from collections.abc import Mapping

import cbor2
import numpy as np

from enclaveml.errors import EnclaveMLError

__all__ = ["decode_tensors", "encode_tensors"]

_ALLOWED = frozenset(
    {"bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32"}
    | {"float64"}
)
_MAX_DIMS = 32


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    out: dict[str, list[object]] = {}
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        if array.dtype.name not in _ALLOWED:
            raise EnclaveMLError(f"tensor {name!r}: dtype {array.dtype} cannot travel through the queue")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        out[name] = [array.dtype.name, list(array.shape), data]
    return bytes(cbor2.dumps(out))


def decode_tensors(payload: bytes) -> dict[str, np.ndarray]:
    try:
        obj = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise EnclaveMLError("queue payload is not valid CBOR") from exc
    if not isinstance(obj, dict):
        raise EnclaveMLError("queue payload must be a map of tensors")
    tensors: dict[str, np.ndarray] = {}
    for name, item in obj.items():
        if not (isinstance(name, str) and isinstance(item, list | tuple) and len(item) == 3):
            raise EnclaveMLError("queue payload tensors must be [dtype, shape, data]")
        dtype_name, shape, data = item
        if dtype_name not in _ALLOWED or not isinstance(data, bytes) or not isinstance(shape, list | tuple):
            raise EnclaveMLError(f"tensor {name!r} has an invalid dtype, shape or data")
        if len(shape) > _MAX_DIMS or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise EnclaveMLError(f"tensor {name!r} has an invalid shape")
        dtype = np.dtype(dtype_name).newbyteorder("<")
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data):
            raise EnclaveMLError(f"tensor {name!r}: data size does not match its shape")
        tensors[name] = (
            np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
        )
    return tensors
