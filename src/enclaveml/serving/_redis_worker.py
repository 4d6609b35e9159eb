"""The worker side of the Redis Streams queue: read, open, serve, reply once, recover the dead's work.

A worker is one consumer of the group. Its loop takes claimable entries of dead workers
first (XAUTOCLAIM, idle for ``claim_idle_ms``), then new ones (XREADGROUP ``>``), at most
``concurrency`` at a time. A heartbeat re-claims the entries it is serving (XCLAIM JUSTID,
which resets their idle time without counting a delivery) so that a slow handler is not
mistaken for a dead worker. Nothing an entry contains can stop the loop: entries that do not
open are dead-lettered, expired ones dropped, handler exceptions sealed into the reply, and
Redis errors retried with back-off. Layout and scripts: :mod:`._redis_layout`.

New entries are read with a blocking (synchronous) redis-py client in this worker's own read
thread when the queue has one (it does when built from a URL): that path receives into one
reused buffer and hands it to hiredis, where the asyncio path copies each request again on its
way through the transport's bytes, the stream reader's buffer and its read slices, and pauses
the socket every 128 KB. For image-sized requests that is about 0.2 CPU ms per request less in
the worker (docs/benchmarks.md). Claims, heartbeats and completions stay on the asyncio client;
they carry little. Cancelling the worker does not wait for a read in the thread: its entries
stay pending and are claimed after ``claim_idle_ms``, as for any worker that stops mid-request.

Replies leave in pipelines: the requests of one model batch finish together, and each reply's
completion script (ack, done marker, reply) is queued and sent with the others that finish in
the same event-loop pass (:class:`_CompletionPipeline`). One round trip per batch instead of one
per request: fewer system calls in the worker and fewer reads and wake-ups in Redis. Each
script still runs atomically on its own, so exactly-once answering is unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.asyncio as aioredis
from redis import Redis as BlockingRedis
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.typing import StreamIdT

from enclaveml.errors import ConfigurationError
from enclaveml.serving._queue import Handler, QueueDecryptionError, WorkerStats, call_handler, is_async
from enclaveml.serving._queue_envelope import REPLY, QueueCipher, ReplyRecord, encode_reply
from enclaveml.serving._redis_layout import (
    COMPLETE_LUA,
    DISCARD_LUA,
    MAX_TIMEOUT_S,
    RedisLayout,
    raise_if_cancelling,
    reraise_if_cancelling,
    stream_entries,
)

__all__ = ["RedisWorker"]

_log = logging.getLogger(__name__)
_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
_MAX_TIMEOUT_MS = int(MAX_TIMEOUT_S * 1000)
_START = b"0-0"

Entry = tuple[bytes, dict[bytes, bytes]]


def _now_ms() -> int:
    # Deadlines are wall-clock because front end and worker may be on different hosts.
    return int(time.time() * 1000)


class _CompletionPipeline:
    """Run a registered script once per call, sending the calls of one event-loop pass in one pipeline."""

    def __init__(self, redis: aioredis.Redis, script: Any) -> None:
        self._redis, self._script = redis, script
        self._queued: list[tuple[list[Any], list[Any], asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    async def __call__(self, *, keys: list[Any], args: list[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((keys, args, future))
        if len(self._queued) == 1:  # the first of this pass: send after the others have queued
            flush = asyncio.create_task(self._flush())
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        return await future

    async def _flush(self) -> None:
        batch, self._queued = self._queued, []
        try:
            # EVALSHA straight into the pipeline: the script object's own pipeline path would ask
            # SCRIPT EXISTS first, a second round trip for every flush.
            pipe = self._redis.pipeline(transaction=False)
            for keys, args, _ in batch:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
            for index, result in enumerate(results):
                if isinstance(result, NoScriptError):  # Redis restarted or its scripts were flushed
                    keys, args, _ = batch[index]
                    results[index] = await self._script(keys=keys, args=args)  # loads it, then runs it
        except BaseException as exc:  # every caller gets the failure (or the cancellation)
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller was cancelled meanwhile
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def drain(self) -> None:
        """Wait for the pipelines already sent (and whatever is queued) to finish."""
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)


class RedisWorker:
    """One consumer of the request stream's group, serving until told to stop."""

    def __init__(
        self,
        redis: aioredis.Redis,
        layout: RedisLayout,
        cipher: QueueCipher,
        consumer: str,
        handler: Handler,
        concurrency: int,
        blocking: BlockingRedis | None = None,
    ) -> None:
        self._redis = redis
        self._blocking = blocking  # reads new entries in self._read_thread when given
        self._read_thread: ThreadPoolExecutor | None = None
        self._layout = layout
        self._cipher = cipher
        self._consumer = consumer
        self._handler = handler
        self._handler_is_async = is_async(handler)
        self._concurrency = concurrency
        self._complete = _CompletionPipeline(redis, redis.register_script(COMPLETE_LUA))
        self._discard = redis.register_script(DISCARD_LUA)
        self._serving: set[bytes] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._claim_cursor: bytes = _START
        self.stats = WorkerStats()

    async def run(self, stop_event: asyncio.Event) -> WorkerStats:
        stop = asyncio.ensure_future(stop_event.wait())
        heartbeat = asyncio.create_task(self._heartbeat())
        loop = asyncio.get_running_loop()
        # Claim scans are cheap but not free; a dead worker's entries wait claim_idle_ms anyway.
        claim_every_s = min(self._layout.claim_idle_ms / 2000, 5.0)
        next_claim = 0.0
        failures = 0
        group_ready = False
        try:
            while not stop_event.is_set():
                raise_if_cancelling()
                free = self._concurrency - len(self._tasks)
                if free <= 0:
                    await asyncio.wait({*self._tasks, stop}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    if not group_ready:
                        await self._ensure_group()
                        group_ready = True
                    entries: list[Entry] = []
                    if loop.time() >= next_claim:
                        entries = await self._claim(free)
                        if self._claim_cursor == _START:  # scan finished; otherwise go on at once
                            next_claim = loop.time() + claim_every_s
                    if not entries:
                        entries = await self._read_new(free)
                    failures = 0
                except RedisError as exc:
                    reraise_if_cancelling(exc)
                    if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                        group_ready = False  # Redis restarted or the stream was deleted
                    self.stats.broker_errors += 1
                    delay = _BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)]
                    failures += 1
                    _log.warning("worker %s: Redis failed (%s); retrying", self._consumer, type(exc).__name__)
                    await asyncio.wait({stop}, timeout=delay)
                    continue
                for entry_id, fields in entries:
                    task = asyncio.create_task(self._serve(entry_id, fields))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except asyncio.CancelledError:
            # Cancelled from outside: no new Redis commands. Entries in progress stay pending
            # and are claimed by another worker after claim_idle_ms.
            for task in self._tasks:
                task.cancel()
            raise
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._complete.drain()
            heartbeat.cancel()
            stop.cancel()
            if self._read_thread is not None:
                self._read_thread.shutdown(wait=False, cancel_futures=True)
        await self._retire_consumer()
        return self.stats

    async def _read_new(self, count: int) -> list[Entry]:
        """XREADGROUP up to ``count`` new entries, waiting up to ``block_ms`` (see the module docstring)."""
        layout = self._layout
        streams: dict[Any, StreamIdT] = {layout.stream: ">"}
        if self._blocking is None:
            response = await self._redis.xreadgroup(
                layout.group, self._consumer, streams, count=count, block=layout.block_ms
            )
        else:
            if self._read_thread is None:  # not the default executor: sync handlers queue there
                self._read_thread = ThreadPoolExecutor(1, thread_name_prefix=f"redis-read {self._consumer}")
            read = functools.partial(
                self._blocking.xreadgroup,
                layout.group, self._consumer, streams, count=count, block=layout.block_ms,
            )  # fmt: skip
            response = await asyncio.get_running_loop().run_in_executor(self._read_thread, read)
        return stream_entries(response)

    async def _ensure_group(self) -> None:
        version = str((await self._redis.info("server")).get("redis_version", "0"))
        if tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) < (7, 0):
            # 6.2 has XAUTOCLAIM but leaves deleted entries in the pending list, re-claimed forever.
            raise ConfigurationError(f"the Redis Streams queue needs Redis >= 7.0; the server runs {version}")
        try:
            # Id 0: requests queued before the first worker ever started are served too.
            await self._redis.xgroup_create(self._layout.stream, self._layout.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _claim(self, count: int) -> list[Entry]:
        """Take entries idle for claim_idle_ms (their worker died); dead-letter over-delivered ones."""
        layout = self._layout
        response: list[Any] = await self._redis.xautoclaim(
            layout.stream, layout.group, self._consumer, layout.claim_idle_ms, self._claim_cursor, count=count
        )
        self._claim_cursor = response[0]
        # Redis >= 7 drops deleted entries from the pending list itself (response[2]).
        claimed: list[Entry] = [(eid, fields or {}) for eid, fields in response[1] if eid is not None]
        if not claimed:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for entry_id, _fields in claimed:
            pipe.xpending_range(layout.stream, layout.group, min=entry_id, max=entry_id, count=1)
        pending: list[list[dict[str, Any]]] = await pipe.execute()
        out: list[Entry] = []
        for (entry_id, fields), info in zip(claimed, pending, strict=True):
            if info and int(info[0]["times_delivered"]) > layout.max_deliveries:
                _log.warning(
                    "worker %s: entry %s exceeded max_deliveries; dead-lettered", self._consumer, entry_id
                )
                self.stats.dead_lettered += 1
                await self._discard_entry(entry_id, fields, b"max-deliveries")
            else:
                out.append((entry_id, fields))
        self.stats.claimed += len(out)
        return out

    async def _serve(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        layout = self._layout
        self._serving.add(entry_id)
        try:
            envelope = fields.get(b"c", b"")
            try:
                rid = bytes.fromhex(fields.get(b"i", b"").decode("ascii"))
                request = self._cipher.open_request(layout.stream, rid, envelope)
            except (QueueDecryptionError, UnicodeDecodeError, ValueError):
                reason = b"key-version" if self._cipher.is_foreign_version(envelope) else b"undecryptable"
                _log.warning(
                    "worker %s: entry %s did not open under the cluster key (%s); dead-lettered. If every "
                    "entry fails, this worker's cluster key differs from the front ends'.",
                    self._consumer, entry_id, reason.decode(),
                )  # fmt: skip
                self.stats.dead_lettered += 1
                await self._discard_entry(entry_id, fields, reason)
                return
            if _now_ms() > request.deadline_ms:
                self.stats.expired += 1
                await self._discard_entry(entry_id, fields, b"")
                return
            self.stats.executed += 1
            try:
                # The request's own deadline bounds the handler (its batcher's wait included): past
                # it the front end has answered 504 and stopped listening, so the work is wasted.
                async with asyncio.timeout((request.deadline_ms - _now_ms()) / 1000):
                    body = await call_handler(
                        self._handler, request.model, request.payload, handler_is_async=self._handler_is_async
                    )
                reply = ReplyRecord(ok=True, body=body)
            except TimeoutError:
                self.stats.expired += 1
                await self._discard_entry(entry_id, fields, b"")
                return
            except Exception as exc:  # noqa: BLE001 - sealed into the reply; the worker goes on
                self.stats.handler_errors += 1
                _log.info("worker %s: handler raised %s", self._consumer, type(exc).__name__)
                reply = ReplyRecord(ok=False, error_type=type(exc).__name__, error_message=str(exc))
            now = _now_ms()
            if now > request.deadline_ms:
                self.stats.expired += 1  # the front end has given up; no one would read the reply
                await self._discard_entry(entry_id, fields, b"")
                return
            reply_stream = layout.reply_stream(request.frontend_id)
            sealed = self._cipher.seal(REPLY, reply_stream, rid, encode_reply(reply))
            first = await self._complete(
                keys=[layout.stream, layout.done_key(rid.hex()), reply_stream],
                args=[
                    layout.group, entry_id, rid.hex(), sealed,
                    min(request.deadline_ms - now, _MAX_TIMEOUT_MS) + layout.done_margin_ms,
                    layout.reply_ttl_ms, layout.reply_max_len,
                ],
            )  # fmt: skip
            if int(first) == 1:
                self.stats.answered += 1
            else:
                self.stats.duplicates_suppressed += 1
        except RedisError as exc:
            reraise_if_cancelling(exc)
            # The entry stays pending without heartbeat: some worker re-claims it after claim_idle_ms.
            self.stats.broker_errors += 1
            _log.warning(
                "worker %s: Redis failed on entry %s (%s)", self._consumer, entry_id, type(exc).__name__
            )
        finally:
            self._serving.discard(entry_id)

    async def _discard_entry(self, entry_id: bytes, fields: dict[bytes, bytes], reason: bytes) -> None:
        """Ack and delete; with a reason, keep the (still sealed) entry in the dead-letter stream."""
        layout = self._layout
        await self._discard(
            keys=[layout.stream, layout.dead_letter],
            args=[
                layout.group, entry_id, reason, fields.get(b"i", b""), fields.get(b"c", b""),
                layout.dead_letter_max_len,
            ],
        )  # fmt: skip

    async def _heartbeat(self) -> None:
        interval = self._layout.claim_idle_ms / 3000
        while True:
            await asyncio.sleep(interval)
            raise_if_cancelling()
            serving: list[StreamIdT] = [*self._serving]
            if not serving:
                continue
            try:
                await self._redis.xclaim(
                    self._layout.stream, self._layout.group, self._consumer, 0, serving, justid=True
                )
            except RedisError as exc:
                reraise_if_cancelling(exc)
                _log.warning("worker %s: heartbeat failed (%s)", self._consumer, type(exc).__name__)

    async def _retire_consumer(self) -> None:
        """Delete this consumer from the group if it owns nothing, so stopped workers leave no trace."""
        layout = self._layout
        try:
            mine = await self._redis.xpending_range(
                layout.stream, layout.group, "-", "+", 1, consumername=self._consumer
            )
            if not mine:
                await self._redis.xgroup_delconsumer(layout.stream, layout.group, self._consumer)
        except RedisError as exc:
            reraise_if_cancelling(exc)
            _log.info("worker %s: could not retire the consumer (%s)", self._consumer, type(exc).__name__)
