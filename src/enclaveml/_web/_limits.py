"""HTTP plumbing under the routes of every enclaveml server: request-size limit and per-route counters.

:class:`LimitAndCount` is a pure ASGI middleware, so it sees every request before FastAPI reads
a byte of the body. It answers 413 from ``Content-Length`` alone when that is too large (the body
is never read), and otherwise counts body bytes as the application receives them, raising the
app's own "too large" error (``too_large(message)``, answered 413 by the app) the moment a
streamed body (no ``Content-Length``) passes the limit. A body must also keep arriving: no chunk
may take longer than ``body_timeout_s`` after the previous read, and after its first
``body_timeout_s`` the body must average ``min_body_rate`` (1 KiB/s: each byte received buys
1/``min_body_rate`` s more, as Apache's ``mod_reqtimeout`` MinRate), else 408 and the connection
closed. Without the first rule a client that sends all but the last byte of a large body and then
waits would hold the buffered bytes and its connection for ever; without the second, one that
sends a byte every 59 s would (a few thousand such connections exhaust the server's file
descriptors). An upload on a slow link that keeps above the rate is never cut off. A client
that disconnects before its body arrived is counted under 499 (nginx's "client closed
request"), not as a server error.

With ``max_bytes_in_flight``, the bodies of all requests being received or served at once share
one budget: a request whose body would take it past the budget is answered 503 with Retry-After
(the rest of its body is read and dropped, so the client sees the answer), so many clients
uploading at once cannot make the server buffer more than that. Bytes are charged as they arrive
(a client must send them to hold them) and held until the request ends; the app can charge
buffers it derives from the body (a decompressed copy) through
:func:`charge_body_bytes`. A request alone in the server is always admitted.

:class:`ServingStats` records, per route template, the requests, the body bytes received and the
response statuses. Tests use it to prove what a client did or did not send. The inference server,
the FL aggregator and the vertical-FL server all count with them; the inference server also
exports the numbers at ``/metrics`` from a registry private to the app (so several apps in one
process, as in tests, never collide); the FL servers have no ``/metrics`` route.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enclaveml.errors import ConfigurationError

__all__ = ["LimitAndCount", "RouteStats", "ServingStats", "charge_body_bytes"]

UNMATCHED = "<unmatched>"
_CHARGE = "enclaveml.charge_body_bytes"  # the scope key of a request's charge function
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client gone before its request was answered


@dataclass
class RouteStats:
    requests: int = 0
    request_bytes: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)


class ServingStats:
    """Requests, request body bytes and response statuses per route template (``/v2/models/{name}/infer``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.routes: dict[str, RouteStats] = collections.defaultdict(RouteStats)
        self._children: dict[tuple[str, int], tuple[Counter, Counter, Histogram]] = {}
        self._requests = Counter(
            "enclaveml_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=registry,
        )
        self._bytes = Counter(
            "enclaveml_http_request_body_bytes", "request body bytes received", ["route"], registry=registry
        )
        self._latency = Histogram(
            "enclaveml_http_request_duration_seconds",
            "time from request start to response end",
            ["route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    def record(self, route: str, status: int, body_bytes: int, seconds: float) -> None:
        stats = self.routes[route]
        stats.requests += 1
        stats.request_bytes += body_bytes
        stats.statuses[status] += 1
        # labels() costs a lock and a tuple hash per call; the children are few, so keep them.
        children = self._children.get((route, status))
        if children is None:
            children = (
                self._requests.labels(route, str(status)),
                self._bytes.labels(route),
                self._latency.labels(route),
            )
            self._children[(route, status)] = children
        requests, received, latency = children
        requests.inc()
        received.inc(body_bytes)
        latency.observe(seconds)

    def requests(self, route: str | None = None) -> int:
        return sum(s.requests for r, s in list(self.routes.items()) if route in (None, r))

    def request_bytes(self, route: str | None = None) -> int:
        return sum(s.request_bytes for r, s in list(self.routes.items()) if route in (None, r))

    def status_count(self, status: int, route: str | None = None) -> int:
        return sum(s.statuses[status] for r, s in list(self.routes.items()) if route in (None, r))


DEFAULT_BODY_TIMEOUT_S = 60.0
DEFAULT_MIN_BODY_RATE = 1024.0  # bytes/s a request body must average after its first body_timeout_s


def body_read_timeout(
    first_read: float, received: int, now: float, *, idle_s: float, min_rate: float
) -> float:
    """How long the next read of a request body may wait (0: the body is already too slow).

    At most ``idle_s`` after the previous read, and no later than ``idle_s`` after the first read
    plus 1/``min_rate`` s for every byte received so far.
    """
    return max(0.0, min(idle_s, first_read + idle_s + received / min_rate - now))


def body_timeout_message(idle_s: float, min_rate: float) -> str:
    return f"request body too slow (a chunk every {idle_s:g} s, then {min_rate:g} bytes/s on average)"


class _BodyTimeout(Exception):
    """The request body did not arrive in time (raised into the app, answered 408 here)."""


class _OverBudget(Exception):
    """The bodies in flight would pass ``max_bytes_in_flight`` (raised into the app, answered 503 here)."""


def charge_body_bytes(scope: Scope, total: int) -> None:
    """Count ``total`` bytes held for this request (body included) against the in-flight budget.

    For buffers derived from the body, such as its decompressed copy: ``total`` is what the
    request holds in all, not an increment. Does nothing outside :class:`LimitAndCount` or
    without a budget; raises (answered 503 by the middleware) when the budget would be passed.
    """
    charge = scope.get(_CHARGE)
    if charge is not None:
        charge(total)


class LimitAndCount:
    """ASGI middleware: enforce ``max_request_bytes`` and the body deadline, feed :class:`ServingStats`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        stats: Callable[[], ServingStats],
        routes: Callable[[], list[BaseRoute]],
        max_request_bytes: int,
        too_large: Callable[[str], Exception],
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        min_body_rate: float = DEFAULT_MIN_BODY_RATE,
        max_bytes_in_flight: int | None = None,
    ) -> None:
        if max_bytes_in_flight is not None and max_bytes_in_flight < max_request_bytes:
            raise ConfigurationError("max_bytes_in_flight must be at least max_request_bytes")
        if not min_body_rate > 0:
            raise ConfigurationError("min_body_rate must be > 0")
        self.app = app
        self._too_large = too_large
        self._stats = stats
        self._routes = routes
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s
        self.min_body_rate = min_body_rate
        self.max_bytes_in_flight = max_bytes_in_flight
        self.bytes_in_flight = 0  # held by the requests now in this app (one event loop: no lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        received = 0
        status = 500  # if the app dies before starting a response, uvicorn answers 500
        responded = False
        limit = self.max_request_bytes
        # The body deadline: no body chunk may take longer than body_timeout_s to arrive (an idle
        # timeout, as nginx's client_body_timeout: a large upload on a slow link keeps going while
        # it progresses) and the body must keep min_body_rate on average after its first
        # body_timeout_s, counted from the first read, so the server's own work before reading
        # (a lock, a check) is not charged to the client. One timer per request, moved with each
        # chunk (a timeout around each read would cost a task per chunk), cancels the request
        # task if it is still waiting for the body; the cancellation is taken back exactly once.
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        timer: asyncio.TimerHandle | None = None
        first_read: float | None = None
        expired = body_done = False
        held = 0  # this request's share of bytes_in_flight
        budget = self.max_bytes_in_flight

        def hold(total: int) -> None:
            nonlocal held
            if budget is None or total <= held:
                return
            others = self.bytes_in_flight - held
            if others > 0 and others + total > budget:
                raise _OverBudget
            self.bytes_in_flight += total - held
            held = total

        if budget is not None:
            scope[_CHARGE] = hold

        def expire() -> None:
            nonlocal expired
            expired = True
            if task is not None:
                task.cancel()

        def deadline_cancelled() -> bool:
            """Whether a CancelledError is the deadline's alone (then taken back, once)."""
            nonlocal expired
            if not expired or task is None:
                return False
            expired = False
            return task.uncancel() == 0

        async def counting_receive() -> Message:
            nonlocal received, body_done, timer, first_read
            if body_done:  # after the body, receive() waits for a disconnect: no deadline
                return await receive()
            if timer is not None:
                timer.cancel()
            now = loop.time()
            first_read = now if first_read is None else first_read
            wait = body_read_timeout(
                first_read, received, now, idle_s=self.body_timeout_s, min_rate=self.min_body_rate
            )
            timer = loop.call_later(wait, expire)
            try:
                message = await receive()
            except asyncio.CancelledError:
                if deadline_cancelled():
                    raise _BodyTimeout from None
                raise
            finally:
                timer.cancel()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large(f"request body exceeds the {limit}-byte limit")
                hold(received)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
            await send(message)

        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                status = 413
                await _reject(send, 413, f"request body of {declared} bytes exceeds the {limit}-byte limit")
            else:
                try:
                    await self.app(scope, counting_receive, tracking_send)
                except ClientDisconnect:
                    if responded:
                        raise
                    # The client went away before its body arrived: nobody to answer, and not a
                    # server error (uvicorn would log a traceback and the stats count a 500).
                    status = CLIENT_CLOSED_REQUEST
                except _OverBudget:
                    if responded:
                        raise
                    status = 503
                    # The connection stays open: uvicorn reads and drops the rest of this body (at
                    # most max_request_bytes, charged to no one) before the next request. Closing
                    # with it unread would reset the connection, and a client that writes its
                    # whole body before reading would never see this answer.
                    await _reject(
                        send, 503, "the server is receiving too much data at once; retry later",
                        retry_after=1, keep_connection=True,
                    )  # fmt: skip
                except (_BodyTimeout, asyncio.CancelledError) as exc:
                    # (A cancellation by the deadline timer outside a read of the body ends here too.)
                    timed_out = isinstance(exc, _BodyTimeout) or deadline_cancelled()
                    if responded or not timed_out:
                        raise
                    status = 408
                    await _reject(send, 408, body_timeout_message(self.body_timeout_s, self.min_body_rate))
        finally:
            self.bytes_in_flight -= held
            if timer is not None:
                timer.cancel()
            route = scope.get("route")
            label = getattr(route, "path", None) or self._match(scope)
            self._stats().record(label, status, received, time.perf_counter() - started)

    def _match(self, scope: Scope) -> str:
        for route in self._routes():
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", UNMATCHED))
        return UNMATCHED


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _reject(
    send: Send, status: int, message: str, retry_after: int | None = None, *, keep_connection: bool = False
) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if not keep_connection:
        # The unread body is still on the wire (or never comes): do not reuse this connection.
        headers.append((b"connection", b"close"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
