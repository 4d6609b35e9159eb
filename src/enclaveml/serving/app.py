"""The inference server: a FastAPI app speaking the Open Inference Protocol (KServe v2) over REST.

:func:`create_app` builds the app from loaded models (or a :class:`ModelRepository` filled later,
once the key broker has released the model keys). Run it under uvicorn, plain or with
``ssl_certfile``/``ssl_keyfile`` (for RA-TLS, see ``enclaveml.attestation.tls.in_memory_key_files``).

Endpoints: ``/v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{name}[/versions/{v}]`` (metadata), ``.../ready``, ``.../infer`` (JSON and binary
tensor data), ``/attestation?nonce=`` (fresh evidence from the ``attestation`` hook), ``/metrics``
(Prometheus) and the OpenAPI docs (``/docs``, ``/openapi.json``).

Errors become ``{"error": "..."}`` with the status of their class (see :data:`STATUS`): bad input
is always a 4xx, overload a 429 with ``Retry-After``, shutdown a 503, a timeout a 504.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from enclaveml import __version__
from enclaveml._web import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MIN_BODY_RATE, LimitAndCount, ServingStats
from enclaveml.errors import AttestationError, ConfigurationError
from enclaveml.serving._batching import (
    BatcherClosedError,
    DynamicBatcher,
    InferenceFailedError,
    InferenceTimeoutError,
    Overloaded,
    batcher_for,
)
from enclaveml.serving._engine import (
    ModelInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    ModelRepository,
    OnnxModel,
    ServingError,
)
from enclaveml.serving._http import BatcherCollector
from enclaveml.serving._protocol import InvalidRequestError, RequestTooLargeError
from enclaveml.serving._queue import (
    HandlerError,
    QueueClosedError,
    QueueError,
    QueueFullError,
    QueueTimeoutError,
    QueueUnavailableError,
    RequestQueue,
)
from enclaveml.serving._routes import add_routes

__all__ = ["STATUS", "ServerState", "create_app"]

# Most specific first: the first class an error is an instance of gives its status.
STATUS: tuple[tuple[type[Exception], int], ...] = (
    (RequestTooLargeError, 413),
    (InvalidRequestError, 400),
    (ModelInputError, 400),
    (ModelNotFoundError, 404),
    (ModelNotReadyError, 503),
    (Overloaded, 429),
    (BatcherClosedError, 503),
    (InferenceTimeoutError, 504),
    (InferenceFailedError, 500),
    (AttestationError, 503),
    (QueueFullError, 429),
    (QueueTimeoutError, 504),
    (QueueClosedError, 503),
    (QueueUnavailableError, 503),
    (HandlerError, 500),
    (ServingError, 500),
)


@dataclass
class ServerState:
    """Everything the routes share, kept on ``app.state.serving``."""

    repository: ModelRepository
    stats: ServingStats
    registry: CollectorRegistry
    server_name: str
    max_batch_size: int
    max_delay_ms: float
    max_queue: int
    instances: int
    max_request_bytes: int
    request_timeout_s: float
    attestation: Callable[[bytes], bytes] | None
    queue: RequestQueue | None = None
    started: bool = False
    accepting: bool = True
    attestations_in_flight: int = 0
    batchers: dict[str, DynamicBatcher] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.started and self.accepting and self.repository.ready

    def batcher(self, model: OnnxModel) -> DynamicBatcher:
        """The model's batcher, created on first use inside the event loop."""
        return batcher_for(
            self.batchers,
            model,
            max_batch_size=self.max_batch_size,
            max_delay_ms=self.max_delay_ms,
            max_queue=self.max_queue,
            timeout_s=self.request_timeout_s,
            instances=self.instances,
        )

    async def close(self) -> None:
        self.accepting = False
        for batcher in list(self.batchers.values()):
            await batcher.close()
        if self.queue is not None:
            await self.queue.aclose()


