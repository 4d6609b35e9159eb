"""The request queue between HTTP front ends and inference workers, and its in-process form.

A front end calls :meth:`RequestQueue.submit` with a model name and an opaque serialized
request (one bytes-like object, or a sequence of them standing for their concatenation, so
that large tensors are not joined only to be copied again) and gets the opaque serialized
response back (or a typed error); a worker calls :meth:`RequestQueue.run_worker` with a
handler, which receives the request as ``bytes``. Two implementations share that interface:

* :class:`InProcessQueue` (here) — the embedded default: one asyncio process, bounded,
  nothing leaves memory, so nothing is encrypted.
* :class:`~enclaveml.serving._redis_queue.RedisStreamsQueue` — front ends and workers in any
  number of processes and hosts, through Redis Streams, with every payload sealed.

Errors (all :class:`~enclaveml.errors.EnclaveMLError`)::

    QueueError                    base: something about queueing a request failed
    ├── QueueFullError            too many requests in flight; retry after ``retry_after_s``
    ├── QueueTimeoutError         no answer before the request's deadline (also a TimeoutError)
    ├── QueueClosedError          the queue was closed before or while waiting
    ├── QueueUnavailableError     the broker (Redis) could not be reached or refused a command
    ├── QueueDecryptionError      an entry did not open under the cluster key (also a DecryptionError)
    └── HandlerError              the worker's handler raised; ``error_type`` names what it raised
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from enclaveml.errors import ConfigurationError, DecryptionError, EnclaveMLError

__all__ = [
    "Handler",
    "HandlerError",
    "InProcessQueue",
    "Payload",
    "QueueClosedError",
    "QueueDecryptionError",
    "QueueError",
    "QueueFull",
    "QueueFullError",
    "QueueTimeoutError",
    "QueueUnavailableError",
    "RequestQueue",
    "WorkerStats",
    "call_handler",
    "is_async",
    "join_payload",
]

_log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], bytes] | Callable[[str, bytes], Awaitable[bytes]]
"""``handler(model, payload) -> response``; sync handlers run in a thread so the loop stays free."""

Payload = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]
"""A submitted request: bytes-like, or parts that stand for their concatenation."""


def join_payload(payload: Payload) -> bytes:
    """The request as one ``bytes`` (what handlers receive)."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    return b"".join(payload)


class QueueError(EnclaveMLError):
    """Base class of request-queue failures."""


class QueueFullError(QueueError):
    """Too many requests in flight: back off for ``retry_after_s`` seconds (HTTP 503 + Retry-After)."""

    def __init__(self, retry_after_s: float, detail: str = "too many requests in flight") -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"request queue full ({detail}); retry after {retry_after_s:.2f} s")


QueueFull = QueueFullError
"""The name the serving design uses; the same class."""


class QueueTimeoutError(QueueError, TimeoutError):
    """The request was not answered before its deadline; workers drop it unexecuted if still queued."""


class QueueClosedError(QueueError):
    """The queue was closed; create a new one (or restart the process) to submit again."""


class QueueUnavailableError(QueueError):
    """The queue's broker could not be reached or failed a command; check Redis and retry."""


class QueueDecryptionError(QueueError, DecryptionError):
    """A queue entry did not authenticate under this process's cluster key. Says nothing more."""


class HandlerError(QueueError):
    """The worker's handler raised ``error_type`` while serving the request."""

    def __init__(self, error_type: str, message: str) -> None:
        self.error_type = error_type
        self.error_message = message
        super().__init__(f"the worker's handler raised {error_type}: {message}")


@dataclass
class WorkerStats:
    """What one ``run_worker`` call did; returned when it stops (and readable while it runs)."""

    executed: int = 0
    answered: int = 0
    handler_errors: int = 0
    expired: int = 0
    duplicates_suppressed: int = 0
    claimed: int = 0
    dead_lettered: int = 0
    broker_errors: int = 0


@runtime_checkable
class RequestQueue(Protocol):
    """What the HTTP front end and the workers both program against."""

    async def submit(self, model: str, payload: Payload, *, timeout_s: float) -> bytes:
        """Queue one request and wait for its answer (QueueFull/QueueTimeout/HandlerError...)."""
        ...

    async def run_worker(
        self, handler: Handler, *, stop_event: asyncio.Event, concurrency: int = 1
    ) -> WorkerStats:
        """Serve requests with ``handler`` until ``stop_event`` is set; finishes started requests."""
        ...

    async def aclose(self) -> None:
        """Fail waiting submitters with QueueClosedError and release connections."""
        ...


def is_async(handler: Handler) -> bool:
    """Whether ``handler`` (a function or an object with ``__call__``) is a coroutine function."""
    call = getattr(handler, "__call__", None)  # noqa: B004 - async __call__ objects count too
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


