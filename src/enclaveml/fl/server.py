"""The aggregator over HTTPS with RA-TLS: the network transport of :class:`~enclaveml.fl.Aggregator`.

The certificate binds the TLS key *and the training plan* into TEE evidence (nonce claim
:func:`~enclaveml.fl.plan.certificate_nonce`); ``/attestation?nonce=`` answers fresh evidence
bound to the key and :func:`~enclaveml.fl.plan.fresh_nonce` of the plan and the client's nonce.
Certificate, in-memory key files and the evidence hook are those of the inference server
(:mod:`enclaveml.serving.secure`).

Routes (``Authorization: Bearer <credential>`` where marked *auth*; errors are
``{"error": "..."}`` with the status of their :class:`~enclaveml.fl._errors.FederatedError`):

=======  ==================================  =====  ==================================================
GET      ``/v1/fl/plan``                             ``{"plan": {...}, "plan_sha256": hex}``
GET      ``/attestation?nonce=HEX``                  CBOR ``{"evidence", "endorsements"}`` (16-64 bytes)
GET      ``/v1/fl/enrolment``                 auth   ``{"client_id": ...}`` or 401
GET      ``/v1/fl/model?wait_s=S``            auth   the global model (:mod:`enclaveml.fl._wire`); waits up
                                                     to S seconds (max 30) while this client has
                                                     already uploaded for the open round
POST     ``/v1/fl/rounds/{round}/update``     auth   an update (CBOR body) → 202 ``{"round", "uploads"}``
GET      ``/v1/fl/status``                    auth   counts only, plus the caller's own last result
=======  ==================================  =====  ==================================================

Every request is counted per route (requests, body bytes, statuses) on ``app.state.stats``, so
tests can prove that a refusing client sent nothing. Bodies larger than ``max_request_bytes``
(default: four times the encoded model, at least 1 MiB) are refused from their
``Content-Length`` before they are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from enclaveml._urls import certificate_names
from enclaveml._web import (
    LimitAndCount,
    RunningServer,
    ServingStats,
    add_bound_attestation_route,
    attestation_hook,
    serve_ratls_app,
)
from enclaveml.attestation import EvidenceProvider, RatlsCertificate, create_ratls_certificate
from enclaveml.fl._errors import FederatedError, NotEnrolledError, RoundMismatchError, UploadInProgressError
from enclaveml.fl._wire import MODEL_CONTENT_TYPE, decode_update, encode_model, encode_weights
from enclaveml.fl.aggregator import Aggregator
from enclaveml.fl.plan import certificate_nonce, fresh_nonce
from enclaveml.serving._protocol import RequestTooLargeError

__all__ = ["aggregator_certificate", "create_aggregator_app", "run_aggregator", "serve_aggregator"]

_log = logging.getLogger(__name__)

_MAX_WAIT_S = 30.0
_POLL_S = 0.05
_TICK_S = 0.2
# Module level: FastAPI resolves the (postponed) annotations of route functions in their globals.
Auth = Annotated[str | None, Header()]


def aggregator_certificate(provider: EvidenceProvider, aggregator: Aggregator, host: str) -> RatlsCertificate:
    """An RA-TLS certificate whose evidence binds the TLS key and the aggregator's training plan."""
    dns_names, ip_addresses = certificate_names(host)
    nonce = certificate_nonce(aggregator.plan.digest)
    return create_ratls_certificate(
        provider,
        nonce=nonce,
        common_name="enclaveml FL aggregator",
        dns_names=dns_names,
        ip_addresses=ip_addresses,
    )