def create_app(
    models: Mapping[str, OnnxModel] | ModelRepository,
    *,
    max_batch_size: int = 16,
    max_delay_ms: float = 2.0,
    max_queue: int = 256,
    instances: int = 1,
    max_request_bytes: int = 8 * 1024 * 1024,
    request_timeout_s: float = 30.0,
    attestation: Callable[[bytes], bytes] | None = None,
    server_name: str = "enclaveml",
    queue: RequestQueue | None = None,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    max_body_bytes_in_flight: int | None = None,
    min_body_rate: float = DEFAULT_MIN_BODY_RATE,
) -> FastAPI:
    """Build the OIP inference app.

    ``models`` maps served names to loaded models, or is a repository the caller fills later
    (the server reports not-ready until its expected models are in). ``attestation`` receives the
    client's nonce and returns evidence bound to it and to the TLS key; without it
    ``/attestation`` is 404. Batching, queue, body-size and timeout limits apply per model;
    ``instances`` batches of a model may run at once (see :class:`DynamicBatcher`).
    With ``queue`` (scale-out), inference is not run here: parsed inputs go through the queue to
    workers (:func:`enclaveml.serving.worker.run_worker`), which batch and run them. A request
    body may not stall for ``body_timeout_s`` between chunks, nor average less than
    ``min_body_rate`` bytes/s after its first ``body_timeout_s`` (408 otherwise), so slow senders
    cannot hold buffered bodies and connections indefinitely. All requests in flight together
    hold at most ``max_body_bytes_in_flight`` bytes of bodies (and their decompressed copies;
    default 32 x ``max_request_bytes``): a request past it is answered 503 with Retry-After,
    so many clients sending at once, or a queue full of large requests, cannot exhaust memory.
    """
    if max_request_bytes < 1 or request_timeout_s <= 0 or not body_timeout_s > 0 or not min_body_rate > 0:
        raise ConfigurationError(
            "max_request_bytes must be >= 1, request_timeout_s, body_timeout_s and min_body_rate > 0"
        )
    if max_body_bytes_in_flight is None:
        max_body_bytes_in_flight = 32 * max_request_bytes
    if max_body_bytes_in_flight < max_request_bytes:
        raise ConfigurationError("max_body_bytes_in_flight must be at least max_request_bytes")
    if isinstance(models, ModelRepository):
        repository = models
    else:
        for key, model in models.items():
            if key != model.name:
                raise ConfigurationError(f"model {model.name!r} is registered under a different name {key!r}")
        repository = ModelRepository(models.values())
    # Validates the batching arguments now rather than on the first request.
    DynamicBatcher.validate(max_batch_size, max_delay_ms, max_queue, request_timeout_s, instances)

    registry = CollectorRegistry(auto_describe=True)
    state = ServerState(
        repository=repository,
        stats=ServingStats(registry),
        registry=registry,
        server_name=server_name,
        max_batch_size=max_batch_size,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        instances=instances,
        max_request_bytes=max_request_bytes,
        request_timeout_s=request_timeout_s,
        attestation=attestation,
        queue=queue,
    )
    registry.register(BatcherCollector(lambda: state.batchers))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.started = True
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title=f"{server_name} inference server",
        version=__version__,
        description="Open Inference Protocol (KServe v2) REST API with the binary tensor data extension.",
        lifespan=lifespan,
    )
    app.state.serving = state
    app.state.stats = state.stats
    add_routes(app)
    app.add_middleware(
        LimitAndCount,
        stats=lambda: state.stats,
        routes=lambda: app.router.routes,
        max_request_bytes=max_request_bytes,
        too_large=RequestTooLargeError,
        body_timeout_s=body_timeout_s,
        min_body_rate=min_body_rate,
        max_bytes_in_flight=max_body_bytes_in_flight,
    )
    # Our errors are answered by ExceptionMiddleware; a handler for bare Exception would sit in
    # ServerErrorMiddleware, which re-raises after answering (that is what an unexpected bug should do).
    app.add_exception_handler(ServingError, _error_response)
    app.add_exception_handler(AttestationError, _error_response)
    app.add_exception_handler(QueueError, _error_response)
    app.add_exception_handler(Exception, _error_response)
    app.add_exception_handler(StarletteHTTPException, _http_error_response)
    app.add_exception_handler(RequestValidationError, _validation_error_response)
    return app


def _status_of(exc: Exception) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


async def _error_response(_: Request, exc: Exception) -> JSONResponse:
    status = _status_of(exc)
    if status == 500 and not isinstance(exc, ServingError):
        # An unexpected bug: Starlette re-raises it after this answer, so uvicorn logs the traceback.
        return JSONResponse({"error": "internal server error"}, status_code=500)
    headers: dict[str, str] = {}
    if isinstance(exc, Overloaded | QueueFullError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif status == 503:
        headers["Retry-After"] = "1"
    if status == 413:
        headers["Connection"] = "close"
    return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)


async def _http_error_response(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error_response(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors())
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)
