"""Confidential model serving: ONNX models unsealed in memory, dynamic batching, and the Open Inference
Protocol (KServe v2) REST API with the binary tensor data extension."""

from enclaveml.serving._batching import (
    BatcherClosedError,
    BatcherStats,
    DynamicBatcher,
    InferenceFailedError,
    InferenceTimeoutError,
    Overloaded,
)
from enclaveml.serving._engine import (
    ModelInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    ModelRepository,
    OnnxModel,
    ServingError,
    TensorSpec,
)
from enclaveml.serving._http import ServingStats
from enclaveml.serving._protocol import InvalidRequestError, RequestTooLargeError
from enclaveml.serving.app import create_app

__all__ = [
    "BatcherClosedError",
    "BatcherStats",
    "DynamicBatcher",
    "InferenceFailedError",
    "InferenceTimeoutError",
    "InvalidRequestError",
    "ModelInputError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ModelRepository",
    "OnnxModel",
    "Overloaded",
    "RequestTooLargeError",
    "ServingError",
    "ServingStats",
    "TensorSpec",
    "create_app",
]
