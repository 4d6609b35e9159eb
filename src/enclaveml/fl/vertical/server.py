"""The vertical-FL server over HTTPS with RA-TLS: the network transport of :class:`VerticalSession`.

The certificate binds the TLS key *and the job plan* into TEE evidence (nonce claim
:func:`~enclaveml.fl.plan.certificate_nonce` of :attr:`VerticalPlan.digest`); ``/attestation?nonce=``
answers fresh evidence bound to the key and :func:`~enclaveml.fl.plan.fresh_nonce` of the plan and
the party's nonce, exactly as the horizontal aggregator does.

The server drives the protocols, but HTTP goes the other way: parties are clients. Each party
long-polls for the server's next call and posts its answer. Routes (``Authorization: Bearer
<credential>`` where marked *auth*; errors are ``{"error": "..."}`` with the status of their
:class:`~enclaveml.fl.vertical._errors.VerticalError`):

=======  ==============================  =====  =========================================================
GET      ``/v1/vfl/plan``                        ``{"plan": {...}, "plan_sha256": hex}``
GET      ``/attestation?nonce=HEX``              CBOR ``{"evidence", "endorsements"}`` (16-64 byte nonce)
GET      ``/v1/vfl/calls?wait_s=S``       auth   the next call, CBOR ``{"id": text, "method": text,
                                                 "request": bstr}``; 204 if none came within S seconds
                                                 (max 30); CBOR ``{"done": {"state", ["error"]}}`` once
                                                 the job is over
POST     ``/v1/vfl/calls/{id}``           auth   the answer to call ``id`` (the bytes of
                                                 :func:`~enclaveml.fl.vertical._channel.answer`) → 204
GET      ``/v1/vfl/status``               auth   ``{"state", ["error"]}``
=======  ==============================  =====  =========================================================

``request`` is a message of :mod:`enclaveml.fl.vertical._codec`. Every request is counted per route
(requests, body bytes, statuses) on ``app.state.stats``; bodies over ``max_request_bytes``
(default 1 GiB: a million keyed hashes are 16 MB, histograms a few MB) are refused from their
``Content-Length`` before they are read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Annotated, Any

import cbor2
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
from enclaveml.fl.plan import certificate_nonce, fresh_nonce
from enclaveml.fl.vertical._errors import MessageError, VerticalError
from enclaveml.fl.vertical._session import NotEnrolledError, VerticalSession

__all__ = ["create_vertical_app", "serve_vertical", "vertical_certificate"]

_log = logging.getLogger(__name__)

CALL_CONTENT_TYPE = "application/cbor"
_MAX_WAIT_S = 30.0
_CALL_ID = re.compile(r"[0-9a-f]{32}")
Auth = Annotated[str | None, Header()]


class BodyTooLargeError(MessageError):
    """A request body passed the server's size limit."""

    status = 413


def vertical_certificate(provider: EvidenceProvider, session: VerticalSession, host: str) -> RatlsCertificate:
    """An RA-TLS certificate whose evidence binds the TLS key and the job plan."""
    dns_names, ip_addresses = certificate_names(host)
    return create_ratls_certificate(
        provider,
        nonce=certificate_nonce(session.plan.digest),
        common_name="enclaveml vertical FL server",
        dns_names=dns_names,
        ip_addresses=ip_addresses,
    )


def create_vertical_app(
    session: VerticalSession,
    *,
    attestation: Callable[[bytes], bytes] | None = None,
    max_request_bytes: int = 1 << 30,
) -> FastAPI:
    """The FastAPI app of the server; ``attestation`` is the plain RA-TLS evidence hook."""
    stats = ServingStats(CollectorRegistry(auto_describe=True))
    plan_body = {"plan": session.plan.to_dict(), "plan_sha256": session.plan.digest.hex()}
    app = FastAPI(title="enclaveml vertical FL server", docs_url=None, redoc_url=None)
    app.state.session = session
    app.state.stats = stats

    def party_of(authorization: str | None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise NotEnrolledError("send the party credential as 'Authorization: Bearer <credential>'")
        return session.authenticate(token.strip())

    @app.get("/v1/vfl/plan")
    async def plan() -> dict[str, Any]:
        return plan_body

    add_bound_attestation_route(app, attestation, lambda nonce: fresh_nonce(session.plan.digest, nonce))

    @app.get("/v1/vfl/calls")
    async def next_call(authorization: Auth = None, wait_s: Annotated[float, Query(ge=0)] = 0.0) -> Response:
        party = party_of(authorization)
        channel = session.channels[party]
        pending = await run_in_threadpool(channel.next_call, min(wait_s, _MAX_WAIT_S))
        body: dict[str, Any]
        if pending is not None:
            body = {"id": pending.id, "method": pending.method, "request": pending.request}
        elif session.finished.is_set():
            body = {"done": session.outcome()}
            session.told(party)
        else:
            return Response(status_code=204)
        return Response(
            bytes(cbor2.dumps(body)), media_type=CALL_CONTENT_TYPE, headers={"Cache-Control": "no-store"}
        )

    @app.post("/v1/vfl/calls/{call_id}", status_code=204)
    async def post_answer(call_id: str, request: Request, authorization: Auth = None) -> Response:
        # Before reading the body: the credential, the call id, and that the call is in flight
        # with no other answer to it arriving (a refused answer sends nothing big).
        channel = session.channels[party_of(authorization)]
        if not _CALL_ID.fullmatch(call_id):
            raise MessageError("malformed call id")
        channel.claim_answer(call_id)
        try:
            body = await request.body()
        except BaseException:
            channel.release_answer(call_id)
            raise
        channel.answer(call_id, body)
        return Response(status_code=204)

    @app.get("/v1/vfl/status")
    async def status(authorization: Auth = None) -> dict[str, Any]:
        party_of(authorization)
        return session.outcome()

    async def vertical_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, VerticalError)
        headers = {"Connection": "close"} if isinstance(exc, BodyTooLargeError) else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    app.add_exception_handler(VerticalError, vertical_error)
    routes = app.router.routes
    app.add_middleware(
        LimitAndCount,
        stats=lambda: stats,
        routes=lambda: routes,
        max_request_bytes=max_request_bytes,
        too_large=BodyTooLargeError,
    )
    return app


def serve_vertical(
    session: VerticalSession,
    provider: EvidenceProvider,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 30.0,
    **app_options: Any,
) -> RunningServer:
    """Start the RA-TLS server in a background thread and the session's job (tests, embedding, the CLI).

    ``stop()`` on the returned server also cancels the job (:meth:`VerticalSession.cancel`).
    """
    ratls = vertical_certificate(provider, session, host)
    app = create_vertical_app(session, attestation=attestation_hook(provider, ratls), **app_options)
    running = serve_ratls_app(
        app, ratls, name="enclaveml-vfl-server", host=host, port=port, startup_timeout=startup_timeout
    )
    # A job still waiting or running must not outlive its server; cancelled first, so that the
    # parties' long-polls end at once instead of holding the shutdown for their full wait.
    running.before_stop(session.cancel)
    session.start()
    return running
