"""The federated-learning wire format: weights, updates and the global model, in canonical CBOR.

Numbers never pass through pickle or ``np.load(allow_pickle=True)``: an aggregator decodes
bytes from participants it does not trust, so only plain tensors of a fixed set of dtypes are
accepted, and every length is checked against the declared shape before an array is made.

Weights (a list of arrays) — also what :func:`weights_sha256` hashes, so the hash of the
initial weights in the training plan is a hash of exactly these bytes::

    weights = [* tensor]
    tensor  = [dtype: tstr, shape: [* uint], data: bstr]
        dtype: numpy dtype string, little-endian or byte-order free: "<f2" "<f4" "<f8"
               "|i1" "<i2" "<i4" "<i8" "|u1" "|b1"
        data:  the C-order array bytes, exactly prod(shape) * itemsize of them

Update (client → aggregator, ``POST /v1/fl/rounds/{round}/update``, content type
``application/vnd.enclaveml.fl-update+cbor``)::

    {"v": 1, "round": uint, "num_examples": uint, "metrics": {* tstr => float}, "weights": weights}

Global model (aggregator → client, ``GET /v1/fl/model``, content type
``application/vnd.enclaveml.fl-model+cbor``)::

    {"v": 1, "round": uint, "completed_rounds": uint, "finished": bool, "uploaded": bool,
     "config": {* tstr => any}, "plan_sha256": bstr(32), "weights": weights}

``round`` is the round open for uploads (``completed_rounds + 1`` until ``finished``);
``uploaded`` says whether the requesting client's update for it has been received. Maps are
encoded canonically (RFC 8949 §4.2.1), so equal messages are equal bytes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np

from enclaveml.fl._errors import InvalidUpdateError
from enclaveml.fl.strategy import Weights

__all__ = [
    "MAX_EXAMPLES",
    "MODEL_CONTENT_TYPE",
    "UPDATE_CONTENT_TYPE",
    "ModelMessage",
    "UpdateMessage",
    "decode_model",
    "decode_update",
    "decode_weights",
    "encode_model",
    "encode_update",
    "encode_weights",
    "finite_number",
    "weights_from_item",
    "weights_item",
    "weights_sha256",
]

UPDATE_CONTENT_TYPE = "application/vnd.enclaveml.fl-update+cbor"
MODEL_CONTENT_TYPE = "application/vnd.enclaveml.fl-model+cbor"
_VERSION = 1
# Example counts weight the average as float64: beyond 2**53 they are neither exact nor plausible,
# and a CBOR bignum (10**400) would overflow when the round closes, for every client.
MAX_EXAMPLES = 2**53
_DTYPES = frozenset({"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "|b1"})
_MAX_TENSORS = 4096
_MAX_DIMS = 8
_MAX_DIM = 2**40  # numpy cannot even describe some larger shapes ([0, 2**62, 2**62])
# An update's metrics are a few named numbers (loss, accuracy); the aggregator keeps them until
# the round closes, so their count and names are bounded like the weights are.
MAX_METRICS = 64
MAX_METRIC_NAME = 64


@dataclass(frozen=True)
class UpdateMessage:
    """A decoded update: the round it answers, the new local weights, example count and metrics."""

    round: int
    weights: Weights
    num_examples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class ModelMessage:
    """A decoded global model: what a participant trains from in ``round``."""

    round: int
    completed_rounds: int
    finished: bool
    uploaded: bool
    config: dict[str, Any]
    plan_sha256: bytes
    weights: Weights


def _tensor(array: np.ndarray) -> list[Any]:
    # Not np.ascontiguousarray: it turns 0-d arrays (BatchNorm's num_batches_tracked) into 1-d ones.
    contiguous = np.array(array, order="C", copy=None)
    dtype = contiguous.dtype.newbyteorder("<") if contiguous.dtype.byteorder == ">" else contiguous.dtype
    if dtype.str not in _DTYPES:
        raise InvalidUpdateError(f"weights of dtype {array.dtype} cannot be sent; use float32/float64/int")
    return [dtype.str, list(contiguous.shape), contiguous.astype(dtype, copy=False).tobytes()]


def weights_item(weights: Weights) -> list[list[Any]]:
    """The ``weights`` CBOR item as Python data, for embedding in a larger message."""
    return [_tensor(np.asarray(w)) for w in weights]


def encode_weights(weights: Weights) -> bytes:
    """The canonical CBOR encoding of ``weights`` (the ``weights`` item above)."""
    return bytes(cbor2.dumps(weights_item(weights), canonical=True))


def weights_sha256(weights: Weights) -> str:
    """SHA-256 (hex) of :func:`encode_weights`: identifies initial weights in a training plan."""
    return hashlib.sha256(encode_weights(weights)).hexdigest()


def _array(item: Any, copy: bool = True) -> np.ndarray:
    if not (isinstance(item, list) and len(item) == 3):
        raise InvalidUpdateError("each tensor must be [dtype, shape, data]")
    dtype_str, shape, data = item
    if not isinstance(dtype_str, str) or dtype_str not in _DTYPES:
        raise InvalidUpdateError(f"tensor dtype {dtype_str!r} is not one of {sorted(_DTYPES)}")
    if not (
        isinstance(shape, list)
        and len(shape) <= _MAX_DIMS
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in shape)
    ):
        raise InvalidUpdateError("tensor shape must be a list of at most 8 integers from 0 to 2**40")
    if not isinstance(data, bytes):
        raise InvalidUpdateError("tensor data must be a byte string")
    dtype = np.dtype(dtype_str)
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise InvalidUpdateError(f"tensor data is {len(data)} bytes, shape {shape} of {dtype_str} needs more")
    try:  # numpy refuses shapes whose non-zero dimensions multiply past its limits
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as exc:
        raise InvalidUpdateError(f"tensor shape {shape} cannot be represented: {exc}") from None
    return array.copy() if copy else array


def weights_from_item(value: Any, *, copy: bool = True) -> Weights:
    """Arrays from a decoded ``weights`` item; raises InvalidUpdateError on anything malformed.

    ``copy=False`` returns read-only views of the decoded byte strings (no second copy of the
    data); the default returns writable arrays of their own, which callers may change in place.
    """
    if not isinstance(value, list) or len(value) > _MAX_TENSORS:
        raise InvalidUpdateError(f"weights must be a list of at most {_MAX_TENSORS} tensors")
    return [_array(item, copy) for item in value]


def decode_weights(data: bytes) -> Weights:
    """Inverse of :func:`encode_weights`; raises InvalidUpdateError on anything malformed."""
    return weights_from_item(_loads(data))


def encode_update(round_: int, weights: Weights, num_examples: int, metrics: Mapping[str, float]) -> bytes:
    body = {
        "v": _VERSION,
        "round": round_,
        "num_examples": num_examples,
        "metrics": {str(k): float(v) for k, v in metrics.items()},
        "weights": weights_item(weights),
    }
    return bytes(cbor2.dumps(body, canonical=True))


def decode_update(data: bytes, *, copy: bool = True) -> UpdateMessage:
    """An update from its bytes; ``copy=False``: read-only weights (the aggregator copies them once,
    into the round's matrix, in :meth:`~enclaveml.fl.aggregator.Aggregator.submit`)."""
    body = _message(data)
    round_: Any = body.get("round")
    examples: Any = body.get("num_examples")
    metrics: Any = body.get("metrics", {})
    if not _is_uint(round_) or not _is_uint(examples) or examples > MAX_EXAMPLES:
        raise InvalidUpdateError(
            f"update 'round' and 'num_examples' must be non-negative integers, num_examples <= {MAX_EXAMPLES}"
        )
    if not isinstance(metrics, dict):
        raise InvalidUpdateError("update 'metrics' must map names to finite numbers")
    checked = check_metrics(metrics)
    weights = weights_from_item(body.get("weights"), copy=copy)
    return UpdateMessage(round_, weights, examples, checked)


def check_metrics(metrics: Mapping[Any, Any]) -> dict[str, float]:
    """``metrics`` as a dict of floats; InvalidUpdateError unless at most :data:`MAX_METRICS`
    names of at most :data:`MAX_METRIC_NAME` characters map to finite numbers."""
    if len(metrics) > MAX_METRICS or not all(
        isinstance(k, str) and len(k) <= MAX_METRIC_NAME and finite_number(v) for k, v in metrics.items()
    ):
        raise InvalidUpdateError(
            f"update 'metrics' must map at most {MAX_METRICS} names (at most {MAX_METRIC_NAME} "
            "characters each) to finite numbers"
        )
    return {k: float(v) for k, v in metrics.items()}


def encode_model(message: ModelMessage) -> bytes:
    body = {
        "v": _VERSION,
        "round": message.round,
        "completed_rounds": message.completed_rounds,
        "finished": message.finished,
        "uploaded": message.uploaded,
        "config": dict(message.config),
        "plan_sha256": message.plan_sha256,
        "weights": weights_item(message.weights),
    }
    return bytes(cbor2.dumps(body, canonical=True))


def decode_model(data: bytes) -> ModelMessage:
    body = _message(data)
    fields: tuple[Any, Any] = (body.get("round"), body.get("completed_rounds"))
    if not all(_is_uint(f) for f in fields):
        raise InvalidUpdateError("model 'round' and 'completed_rounds' must be non-negative integers")
    flags: tuple[Any, Any] = (body.get("finished"), body.get("uploaded"))
    config, plan = body.get("config"), body.get("plan_sha256")
    if not all(isinstance(f, bool) for f in flags) or not isinstance(config, dict):
        raise InvalidUpdateError("model 'finished'/'uploaded' must be booleans and 'config' a map")
    if not (isinstance(plan, bytes) and len(plan) == 32):
        raise InvalidUpdateError("model 'plan_sha256' must be 32 bytes")
    weights = weights_from_item(body.get("weights"))
    return ModelMessage(fields[0], fields[1], flags[0], flags[1], config, plan, weights)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def finite_number(value: Any) -> bool:
    """A number that is a finite float (a CBOR bignum of 10**400 is not: it would raise later)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _loads(data: bytes) -> Any:
    try:
        return cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise InvalidUpdateError("message is not valid CBOR") from exc


def _message(data: bytes) -> dict[str, Any]:
    body = _loads(data)
    if not isinstance(body, dict) or body.get("v") != _VERSION:
        raise InvalidUpdateError(f'message must be a CBOR map with "v": {_VERSION}')
    return body
