"""The request queue over Redis Streams: front ends and workers in any processes, on any hosts.

One :class:`RedisStreamsQueue` per process; front ends call ``submit``, workers call
``run_worker`` (see :mod:`._redis_worker`). The data layout is documented byte by byte in
:mod:`._redis_layout`, the envelope and records in :mod:`._queue_envelope`.

Flow: ``submit`` seals the request (model, deadline, its front-end id, payload) and XADDs it
(a plain XADD, pipelined with XLEN for back-pressure: a Lua script would cost Redis a copy and
a hash of the whole envelope); a worker reads it with XREADGROUP, opens it, runs the handler,
seals the reply for this front end's reply stream and runs COMPLETE, which in one atomic
step sets the completion marker (SET NX), appends the reply, XACKs and XDELs the request.
This front end's single listener task XREADs its reply stream and hands each reply to the
waiting ``submit`` by request id.

Delivery guarantee:

* **Answers: exactly once per successful submit, at most once otherwise.** A request id gets
  at most one reply entry in Redis (the SET NX marker, alive until the deadline plus
  ``done_margin_ms``), and the front end resolves one waiter per request id and ignores any
  further or unknown reply (counted in ``stats.ignored_replies``). A submit that returns
  normally got exactly one answer; one that raises QueueTimeoutError got none.
* **Execution: at least once while the request is alive; never started after its deadline**
  (wall clocks of front end and worker; skew shifts the cut-off by the skew). A
  worker killed mid-request leaves the entry pending; after ``claim_idle_ms`` another worker
  claims it (XAUTOCLAIM) and runs the handler again. Live workers keep their entries fresh,
  so a slow handler is not executed twice; a poisoned entry is dead-lettered after
  ``max_deliveries`` claims. Handlers should therefore be side-effect free (inference is).
* Lost only if Redis loses data (no persistence: a Redis restart drops queued requests; the
  front end times out) or the request expires first.

Security: Redis sees request ids, sizes, timing and which front end a reply goes to; it
cannot read or forge payloads, and cannot move them between entries, directions or front
ends. It can drop, delay or replay entries: a replayed request may run again before its
deadline, but its reply is suppressed by the marker and by the front end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis import Redis as BlockingRedis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from enclaveml.crypto.keys import KeyHandle
from enclaveml.errors import ConfigurationError
from enclaveml.serving._queue import (
    Handler,
    HandlerError,
    LatencyEstimate,
    Payload,
    QueueClosedError,
    QueueDecryptionError,
    QueueFullError,
    QueueTimeoutError,
    QueueUnavailableError,
    WorkerStats,
    check_limits,
)
from enclaveml.serving._queue_envelope import (
    REPLY,
    REQUEST,
    RID_SIZE,
    QueueCipher,
    ReplyRecord,
    decode_reply,
    request_head,
)
from enclaveml.serving._redis_layout import (
    MAX_TIMEOUT_S,
    RedisLayout,
    default_consumer,
    raise_if_cancelling,
    reader_client_name,
    reraise_if_cancelling,
    stream_entries,
)
from enclaveml.serving._redis_worker import RedisWorker

__all__ = ["FrontEndStats", "RedisStreamsQueue"]

_log = logging.getLogger(__name__)
_RETRY_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0)
_BACKLOG_FRESH_S = 1.0  # an older backlog reading is read again before the next XADD
# A worker's blocking read gives up this long after its BLOCK time (Redis unresponsive), then retries.
_BLOCKING_READ_MARGIN_S = 10.0


@dataclass
class FrontEndStats:
    """Counters of this process's front-end side."""

    submitted: int = 0
    answered: int = 0
    rejected_full: int = 0
    timed_out: int = 0
    ignored_replies: int = 0  # duplicates, or replies after the submit timed out / was cancelled
    undecryptable_replies: int = 0


