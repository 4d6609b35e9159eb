"""Open Inference Protocol (KServe v2) inference requests and responses, JSON and binary.

Wire format of ``POST /v2/models/{name}[/versions/{v}]/infer``:

Request body (UTF-8 JSON object, optionally followed by raw tensor bytes)::

    {"id": "opt", "parameters": {...},
     "inputs":  [{"name": "X", "shape": [2, 64], "datatype": "FP32", "data": [...]},
                 {"name": "M", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}],
     "outputs": [{"name": "Y", "parameters": {"binary_data": true}}]}

* ``data`` is row-major, flat or nested; it must hold exactly prod(shape) elements of JSON numbers
  (integers only for integer types, ``true``/``false`` for BOOL, strings for BYTES).
* Binary tensor data extension: when the header ``Inference-Header-Content-Length: N`` is present,
  the first N bytes of the body are the JSON object and the rest is the concatenated binary data
  of the inputs that carry ``parameters.binary_data_size``, in the order they are listed. Each
  chunk is little-endian, row-major, unpadded: prod(shape) x element size bytes (BOOL one byte,
  0 or 1); a BYTES element is a 4-byte little-endian length followed by that many bytes. An
  input has either ``data`` or ``binary_data_size``, never both; no bytes may be left over.
* ``outputs`` selects outputs (default: all). An output is returned as binary when its
  ``parameters.binary_data`` is true, or, if that is absent, when the request parameter
  ``binary_data_output`` is true. ``parameters.timeout`` (microseconds, as Triton sends it)
  can only shorten the server's request timeout.

Response: the JSON object ``{"model_name", "model_version", "id"?, "outputs": [{"name",
"datatype", "shape", "data"}]}``; binary outputs have ``parameters.binary_data_size`` instead of
``data`` and their bytes follow the JSON, in output order, with ``Inference-Header-Content-Length``
set to the JSON's length. Errors are ``{"error": "message"}``.

Validation is strict and happens before any tensor memory is allocated from declared sizes: names,
datatypes and ranks must match the model, fixed dimensions must match, element counts must match
the data, and a tensor cannot declare more elements than the request body could carry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from enclaveml.serving._bytes_elements import ElementsError, pack_elements, unpack_elements
from enclaveml.serving._engine import ServingError, TensorSpec, numpy_dtype, oip_datatype

__all__ = [
    "EncodedResponse",
    "InferenceRequest",
    "InvalidRequestError",
    "ModelSignature",
    "RequestTooLargeError",
    "RequestedOutput",
    "encode_infer_response",
    "parse_header_length",
    "parse_infer_request",
]

_MAX_RANK = 16
# Dims up to 2**31 - 1: no tensor a request can carry needs more, and numpy refuses to reshape
# even an empty array to dims near 2**63.
_MAX_DIM = 2**31 - 1
# Longer timeouts are cut to this before converting (a 400-digit integer overflows a float); the
# server's own request timeout caps them anyway.
_MAX_TIMEOUT_US = 10**12
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})


class InvalidRequestError(ServingError):
    """The request is malformed or does not fit the model; the message says which field and why."""


class RequestTooLargeError(InvalidRequestError):
    """The body, or what it declares, exceeds the server's size limit."""


class ModelSignature(Protocol):
    """What parsing needs to know about a model (``OnnxModel`` satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...
    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferenceRequest:
    """A validated request: numpy inputs keyed by name, and the outputs to send back."""

    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    header_length: int | None  # Inference-Header-Content-Length, when binary outputs follow the JSON

    @property
    def content_type(self) -> str:
        return "application/json" if self.header_length is None else "application/octet-stream"


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """Validate the ``Inference-Header-Content-Length`` header against the body it describes."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 19:  # isdigit alone takes '²'
        raise InvalidRequestError("Inference-Header-Content-Length must be a decimal byte count")
    length = int(value)
    if not 0 < length <= body_length:
        raise InvalidRequestError(
            f"Inference-Header-Content-Length {length} does not fit the {body_length}-byte body"
        )
    return length


