"""The key broker's HTTPS server: configuration, the FastAPI app, and running it under uvicorn.

``create_app(config)`` opens the database, checks the root key against it (a wrong root key
fails here, at startup, with StorageError) and returns the FastAPI app with the routes of
``docs/kbs-protocol.md`` (OpenAPI at ``/docs`` and ``/openapi.json``). ``run_broker`` serves
it over TLS 1.2+ with uvloop and httptools, in one process or, with ``workers=N``, in N
processes sharing the listening socket and the database (one Python process uses one core
for the release path; SQLite keeps nonces single-use across processes). With several
workers the Prometheus counters at ``/metrics`` are per process (the one that answers).

This module is the boundary where enclaveml errors become HTTP answers, always
``{"error": CODE, "message": TEXT, ...}``:

==========================  ======  =======================================================
exception                   status  body ``error`` (and extra fields)
==========================  ======  =======================================================
KeyReleaseDeniedError       403     ``denied`` (``rule``, ``observed``, ``expected``)
KeyDisabledError            403     ``disabled``
KeyNotFoundError            404     ``not_found``
KeyExistsError              409     ``exists``
KemNotAllowedError          400     ``kem_not_allowed`` (``allowed``)
InvalidRequestError,        400     ``bad_request`` (malformed JSON, fields, base64, policy)
ConfigurationError,
validation errors
body over the limit         413     ``too_large``
InvalidTokenError           401     ``unauthorized`` (with ``WWW-Authenticate: Bearer``)
MissingScopeError           403     ``forbidden``
StorageError, anything else 500     ``storage`` / ``internal`` (details only in the log)
==========================  ======  =======================================================

Validation errors name the offending field but never echo its value: a malformed wrap
request carries a data key.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from enclaveml._web import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MIN_BODY_RATE,
    DeadlineHttpProtocol,
    body_read_timeout,
    body_timeout_message,
    raise_open_file_limit,
)
from enclaveml.attestation import Verifier
from enclaveml.errors import (
    AuthorizationError,
    ConfigurationError,
    KeyBrokerError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
    StorageError,
)
from enclaveml.kms._metrics import BrokerMetrics
from enclaveml.kms._release import KEMS
from enclaveml.kms._rootkey import RootKey
from enclaveml.kms._routes import ReleaseFastPath, build_router
from enclaveml.kms._service import InvalidRequestError, KemNotAllowedError, KeyBroker
from enclaveml.kms._storage import KeyExistsError, SqliteKeyStore
from enclaveml.kms._tlscert import create_self_signed_certificate
from enclaveml.kms._tokens import MissingScopeError

__all__ = ["BrokerConfig", "create_app", "create_self_signed_certificate", "run_broker"]

_log = logging.getLogger("enclaveml.kms")
_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]
# Threads running broker calls (SQLite commits, evidence verification, HPKE). Release work is
# mostly CPU under the GIL; more threads than this only queue on the database write lock.
_BROKER_THREADS = 32
_MAX_WORKERS = 64


@dataclass(frozen=True)
class BrokerConfig:
    """Everything a broker needs. ``verifier`` decides which TEEs are accepted at all.

    ``allowed_kems`` may drop ``X25519`` to insist on the post-quantum hybrid;
    ``max_request_body`` bounds every request (evidence with certificates fits in 256 KiB).
    """

    db_path: Path
    root_key: RootKey
    verifier: Verifier
    nonce_ttl: float = 60.0
    allowed_kems: frozenset[str] = field(default_factory=lambda: frozenset(KEMS))
    max_request_body: int = 256 * 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "db_path", Path(self.db_path))
        object.__setattr__(self, "allowed_kems", frozenset(self.allowed_kems))
        if not isinstance(self.root_key, RootKey):
            raise ConfigurationError("root_key must be a RootKey (see load_root_key)")
        if not self.allowed_kems or not self.allowed_kems <= set(KEMS):
            raise ConfigurationError(f"allowed_kems must be a non-empty subset of {list(KEMS)}")
        if not 0 < self.nonce_ttl <= 3600:
            raise ConfigurationError("nonce_ttl must be between 0 and 3600 seconds")
        if not 1024 <= self.max_request_body <= 16 * 1024 * 1024:
            raise ConfigurationError("max_request_body must be between 1 KiB and 16 MiB")


def create_app(config: BrokerConfig) -> FastAPI:
    """The broker's FastAPI app; raises StorageError now if the root key does not fit the database.

    Middleware, outermost first: request timing, the body limit, then
    :class:`~enclaveml.kms._routes.ReleaseFastPath` answering well-formed release requests
    (anything else goes on to FastAPI's routes). Broker calls of the release routes run on a
    dedicated thread pool, one hop per request.
    """
    store = SqliteKeyStore(config.db_path)
    metrics = BrokerMetrics()
    executor = ThreadPoolExecutor(_BROKER_THREADS, thread_name_prefix="kbs")
    try:
        broker = KeyBroker(
            store,
            config.root_key,
            config.verifier,
            nonce_ttl=config.nonce_ttl,
            allowed_kems=config.allowed_kems,
            metrics=metrics,
        )
    except BaseException:
        executor.shutdown()
        store.close()
        raise

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        executor.shutdown()
        store.close()

    app = FastAPI(
        title="enclaveml key broker",
        version="1",
        description="Releases key-encryption keys to attested workloads (docs/kbs-protocol.md).",
        lifespan=lifespan,
        # No Swagger UI or ReDoc: FastAPI loads them from a CDN, and an operator would paste an
        # admin token into a page running that third party's script. /openapi.json stays.
        docs_url=None,
        redoc_url=None,
    )
    app.state.broker = broker
    router = build_router(broker, metrics, executor)
    app.include_router(router)
    _install_error_handlers(app)
    routes = {getattr(route, "path", ""): route for route in router.routes}
    app.add_middleware(
        ReleaseFastPath, broker=broker, executor=executor, error_response=_fast_path_error, routes=routes
    )
    app.add_middleware(_BodyLimit, limit=config.max_request_body)
    app.add_middleware(_Timing, metrics=metrics)  # outermost: also times 413s
    return app


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


def _broker_error_response(exc: Exception, method: str, path: str) -> JSONResponse:
    """The answer to a KeyBrokerError or ConfigurationError (table in the module docstring)."""
    if isinstance(exc, KeyReleaseDeniedError):
        return _error(403, "denied", str(exc), rule=exc.rule, observed=exc.observed, expected=exc.expected)
    if isinstance(exc, KeyDisabledError):
        return _error(403, "disabled", str(exc))
    if isinstance(exc, KeyNotFoundError):
        return _error(404, "not_found", str(exc))
    if isinstance(exc, KeyExistsError):
        return _error(409, "exists", str(exc))
    if isinstance(exc, KemNotAllowedError):
        return _error(400, "kem_not_allowed", str(exc), allowed=sorted(exc.allowed))
    if isinstance(exc, InvalidRequestError | ConfigurationError):
        return _error(400, "bad_request", str(exc))
    if isinstance(exc, MissingScopeError):
        return _error(403, "forbidden", str(exc))
    if isinstance(exc, AuthorizationError):
        response = _error(401, "unauthorized", str(exc))
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    if isinstance(exc, StorageError):
        _log.error("storage failure on %s %s: %s", method, path, exc)
        return _error(500, "storage", "the key broker's storage failed; see the broker log")
    _log.error("unexpected broker error on %s %s: %s", method, path, exc)
    return _error(500, "internal", "internal key broker error; see the broker log")


def _fast_path_error(exc: Exception, scope: MutableMapping[str, Any]) -> JSONResponse | None:
    """What the exception handlers below would answer, for the release fast path (None: re-raise)."""
    if isinstance(exc, KeyBrokerError | ConfigurationError):
        return _broker_error_response(exc, scope["method"], scope["path"])
    return None


def _install_error_handlers(app: FastAPI) -> None:
    async def broker_error(request: Request, exc: Exception) -> JSONResponse:
        return _broker_error_response(exc, request.method, request.url.path)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        # loc and msg only: "input" and "ctx" may hold the (secret) value that failed.
        fields = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errors]
        summary = "; ".join(f"{'.'.join(f['loc'])}: {f['msg']}" for f in fields[:5])
        return _error(400, "bad_request", f"malformed request: {summary}", fields=fields)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        detail = exc.detail if isinstance(exc, StarletteHTTPException) else "error"
        return _error(status, code, str(detail))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        _log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return _error(500, "internal", "internal key broker error; see the broker log")

    app.add_exception_handler(KeyBrokerError, broker_error)
    app.add_exception_handler(ConfigurationError, broker_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


class _BodyLimit:
    """Reject request bodies over ``limit`` bytes with 413 before any handler parses them.

    The body is read (at most ``limit`` bytes) and replayed to the app, so a chunked upload
    without Content-Length is bounded too.
    """

    def __init__(self, app: _ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _send_json(send, 413 if declared.isdigit() else 400, self.limit)
            return
        chunks: list[bytes] = []
        total = 0
        loop = asyncio.get_running_loop()
        first_read = loop.time()
        while True:
            # No chunk may stall longer than the deadline and the body must keep its minimum rate
            # (the inference server's rules too): a trickled body would hold a connection for ever.
            wait = body_read_timeout(
                first_read, total, loop.time(), idle_s=DEFAULT_BODY_TIMEOUT_S, min_rate=DEFAULT_MIN_BODY_RATE
            )
            try:
                async with asyncio.timeout(wait):
                    message = await receive()
            except TimeoutError:
                await _send_json(send, 408, self.limit)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.limit:
                await _send_json(send, 413, self.limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> _Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _send_json(send: _Send, status: int, limit: int) -> None:
    if status == 413:
        payload = f'{{"error":"too_large","message":"request body exceeds {limit} bytes"}}'
    elif status == 408:
        message = body_timeout_message(DEFAULT_BODY_TIMEOUT_S, DEFAULT_MIN_BODY_RATE)
        payload = f'{{"error":"timeout","message":"{message}"}}'
    else:
        payload = '{"error":"bad_request","message":"invalid Content-Length"}'
    body = payload.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status in (408, 413):  # the rest of the body is still on the wire: do not reuse the connection
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Timing:
    """Observe request latency by route template (never the raw path: key ids are unbounded)."""

    def __init__(self, app: _ASGIApp, metrics: BrokerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observe(message: _Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            route = scope.get("route")
            template = str(getattr(route, "path", "unmatched"))
            self.metrics.observe_request(template, scope["method"], status, time.perf_counter() - started)


def run_broker(
    config: BrokerConfig,
    host: str = "127.0.0.1",
    port: int = 8443,
    *,
    certfile: str | Path,
    keyfile: str | Path,
    log_level: str = "info",
    workers: int = 1,
) -> None:
    """Serve the broker over HTTPS (TLS 1.2+) with uvloop and httptools until interrupted.

    ``workers`` > 1 forks that many server processes after binding the socket; each opens its
    own database connections (after the parent checked the root key against the database).
    SIGINT/SIGTERM stop them all gracefully; a worker that dies is replaced, unless it died
    within seconds of starting (then the broker stops: the cause will not go away by itself).
    """
    for what, path in (("certificate", certfile), ("private key", keyfile)):
        if not Path(path).is_file():
            raise ConfigurationError(f"broker TLS {what} file {path} does not exist")
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= _MAX_WORKERS:
        raise ConfigurationError(f"workers must be between 1 and {_MAX_WORKERS}")
    if not _is_memfd(keyfile) and os.stat(keyfile).st_mode & 0o004:
        _log.warning("broker TLS private key %s is world-readable; chmod 600 it", keyfile)
    app = create_app(config)  # in the parent too: a wrong root key fails before any fork
    raise_open_file_limit()  # the workers inherit it

    def server_config(served: FastAPI) -> uvicorn.Config:
        def tls_context(cfg: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
            context = default()
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            return context

        return uvicorn.Config(
            served,
            host=host,
            port=port,
            ssl_certfile=str(certfile),
            ssl_keyfile=str(keyfile),
            ssl_context_factory=tls_context,
            loop="uvloop",
            http=DeadlineHttpProtocol,  # request heads and unread responses have deadlines
            timeout_graceful_shutdown=30,  # then running requests are cancelled, connections dropped
            lifespan="on",
            proxy_headers=False,  # the audit and logs must show the real peer, not a claimed one
            server_header=False,
            timeout_keep_alive=15,
            log_level=log_level,
        )

    if workers == 1:
        _serve(uvicorn.Server(server_config(app)), None)
        return
    app.state.broker.store.close()
    sock = server_config(app).bind_socket()
    try:
        _supervise(lambda: _serve(uvicorn.Server(server_config(create_app(config))), sock), workers)
    finally:
        sock.close()


def _is_memfd(path: str | Path) -> bool:
    """Whether ``path`` is an anonymous memory file (``/proc/self/fd/N`` of a memfd): no one else's."""
    try:
        return os.readlink(path).startswith("/memfd:")
    except OSError:
        return False


def _serve(server: uvicorn.Server, sock: socket.socket | None) -> None:
    server.run(sockets=None if sock is None else [sock])


_CRASH_LOOP_SECONDS = 10.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _run_worker(serve: Callable[[], None]) -> NoReturn:  # pragma: no cover - runs in a child
    code = 1
    try:
        serve()
        code = 0
    except BaseException as exc:  # noqa: BLE001 - the worker's last word, then its exit status
        _log.error("key broker worker %d failed: %s", os.getpid(), exc)
    finally:
        logging.shutdown()
        os._exit(code)


def _supervise(serve: Callable[[], None], workers: int) -> None:
    """Fork ``workers`` processes running ``serve``; forward SIGINT/SIGTERM; replace dead ones."""
    children: dict[int, float] = {}
    stopping = False

    def start() -> None:
        # Signals wait until the child has dropped the parent's handlers (which would signal
        # its siblings) and the parent has recorded the child.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                for sig in _SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                _run_worker(serve)
            children[pid] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def stop(signum: int = signal.SIGTERM, frame: object = None) -> None:
        # Always SIGTERM: after a Ctrl-C the workers already have the terminal's SIGINT, and a
        # second SIGINT would make uvicorn drop connections instead of finishing them.
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in _SIGNALS}
    failed = False
    try:
        for _ in range(workers):
            if not stopping:
                start()
        _log.info("key broker serving with %d worker processes %s", workers, sorted(children))
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            started = children.pop(pid, None)
            if started is None or stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            if time.monotonic() - started < _CRASH_LOOP_SECONDS:
                _log.error(
                    "key broker worker %d exited (%d) right after starting; stopping the broker", pid, code
                )
                failed = True
                stop()
            else:
                _log.error("key broker worker %d exited (%d); starting another", pid, code)
                start()
    finally:
        stop()
        for pid in list(children):
            with suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise RuntimeError("key broker worker processes exit right after starting; see the log above")