class RedisStreamsQueue:
    """Request queue over Redis Streams with AES-256-GCM sealed payloads; see the module docstring.

    ``cluster_key`` is the key broker's cluster key, released after attestation to every front
    end and worker of the deployment. ``max_in_flight`` bounds this front end's unanswered
    requests, ``max_len`` the shared backlog in Redis; both raise :class:`QueueFullError`.
    The backlog is read with each XADD (XLEN in the same pipeline) and read afresh before an
    XADD only when the last reading plus this front end's requests in flight reach ``max_len``,
    or is older than ``_BACKLOG_FRESH_S``: several front ends submitting at once can overshoot
    ``max_len`` by at most their requests in flight, and nothing queued is ever trimmed.
    ``claim_idle_ms`` is how long a dead worker's request waits before another takes it.
    """

    def __init__(
        self,
        url: str,
        *,
        cluster_key: KeyHandle,
        stream: str = "enclaveml:requests",
        group: str = "enclaveml-workers",
        consumer: str | None = None,
        max_len: int = 10_000,
        max_in_flight: int = 256,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        block_ms: int = 500,
        reply_ttl_ms: int = 300_000,
        done_margin_ms: int = 60_000,
        client: aioredis.Redis | None = None,
    ) -> None:
        check_limits(max_in_flight)
        if client is None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError("the queue URL must start with redis://, rediss:// or unix://")
        self.layout = RedisLayout(
            stream=stream,
            group=group,
            max_len=max_len,
            claim_idle_ms=claim_idle_ms,
            max_deliveries=max_deliveries,
            block_ms=block_ms,
            reply_ttl_ms=reply_ttl_ms,
            done_margin_ms=done_margin_ms,
        )
        self.consumer = consumer or default_consumer()
        self._cipher = QueueCipher(cluster_key)
        # decode_responses=False: envelopes are binary and must come back byte for byte.
        self._owns_client = client is None
        self._url = url
        self._redis = client if client is not None else aioredis.Redis.from_url(url, decode_responses=False)
        self._backlog = max_len  # unknown until read: the first submit reads XLEN first
        self._backlog_read_at = 0.0
        self._max_in_flight = max_in_flight
        self._frontend_id = os.urandom(RID_SIZE)
        self._reply_stream = self.layout.reply_stream(self._frontend_id)
        self._waiters: dict[bytes, asyncio.Future[ReplyRecord]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._latency = LatencyEstimate()
        self._closed = False
        self.stats = FrontEndStats()

    def __repr__(self) -> str:
        return f"RedisStreamsQueue(stream={self.layout.stream!r}, group={self.layout.group!r})"

    @property
    def in_flight(self) -> int:
        return len(self._waiters)

    @property
    def redis(self) -> aioredis.Redis:
        """The underlying client (sees only ciphertext); for health checks and tests."""
        return self._redis

    async def submit(self, model: str, payload: Payload, *, timeout_s: float) -> bytes:
        """Queue one request and wait for its answer; see the module docstring for the guarantee.

        ``payload`` is bytes-like or a sequence of parts (encrypted straight from each part).
        Raises QueueFullError (back off ``retry_after_s``), QueueTimeoutError, HandlerError,
        QueueUnavailableError or QueueClosedError.
        """
        if self._closed:
            raise QueueClosedError("the request queue is closed")
        if not 0 < timeout_s <= MAX_TIMEOUT_S:
            raise ConfigurationError(f"timeout_s must be positive and at most {MAX_TIMEOUT_S:.0f} s")
        if len(self._waiters) >= self._max_in_flight:
            self.stats.rejected_full += 1
            raise QueueFullError(self._latency.retry_after_s(), "this front end's in-flight limit")
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._ensure_listener()
        rid = os.urandom(RID_SIZE)
        deadline_ms = int((time.time() + timeout_s) * 1000)
        head = request_head(deadline_ms, self._frontend_id, model)
        parts = [head, payload] if isinstance(payload, bytes | bytearray | memoryview) else [head, *payload]
        envelope = self._cipher.seal(REQUEST, self.layout.stream, rid, parts)
        future: asyncio.Future[ReplyRecord] = loop.create_future()
        self._waiters[rid] = future
        self.stats.submitted += 1
        try:
            await self._enqueue(rid, envelope)
            remaining = timeout_s - (loop.time() - started)
            try:
                reply = await asyncio.wait_for(future, max(remaining, 0.0))
            except TimeoutError:
                self.stats.timed_out += 1
                raise QueueTimeoutError(f"no answer within {timeout_s:.3f} s") from None
        finally:
            self._waiters.pop(rid, None)
        self._latency.observe(loop.time() - started)
        self.stats.answered += 1
        if not reply.ok:
            raise HandlerError(reply.error_type, reply.error_message)
        return reply.body

    async def _enqueue(self, rid: bytes, envelope: bytes) -> None:
        """XADD the sealed request unless the shared backlog is full (see the class docstring)."""
        layout = self.layout
        loop = asyncio.get_running_loop()
        try:
            stale = loop.time() - self._backlog_read_at > _BACKLOG_FRESH_S
            if stale or self._backlog + len(self._waiters) >= layout.max_len:
                self._backlog = int(await self._redis.xlen(layout.stream))
                self._backlog_read_at = loop.time()
                if self._backlog >= layout.max_len:
                    self.stats.rejected_full += 1
                    raise QueueFullError(self._latency.retry_after_s(), "the shared backlog is at max_len")
            pipe = self._redis.pipeline(transaction=False)
            # A memoryview goes to the socket as it is; redis-py's hiredis packer would copy bytes.
            pipe.xadd(layout.stream, {"i": rid.hex(), "c": memoryview(envelope)})
            pipe.xlen(layout.stream)
            _, backlog = await pipe.execute()
        except RedisError as exc:
            reraise_if_cancelling(exc)
            raise QueueUnavailableError(f"could not queue the request: {type(exc).__name__}") from exc
        self._backlog = int(backlog)
        self._backlog_read_at = loop.time()

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name=f"reply-listener {self._reply_stream}")

    async def _listen(self) -> None:
        """Read this front end's reply stream until closed; one reader, so plain XREAD suffices.

        Replies are read once, then deleted so Redis does not keep even their ciphertext; the
        XDEL rides in one pipeline with the next XREAD instead of costing a round trip.
        """
        last_id: bytes = b"0-0"
        read: list[bytes] = []
        failures = 0
        while not self._closed:
            raise_if_cancelling()
            try:
                pipe = self._redis.pipeline(transaction=False)
                if read:
                    pipe.xdel(self._reply_stream, *read)
                pipe.xread({self._reply_stream: last_id}, count=1024, block=self.layout.block_ms)
                response = (await pipe.execute())[-1]
                read = []
                entries = stream_entries(response)
                if entries:
                    last_id = entries[-1][0]
                    read = [entry_id for entry_id, _ in entries]
                    for _entry_id, fields in entries:
                        self._deliver(fields)
                failures = 0
            except RedisError as exc:
                reraise_if_cancelling(exc)
                delay = _RETRY_BACKOFF_S[min(failures, len(_RETRY_BACKOFF_S) - 1)]
                failures += 1
                _log.warning(
                    "reply listener: Redis failed (%s); retrying in %.2f s", type(exc).__name__, delay
                )
                await asyncio.sleep(delay)
        if read:
            with contextlib.suppress(RedisError):
                await self._redis.xdel(self._reply_stream, *read)

    def _deliver(self, fields: dict[bytes, bytes]) -> None:
        try:
            rid = bytes.fromhex(fields.get(b"i", b"").decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            self.stats.undecryptable_replies += 1
            return
        future = self._waiters.get(rid)
        if future is None or future.done():
            # Answered already, timed out, or not ours: exactly-once is enforced here too.
            self.stats.ignored_replies += 1
            return
        try:
            record = decode_reply(self._cipher.open(REPLY, self._reply_stream, rid, fields.get(b"c", b"")))
        except QueueDecryptionError:
            self.stats.undecryptable_replies += 1
            _log.warning("ignored a reply that did not authenticate under the cluster key")
            return
        future.set_result(record)

    async def run_worker(
        self,
        handler: Handler,
        *,
        stop_event: asyncio.Event,
        concurrency: int = 1,
        consumer: str | None = None,
    ) -> WorkerStats:
        """Serve requests until ``stop_event`` is set, then finish started ones and return counters.

        ``concurrency`` requests run at once (sync handlers in threads). Decryption failures,
        expired requests and handler exceptions never stop the worker; Redis outages are retried.
        New entries arrive on a connection of the worker's own (``CLIENT LIST`` name
        ``<consumer>:reads``), read by a blocking client in a thread (fewer copies; see
        :mod:`._redis_worker`); a queue given a ``client`` instead of a URL reads through it.
        """
        check_limits(1, concurrency)
        consumer = consumer or self.consumer
        # No retries inside redis-py, whatever its defaults (they differ between its constructors):
        # the worker's loop retries with its own back-off and sees a stop in between.
        blocking = (
            BlockingRedis.from_url(
                self._url,
                decode_responses=False,
                client_name=reader_client_name(consumer),
                socket_timeout=self.layout.block_ms / 1000 + _BLOCKING_READ_MARGIN_S,
                retry=Retry(NoBackoff(), 0),
            )
            if self._owns_client
            else None
        )
        worker = RedisWorker(
            self._redis, self.layout, self._cipher, consumer, handler, concurrency, blocking=blocking
        )
        try:
            return await worker.run(stop_event)
        finally:
            if blocking is not None:
                blocking.close()  # also ends a read still waiting in the thread after a cancellation

    async def aclose(self) -> None:
        """Stop the listener, fail waiting submitters with QueueClosedError, close connections."""
        if self._closed:
            return
        self._closed = True
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(QueueClosedError("the request queue was closed while waiting"))
        if self._listener is not None:
            # Let the blocking XREAD return on its own (block_ms): cancelling a redis-py command
            # midway can leave the connection pool inconsistent. Cancel only if it does not.
            await asyncio.wait({self._listener}, timeout=self.layout.block_ms / 1000 + 1.0)
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._owns_client:
            with contextlib.suppress(RedisError):
                await self._redis.aclose()

    async def __aenter__(self) -> RedisStreamsQueue:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()
