"""The inference engine: an ONNX model loaded from memory, its tensor metadata, and the repository.

A model is unsealed inside the TEE and exists only as bytes in this process: :meth:`OnnxModel.from_bytes`
hands those bytes straight to ONNX Runtime, never to a file (and never sets ORT's
``optimized_model_filepath`` or profiling, which would write the graph or timings out).

Tensor metadata is kept in Open Inference Protocol terms (``FP32``, ``INT64``, ``-1`` for a dynamic
dimension) so the protocol layer and the metadata endpoints need no ORT knowledge.

This module also holds the root of the serving errors, because every other serving module imports it::

    EnclaveMLError
    └── ServingError                base of errors answered to an inference client
        ├── ModelNotFoundError      no such model or version (404)
        ├── ModelNotReadyError      the model is expected but not loaded yet (503)
        ├── ModelInputError         ONNX Runtime rejected the input values, e.g. an index out of range (400)
        ├── InvalidRequestError     (_protocol) malformed or inconsistent request (400)
        │   └── RequestTooLargeError  body (or decompressed body) over the size limit (413)
        ├── Overloaded              (_batching) queue full; retry after ``retry_after_s`` (429)
        ├── InferenceTimeoutError   (_batching) not answered within the request timeout (504)
        ├── BatcherClosedError      (_batching) the server is shutting down (503)
        └── InferenceFailedError    (_batching) ONNX Runtime failed on a valid request (500)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]  # no py.typed in onnxruntime
from onnxruntime.capi.onnxruntime_pybind11_state import (  # type: ignore[import-untyped]
    InvalidArgument as _OrtInvalidArgument,
)

from enclaveml.errors import ConfigurationError, EnclaveMLError

__all__ = [
    "ModelInputError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ModelRepository",
    "OnnxModel",
    "ServingError",
    "TensorSpec",
    "numpy_dtype",
    "oip_datatype",
]


_log = logging.getLogger(__name__)


class ServingError(EnclaveMLError):
    """Base of the errors an inference request can end with; each maps to one HTTP status."""


class ModelNotFoundError(ServingError):
    """No model (or model version) of that name is served here."""


class ModelNotReadyError(ServingError):
    """The model is expected (its key may still be on its way from the broker) but not loaded yet."""


class ModelInputError(ServingError):
    """ONNX Runtime rejected valid-looking inputs (INVALID_ARGUMENT, e.g. an index out of range).

    The message is deliberately generic: ORT's own names nodes and shapes of a confidential model.
    """


# OIP datatype <-> numpy dtype. BYTES is a numpy object array of ``bytes``.
_OIP_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_NUMPY_TO_OIP: dict[np.dtype[Any], str] = {v: k for k, v in _OIP_TO_NUMPY.items()}

_ORT_TO_OIP = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an OIP datatype; ``KeyError`` for names outside the protocol."""
    return _OIP_TO_NUMPY[datatype]


