"""Client-side encoding of Open Inference Protocol requests with the binary tensor data extension.

Request body: a JSON header ``{"inputs": [{"name", "shape", "datatype", "parameters":
{"binary_data_size": N}}], "outputs": [{"name", "parameters": {"binary_data": true}}]}``
followed by each input's raw little-endian row-major bytes in order; the header's length goes
in the ``Inference-Header-Content-Length`` HTTP header. Responses come back the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from enclaveml.errors import EnclaveMLError

__all__ = ["HEADER_LENGTH", "InferenceError", "decode_response", "encode_request"]

HEADER_LENGTH = "Inference-Header-Content-Length"

_DATATYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
_NUMPY = {v: k for k, v in _DATATYPES.items()}


class InferenceError(EnclaveMLError):
    """The inference server answered with an error (the message is the server's)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"inference failed ({status}): {message}")


def encode_request(
    inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
) -> tuple[bytes, dict[str, str]]:
    """Return (body, headers) for a binary-extension infer request."""
    header_inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in inputs.items():
        array = np.ascontiguousarray(value)
        datatype = _DATATYPES.get(array.dtype.name)
        if datatype is None:
            raise EnclaveMLError(f"input {name!r}: numpy dtype {array.dtype} has no OIP datatype")
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        blobs.append(blob)
        header_inputs.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": len(blob)},
            }
        )
    header: dict[str, Any] = {"inputs": header_inputs}
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    else:
        header["parameters"] = {"binary_data_output": True}
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b"".join(blobs), {
        HEADER_LENGTH: str(len(head)),
        "Content-Type": "application/octet-stream",
    }


# JSON values numpy may read for each kind of datatype: integers never from floats or text,
# booleans only from booleans, floats from numbers.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def decode_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Decode a JSON or binary-extension infer response into named arrays.

    Strict, since the answer is only as good as its framing: every output's shape must be
    non-negative dims, its binary size exactly what shape and datatype need, the binary parts
    must account for every byte after the header, and names are unique; anything else is an
    :class:`~enclaveml.errors.EnclaveMLError` naming what is wrong (never a bare ValueError).
    """
    try:
        split = int(header_length) if header_length is not None else len(body)
    except ValueError:
        raise EnclaveMLError("malformed inference response: bad header length") from None
    if not 0 <= split <= len(body):
        raise EnclaveMLError("malformed inference response: bad header length")
    try:
        header = json.loads(body[:split])
    except ValueError as exc:
        raise EnclaveMLError("malformed inference response: header is not JSON") from exc
    outputs = header.get("outputs", []) if isinstance(header, dict) else None
    if not isinstance(outputs, list):
        raise EnclaveMLError("malformed inference response: 'outputs' is not a list")
    results: dict[str, np.ndarray] = {}
    offset = split
    for item in outputs:
        name, array, used = _decode_output(item, body, offset)
        if name in results:
            raise EnclaveMLError(f"malformed inference response: output {name!r} appears twice")
        results[name] = array
        offset += used
    if offset != len(body):
        raise EnclaveMLError(f"malformed inference response: {len(body) - offset} bytes follow the outputs")
    return results


def _decode_output(item: Any, body: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    """One output: its name, its array and the binary bytes it used."""
    if not isinstance(item, dict):
        raise EnclaveMLError("malformed inference response: an output is not an object")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str):
        raise EnclaveMLError("malformed inference response: an output has no name")
    if datatype not in _NUMPY:
        raise EnclaveMLError(f"output {name!r}: unsupported datatype {datatype}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise EnclaveMLError(f"malformed inference response: output {name!r} has a bad shape {shape!r}")
    dtype = np.dtype(_NUMPY[datatype]).newbyteorder("<")
    count = math.prod(shape)
    parameters = item.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    try:
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(body):
                raise EnclaveMLError(
                    f"malformed inference response: output {name!r} declares {size!r} binary bytes, "
                    f"its shape {shape} of {datatype} needs {count * dtype.itemsize}"
                )
            array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
            used = size
        else:
            data = item.get("data")
            if not isinstance(data, list):
                raise EnclaveMLError(f"malformed inference response: output {name!r} has no 'data' list")
            raw = np.asarray(data)  # numpy's own reading of the JSON values, before any conversion
            if raw.size and raw.dtype.kind not in _JSON_KINDS[dtype.kind]:
                raise EnclaveMLError(
                    f"malformed inference response: output {name!r} holds {raw.dtype.kind!r} values "
                    f"for {datatype}"
                )
            array, used = raw.astype(dtype), 0
            if array.size != count:
                raise EnclaveMLError(
                    f"malformed inference response: output {name!r} has {array.size} values for shape {shape}"
                )
        return name, array.reshape(shape).astype(dtype.newbyteorder("="), copy=False), used
    except (ValueError, TypeError, OverflowError) as exc:
        raise EnclaveMLError(f"malformed inference response: output {name!r}: {exc}") from None