async def call_handler(
    handler: Handler, model: str, payload: bytes, *, handler_is_async: bool | None = None
) -> bytes:
    """Run a sync or async handler; sync ones go to a thread because inference blocks.

    ``handler_is_async`` is :func:`is_async` of the handler, when the caller has it already.
    """
    result: bytes | Awaitable[bytes]
    if is_async(handler) if handler_is_async is None else handler_is_async:
        result = handler(model, payload)
    else:
        result = await asyncio.to_thread(handler, model, payload)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, bytes | bytearray | memoryview):
        raise TypeError(f"handlers return bytes, not {type(result).__name__}")
    return bytes(result)


class LatencyEstimate:
    """Exponentially weighted round-trip time, used to tell rejected clients when to come back."""

    def __init__(self, initial_s: float = 0.1) -> None:
        self._value = initial_s

    def observe(self, seconds: float) -> None:
        self._value += 0.1 * (seconds - self._value)

    def retry_after_s(self) -> float:
        # By then most requests now in flight have been answered: a slot is very likely free.
        return min(max(self._value, 0.05), 30.0)


def check_limits(max_in_flight: int, concurrency: int | None = None) -> None:
    if not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ConfigurationError("max_in_flight must be a positive integer")
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise ConfigurationError("concurrency must be a positive integer")


@dataclass
class _Job:
    model: str
    payload: bytes
    deadline: float
    future: asyncio.Future[bytes] = field(repr=False)


class InProcessQueue:
    """Front end and workers in one event loop; bounded by ``max_in_flight`` unanswered requests.

    ``submit`` raises :class:`QueueFullError` instead of waiting when the bound is reached, so
    overload turns into fast 503s rather than ever-growing latency.
    """

    def __init__(self, *, max_in_flight: int = 1024) -> None:
        check_limits(max_in_flight)
        self._max_in_flight = max_in_flight
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._in_flight = 0
        self._closed = False
        self._latency = LatencyEstimate()
        self._waiters: set[asyncio.Future[bytes]] = set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def submit(self, model: str, payload: Payload, *, timeout_s: float) -> bytes:
        if self._closed:
            raise QueueClosedError("the request queue is closed")
        if not timeout_s > 0:
            raise ConfigurationError("timeout_s must be positive")
        if self._in_flight >= self._max_in_flight:
            raise QueueFullError(self._latency.retry_after_s())
        loop = asyncio.get_running_loop()
        started = loop.time()
        future: asyncio.Future[bytes] = loop.create_future()
        self._in_flight += 1
        self._waiters.add(future)
        try:
            self._jobs.put_nowait(_Job(model, join_payload(payload), started + timeout_s, future))
            try:
                result = await asyncio.wait_for(future, timeout_s)
            except TimeoutError:
                raise QueueTimeoutError(f"no answer within {timeout_s:.3f} s") from None
        finally:
            self._in_flight -= 1
            self._waiters.discard(future)
        self._latency.observe(loop.time() - started)
        return result

    async def run_worker(
        self, handler: Handler, *, stop_event: asyncio.Event, concurrency: int = 1
    ) -> WorkerStats:
        check_limits(1, concurrency)
        stats = WorkerStats()
        slots = asyncio.Semaphore(concurrency)
        running: set[asyncio.Task[None]] = set()
        stop = asyncio.ensure_future(stop_event.wait())
        get: asyncio.Future[_Job] | None = None
        try:
            while not stop_event.is_set() and not self._closed:
                await slots.acquire()
                get = asyncio.ensure_future(self._jobs.get())
                await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
                if get.cancelled():
                    slots.release()
                    break
                task = asyncio.create_task(self._serve(handler, get.result(), stats, slots))
                get = None
                running.add(task)
                task.add_done_callback(running.discard)
            # Requests already started are finished; queued ones stay for other workers.
            if running:
                await asyncio.gather(*running)
        finally:
            stop.cancel()
            if get is not None:  # cancelled while waiting: no orphaned get() may take a later job
                self._leave_unserved(get)
        return stats

    def _leave_unserved(self, get: asyncio.Future[_Job]) -> None:
        if not get.done():
            get.cancel()  # asyncio.Queue.get leaves the item queued when cancelled
        elif not get.cancelled() and get.exception() is None:
            self._jobs.put_nowait(get.result())  # taken but never started: back for another worker
            self._jobs.task_done()

    async def _serve(self, handler: Handler, job: _Job, stats: WorkerStats, slots: asyncio.Semaphore) -> None:
        try:
            if job.future.done() or asyncio.get_running_loop().time() > job.deadline:
                stats.expired += 1
                return
            stats.executed += 1
            try:
                result = await call_handler(handler, job.model, job.payload)
            except Exception as exc:  # noqa: BLE001 - a failing request must not stop the worker
                stats.handler_errors += 1
                if not job.future.done():
                    error = HandlerError(type(exc).__name__, str(exc))
                    error.__cause__ = exc
                    job.future.set_exception(error)
                return
            if not job.future.done():
                job.future.set_result(result)
                stats.answered += 1
            else:
                stats.duplicates_suppressed += 1
        finally:
            self._jobs.task_done()
            slots.release()

    async def aclose(self) -> None:
        self._closed = True
        for future in list(self._waiters):
            if not future.done():
                future.set_exception(QueueClosedError("the request queue was closed while waiting"))