def oip_datatype(dtype: np.dtype[Any]) -> str:
    """The OIP datatype of a numpy dtype (strings and objects map to BYTES)."""
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _NUMPY_TO_OIP[dtype.newbyteorder("=")]
    except KeyError:
        raise ServingError(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, OIP datatype and shape (``-1`` marks a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return numpy_dtype(self.datatype)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _spec(arg: Any, model_name: str) -> TensorSpec:
    datatype = _ORT_TO_OIP.get(arg.type)
    if datatype is None:
        raise ConfigurationError(
            f"model {model_name!r}: tensor {arg.name!r} has type {arg.type}, which cannot be served; "
            "export plain tensors only (for skl2onnx classifiers use options={'zipmap': False})"
        )
    # ORT reports symbolic dimensions as strings and unknown ones as None: both are dynamic.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape)


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) or 1


def threads_per_instance(instances: int, threads: int | None = None) -> int:
    """Intra-op threads for each of ``instances`` batches running at once: ``threads`` if given,
    else the cores shared out."""
    return threads or max(1, available_cores() // max(1, instances))


class OnnxModel:
    """An ONNX Runtime session over a model that exists only in memory.

    ``batchable`` says whether dim 0 of every input and output is a dynamic batch dimension, so
    that independent requests may be concatenated along it; it is inferred from the graph unless
    the caller knows better (a graph with a dynamic dim 0 that mixes rows, e.g. a reduction).
    """

    def __init__(
        self,
        name: str,
        session: ort.InferenceSession,
        *,
        version: str = "1",
        batchable: bool | None = None,
    ) -> None:
        if not name or "/" in name:
            raise ConfigurationError(f"model name must be non-empty and contain no '/', got {name!r}")
        if not version or "/" in version or ":" in version:  # ':' ends the queue's model key
            raise ConfigurationError(
                f"model version must be non-empty and contain no '/' or ':', got {version!r}"
            )
        self.name = name
        self.version = version
        self._session = session
        self.inputs: tuple[TensorSpec, ...] = tuple(_spec(a, name) for a in session.get_inputs())
        self.outputs: tuple[TensorSpec, ...] = tuple(_spec(a, name) for a in session.get_outputs())
        self._input_by_name = {s.name: s for s in self.inputs}
        self._output_names = [s.name for s in self.outputs]
        inferred = all(s.shape and s.shape[0] == -1 for s in (*self.inputs, *self.outputs))
        if batchable and not inferred:
            raise ConfigurationError(f"model {name!r}: batchable=True but not every dim 0 is dynamic")
        self.batchable = inferred if batchable is None else batchable

    @classmethod
    def from_bytes(
        cls,
        name: str,
        model_bytes: bytes,
        *,
        version: str = "1",
        intra_op_threads: int | None = None,
        inter_op_threads: int = 1,
        providers: Iterable[str] = ("CPUExecutionProvider",),
        batchable: bool | None = None,
        allow_spinning: bool = False,
    ) -> OnnxModel:
        """Load a serialized ONNX model from memory.

        ``intra_op_threads`` defaults to the cores in this process's affinity mask: more threads
        than cores collapses throughput under contention. Spinning is off by default because idle
        ORT threads spinning on a 2-core TEE steal the event loop's core between batches.
        """
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or available_cores()
        options.inter_op_num_threads = inter_op_threads
        options.enable_profiling = False
        # Fatal only: ORT logs failing nodes by name to stderr, which leaves the TEE unprotected.
        options.log_severity_level = 4
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "1" if allow_spinning else "0")
        try:
            session = ort.InferenceSession(model_bytes, sess_options=options, providers=list(providers))
        except Exception as exc:  # ORT raises its own unexported exception types
            raise ConfigurationError(f"model {name!r} cannot be loaded by ONNX Runtime: {exc}") from exc
        return cls(name, session, version=version, batchable=batchable)

    def input_spec(self, name: str) -> TensorSpec | None:
        return self._input_by_name.get(name)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph; thread-safe (ORT sessions may be run concurrently)."""
        try:
            results = self._session.run(self._output_names, dict(inputs))
        except _OrtInvalidArgument:
            # ONNX Runtime's message may quote input values (an out-of-range Gather index): it is
            # neither logged nor chained, so no log line or traceback carries a client's data.
            _log.debug("model %s rejected its inputs", self.name)
            raise ModelInputError(f"model {self.name!r} rejected the input values") from None
        return {n: np.asarray(r) for n, r in zip(self._output_names, results, strict=True)}

    def metadata(self) -> dict[str, Any]:
        """The OIP model metadata object."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }

    def __repr__(self) -> str:
        return f"OnnxModel(name={self.name!r}, version={self.version!r}, batchable={self.batchable})"


class ModelRepository:
    """The models this server serves, by name and version, and whether the server is ready.

    The server may start before its models exist: in a TEE the model key arrives from the key
    broker only after attestation. Names listed in ``expected`` make the server (and that model)
    report not-ready until they are added. Safe to call from any thread.
    """

    def __init__(self, models: Iterable[OnnxModel] = (), *, expected: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, dict[str, OnnxModel]] = {}
        self._expected = set(expected)
        for model in models:
            self.add(model)

    def add(self, model: OnnxModel) -> None:
        with self._lock:
            versions = self._models.setdefault(model.name, {})
            if model.version in versions:
                raise ConfigurationError(f"model {model.name!r} version {model.version!r} already loaded")
            versions[model.version] = model

    def get(self, name: str, version: str | None = None) -> OnnxModel:
        """The model (latest version when ``version`` is None); raises if unknown or not loaded."""
        with self._lock:
            versions = self._models.get(name)
            if not versions:
                if name in self._expected:
                    raise ModelNotReadyError(f"model {name!r} is not loaded yet; retry later")
                raise ModelNotFoundError(f"unknown model {name!r}")
            if version is None:
                return versions[max(versions, key=_version_key)]
            model = versions.get(version)
        if model is None:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}")
        return model

    def versions(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._models.get(name, {}), key=_version_key)

    def models(self) -> list[OnnxModel]:
        with self._lock:
            return [m for versions in self._models.values() for m in versions.values()]

    @property
    def ready(self) -> bool:
        """True once at least one model is loaded and every expected model is."""
        with self._lock:
            return bool(self._models) and self._expected <= self._models.keys()


def _version_key(version: str) -> tuple[int, int, str]:
    # Numeric versions sort numerically ("10" after "9"); others after them, alphabetically.
    return (0, int(version), "") if version.isdigit() else (1, 0, version)