def parse_infer_request(
    body: bytes, model: ModelSignature, *, header_length: int | None = None
) -> InferenceRequest:
    """Parse and validate an inference request for ``model``; raises :class:`InvalidRequestError`."""
    view = memoryview(body)
    json_part = view if header_length is None else view[:header_length]
    binary = view[len(json_part) :]
    document = _load_json(json_part)
    _check_keys(document, _REQUEST_KEYS, "request")
    request_id = document.get("id")
    if request_id is not None and not (isinstance(request_id, str) and _is_utf8(request_id)):
        raise InvalidRequestError("'id' must be a string of valid Unicode")
    parameters = _parameters(document.get("parameters"), "request")

    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequestError("'inputs' must be a non-empty list")
    specs = {s.name: s for s in model.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_inputs:
        name, array, used = _parse_input(raw, specs, binary[offset:], len(json_part))
        if name in inputs:
            raise InvalidRequestError(f"input {name!r} given twice")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise InvalidRequestError(
            f"{len(binary) - offset} bytes of binary data follow the JSON but no input claims them"
        )
    missing = specs.keys() - inputs.keys()
    if missing:
        raise InvalidRequestError(f"model {model.name!r} also needs inputs {sorted(missing)}")

    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidRequestError("parameter 'binary_data_output' must be a boolean")
    outputs = _requested_outputs(document.get("outputs"), model, default_binary)
    return InferenceRequest(inputs, outputs, request_id, parameters, _timeout(parameters))


def encode_infer_response(
    model: ModelSignature,
    request: InferenceRequest,
    results: Mapping[str, np.ndarray],
) -> EncodedResponse:
    """Encode the requested outputs as an OIP response, JSON or with binary tensor data."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for wanted in request.outputs:
        array = results[wanted.name]
        datatype = oip_datatype(array.dtype)
        entry: dict[str, Any] = {"name": wanted.name, "datatype": datatype, "shape": list(array.shape)}
        if wanted.binary:
            raw = _to_binary(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _to_json_data(array, datatype, wanted.name)
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = entries
    header = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return EncodedResponse(header, None)
    return EncodedResponse(b"".join([header, *chunks]), len(header))


def _load_json(data: memoryview) -> dict[str, Any]:
    try:
        document = json.loads(bytes(data))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return document


def _check_keys(obj: Any, allowed: frozenset[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise InvalidRequestError(f"{where} must be a JSON object")
    unknown = obj.keys() - allowed
    if unknown:
        raise InvalidRequestError(f"{where} has unknown fields {sorted(unknown)}")


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{where} 'parameters' must be a JSON object")
    for key, item in value.items():
        if not isinstance(item, str | int | float | bool):
            raise InvalidRequestError(f"{where} parameter {key!r} must be a string, number or boolean")
        if not _is_utf8(key) or (isinstance(item, str) and not _is_utf8(item)):
            raise InvalidRequestError(f"{where} parameters must be valid Unicode text")
    return value


def _timeout(parameters: Mapping[str, Any]) -> float | None:
    value = parameters.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequestError("parameter 'timeout' must be a positive integer (microseconds)")
    return min(value, _MAX_TIMEOUT_US) / 1e6


def _parse_shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > _MAX_RANK:
        raise InvalidRequestError(f"input {name!r}: 'shape' must be a list of at most {_MAX_RANK} dims")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in value):
        raise InvalidRequestError(f"input {name!r}: shape dims must be integers from 0 to {_MAX_DIM}")
    return tuple(value)


def _parse_input(
    raw: Any, specs: Mapping[str, TensorSpec], binary: memoryview, json_length: int
) -> tuple[str, np.ndarray, int]:
    """Returns (name, array, binary bytes consumed)."""
    _check_keys(raw, _INPUT_KEYS, "each input")
    name = raw.get("name")
    if not isinstance(name, str):
        raise InvalidRequestError("each input needs a string 'name'")
    spec = specs.get(name)
    if spec is None:
        raise InvalidRequestError(f"unknown input {name!r}; the model takes {sorted(specs)}")
    shape = _parse_shape(raw.get("shape"), name)
    datatype = raw.get("datatype")
    if datatype != spec.datatype:
        raise InvalidRequestError(f"input {name!r}: datatype must be {spec.datatype}, got {datatype!r}")
    if len(shape) != len(spec.shape) or any(m not in (-1, d) for m, d in zip(spec.shape, shape, strict=True)):
        raise InvalidRequestError(
            f"input {name!r}: shape {list(shape)} does not fit the model's {list(spec.shape)}"
        )
    count = math.prod(shape)
    parameters = _parameters(raw.get("parameters"), f"input {name!r}")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise InvalidRequestError(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
        # Every JSON element takes at least one byte of the body, so a larger count is a lie.
        if count > json_length:
            raise InvalidRequestError(f"input {name!r}: shape {list(shape)} declares more data than was sent")
        return name, _from_json(raw["data"], datatype, shape, count, name), 0
    if "data" in raw:
        raise InvalidRequestError(f"input {name!r} has both 'data' and a binary_data_size parameter")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidRequestError(f"input {name!r}: binary_data_size must be a non-negative integer")
    if size > len(binary):
        raise InvalidRequestError(f"input {name!r}: binary_data_size {size} exceeds the remaining body")
    return name, _from_binary(binary[:size], datatype, shape, count, name), size


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], count: int, name: str) -> np.ndarray:
    if datatype == "BYTES":
        flat = _flatten_strings(data, name)
        if len(flat) != count:
            raise InvalidRequestError(
                f"input {name!r}: shape {list(shape)} needs {count} elements, got {len(flat)}"
            )
        return np.array(flat, dtype=object).reshape(shape)
    dtype = numpy_dtype(datatype)
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, RecursionError, OverflowError):
        raise InvalidRequestError(f"input {name!r}: 'data' is not a regular array of numbers") from None
    if array.size != count:
        raise InvalidRequestError(
            f"input {name!r}: shape {list(shape)} needs {count} elements, got {array.size}"
        )
    if count:
        _check_kind(array, dtype, datatype, name)
    return array.astype(dtype, copy=False).reshape(shape)


def _check_kind(array: np.ndarray, dtype: np.dtype[Any], datatype: str, name: str) -> None:
    kind = array.dtype.kind
    if dtype.kind == "b":
        ok = kind == "b"
    elif dtype.kind == "f":
        ok = kind in "iuf"
    else:
        ok = kind in "iu"
        if ok:
            info = np.iinfo(dtype)
            ok = int(array.min()) >= info.min and int(array.max()) <= info.max
    if not ok:
        raise InvalidRequestError(f"input {name!r}: 'data' does not hold valid {datatype} values")


def _flatten_strings(data: Any, name: str) -> list[str]:
    out: list[str] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            if not _is_utf8(item):
                raise InvalidRequestError(f"input {name!r}: BYTES data must be valid Unicode text")
            out.append(item)
        else:
            raise InvalidRequestError(f"input {name!r}: BYTES data must be strings")
    return out


def _is_utf8(text: str) -> bool:
    """False for text UTF-8 cannot encode: JSON's escapes let a lone surrogate (\\ud800) through,
    which would fail later, in ONNX Runtime or the queue's encoding, as a server error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _from_binary(
    chunk: memoryview, datatype: str, shape: tuple[int, ...], count: int, name: str
) -> np.ndarray:
    if datatype == "BYTES":
        return np.array(_split_bytes_elements(chunk, count, name), dtype=object).reshape(shape)
    dtype = numpy_dtype(datatype)
    if len(chunk) != count * dtype.itemsize:
        raise InvalidRequestError(
            f"input {name!r}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, "
            f"binary_data_size is {len(chunk)}"
        )
    if dtype.kind == "b" and count and np.frombuffer(chunk, dtype=np.uint8).max() > 1:
        raise InvalidRequestError(f"input {name!r}: BOOL bytes must be 0 or 1")
    array = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"), count=count)
    return array.astype(dtype, copy=False).reshape(shape)


