"""Confidential model serving: ONNX models unsealed in memory, dynamic batching, and the Open Inference
Protocol (KServe v2) REST API with the binary tensor data extension."""

from enclaveml._web import ServingStats
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
from enclaveml.serving._protocol import InvalidRequestError, RequestTooLargeError
from enclaveml.serving._queue import (
    InProcessQueue,
    QueueError,
    QueueFullError,
    QueueTimeoutError,
    RequestQueue,
)
from enclaveml.serving._redis_queue import RedisStreamsQueue
from enclaveml.serving.app import create_app
from enclaveml.serving.worker import QueueWorker

__all__ = [
    "BatcherClosedError",
    "BatcherStats",
    "DynamicBatcher",
    "InProcessQueue",
    "InferenceFailedError",
    "InferenceTimeoutError",
    "InvalidRequestError",
    "ModelInputError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ModelRepository",
    "OnnxModel",
    "Overloaded",
    "QueueError",
    "QueueFullError",
    "QueueTimeoutError",
    "QueueWorker",
    "RedisStreamsQueue",
    "RequestQueue",
    "RequestTooLargeError",
    "ServingError",
    "ServingStats",
    "TensorSpec",
    "create_app",
]