def create_aggregator_app(
    aggregator: Aggregator,
    *,
    attestation: Callable[[bytes], bytes] | None = None,
    max_request_bytes: int | None = None,
) -> FastAPI:
    """The FastAPI app of the aggregator; ``attestation`` is the plain RA-TLS evidence hook.

    The hook gets the *plan-bound* nonce, so a plain :func:`enclaveml._web.attestation_hook`
    is the right thing to pass.
    """
    if max_request_bytes is None:
        max_request_bytes = max(1 << 20, 4 * len(encode_weights(aggregator.global_model().weights)))
    registry = CollectorRegistry(auto_describe=True)
    stats = ServingStats(registry)
    plan_body = {"plan": aggregator.plan.to_dict(), "plan_sha256": aggregator.plan.digest.hex()}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Round deadlines must pass even when no client is talking to us.
        async def tick() -> None:
            while True:
                await asyncio.sleep(_TICK_S)
                try:
                    await run_in_threadpool(aggregator.poll)
                except Exception:  # noqa: BLE001 - keep ticking; the failed round stays open and is retried
                    _log.exception("closing a round failed")

        task = asyncio.create_task(tick())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="enclaveml FL aggregator", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.aggregator = aggregator
    app.state.stats = stats

    def client_of(authorization: str | None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise NotEnrolledError("send the client credential as 'Authorization: Bearer <credential>'")
        return aggregator.authenticate(token.strip())

    @app.get("/v1/fl/plan")
    async def plan() -> dict[str, Any]:
        return plan_body

    add_bound_attestation_route(app, attestation, lambda nonce: fresh_nonce(aggregator.plan.digest, nonce))

    @app.get("/v1/fl/enrolment")
    async def enrolment(authorization: Auth = None) -> dict[str, str]:
        return {"client_id": client_of(authorization)}

    @app.get("/v1/fl/model")
    async def model(authorization: Auth = None, wait_s: Annotated[float, Query(ge=0)] = 0.0) -> Response:
        client_id = client_of(authorization)
        deadline = time.monotonic() + min(wait_s, _MAX_WAIT_S)
        # Poll rather than block a worker thread per waiting client; the check is a dict lookup.
        while time.monotonic() < deadline and aggregator.has_uploaded(client_id):
            await asyncio.sleep(_POLL_S)
        message = await run_in_threadpool(aggregator.global_model, client_id)
        body = await run_in_threadpool(encode_model, message)
        return Response(body, media_type=MODEL_CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    receiving: set[str] = set()  # clients whose update body is being read (event loop only)

    @app.post("/v1/fl/rounds/{round_}/update", status_code=202)
    async def update(round_: int, request: Request, authorization: Auth = None) -> dict[str, int]:
        # Before reading the body: strangers, and uploads that would be refused anyway (wrong
        # round, already uploaded, one already arriving from this client), send nothing big.
        client_id = client_of(authorization)
        if client_id in receiving:
            raise UploadInProgressError(f"an update from client {client_id!r} is already being received")
        receiving.add(client_id)
        try:
            await run_in_threadpool(aggregator.check_upload, client_id, round_)  # the lock may be held
            body = await request.body()
            count = await run_in_threadpool(_ingest, aggregator, client_id, round_, body)
        finally:
            receiving.discard(client_id)
        return {"round": round_, "uploads": count}

    @app.get("/v1/fl/status")
    async def status(authorization: Auth = None) -> dict[str, Any]:
        return await run_in_threadpool(aggregator.status, client_of(authorization))

    async def federated_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FederatedError)
        body: dict[str, Any] = {"error": str(exc)}
        if isinstance(exc, RoundMismatchError):
            body["current_round"] = exc.current
        headers = {"Retry-After": "1"} if isinstance(exc, UploadInProgressError) else None
        return JSONResponse(body, status_code=exc.status, headers=headers)

    async def too_large(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=413, headers={"Connection": "close"})

    app.add_exception_handler(FederatedError, federated_error)
    app.add_exception_handler(RequestTooLargeError, too_large)
    routes = app.router.routes
    app.add_middleware(
        LimitAndCount,
        stats=lambda: stats,
        routes=lambda: routes,
        max_request_bytes=max_request_bytes,
        too_large=RequestTooLargeError,
    )
    return app


def _ingest(aggregator: Aggregator, client_id: str, round_: int, body: bytes) -> int:
    """Decode an update body and submit it: its tensors are read in place from the decoded message
    and copied once, into the client's row of the round (one worker thread, no second hop)."""
    message = decode_update(body, copy=False)
    if message.round != round_:
        raise RoundMismatchError("the body names another round than the URL", current=round_)
    return aggregator.submit(client_id, round_, message.weights, message.num_examples, message.metrics)


def serve_aggregator(
    aggregator: Aggregator,
    provider: EvidenceProvider,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 30.0,
    **app_options: Any,
) -> RunningServer:
    """Start the RA-TLS aggregator in a background thread (tests, the example, embedding)."""
    ratls = aggregator_certificate(provider, aggregator, host)
    app = create_aggregator_app(aggregator, attestation=attestation_hook(provider, ratls), **app_options)
    return serve_ratls_app(
        app, ratls, name="enclaveml-fl-aggregator", host=host, port=port, startup_timeout=startup_timeout
    )


def run_aggregator(
    aggregator: Aggregator,
    provider: EvidenceProvider,
    *,
    host: str,
    port: int,
    on_ready: Callable[[str], object] | None = None,
    **app_options: Any,
) -> None:
    """Serve until SIGINT/SIGTERM (the CLI); ``on_ready(url)`` runs once the socket listens."""
    running = serve_aggregator(aggregator, provider, host=host, port=port, **app_options)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if on_ready is not None:
        on_ready(running.url)
    while not stop.wait(0.5) and running.thread.is_alive():
        pass
    running.stop(timeout=5.0)