def _split_bytes_elements(chunk: memoryview, count: int, name: str) -> list[str]:
    try:
        items, end = unpack_elements(chunk, 0, count)
    except ElementsError as exc:
        raise InvalidRequestError(f"input {name!r}: {exc} (binary_data_size {len(chunk)})") from None
    except UnicodeDecodeError:
        raise InvalidRequestError(f"input {name!r}: BYTES elements must be UTF-8 text") from None
    if end != len(chunk):
        raise InvalidRequestError(
            f"input {name!r}: {len(chunk) - end} bytes left after {count} BYTES elements"
        )
    return items


def _requested_outputs(raw: Any, model: ModelSignature, default_binary: bool) -> tuple[RequestedOutput, ...]:
    names = [s.name for s in model.outputs]
    if raw is None:
        return tuple(RequestedOutput(n, default_binary) for n in names)
    if not isinstance(raw, list) or not raw:
        raise InvalidRequestError("'outputs' must be a non-empty list when present")
    selected: list[RequestedOutput] = []
    for item in raw:
        _check_keys(item, _OUTPUT_KEYS, "each requested output")
        name = item.get("name")
        if name not in names:
            raise InvalidRequestError(f"unknown output {name!r}; the model produces {names}")
        if any(s.name == name for s in selected):
            raise InvalidRequestError(f"output {name!r} requested twice")
        parameters = _parameters(item.get("parameters"), f"output {name!r}")
        if parameters.get("classification"):
            raise InvalidRequestError("the classification extension is not supported")
        binary = parameters.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise InvalidRequestError(f"output {name!r}: binary_data must be a boolean")
        selected.append(RequestedOutput(name, binary))
    return tuple(selected)


def _to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return pack_elements(array.ravel())
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _to_json_data(array: np.ndarray, datatype: str, name: str) -> Sequence[Any]:
    if datatype != "BYTES":
        flat: list[Any] = array.ravel().tolist()
        return flat
    try:
        return [item if isinstance(item, str) else bytes(item).decode() for item in array.ravel()]
    except UnicodeDecodeError:
        raise InvalidRequestError(f"output {name!r} is not UTF-8 text; request it with binary_data") from None
