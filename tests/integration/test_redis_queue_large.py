"""RedisStreamsQueue with image-sized requests given as parts, and the backlog bound across front ends.

Requests of the serving benchmark's size (one 224x224x3 float32 image, ~600 KB) are submitted as
parts (the way the HTTP front end hands over tensors without joining them) and enqueued with a
plain XADD: Redis still holds only ciphertext, and a worker killed with them in flight still
has them reclaimed (XAUTOCLAIM) and answered exactly once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis

import enclaveml.serving._redis_queue as redis_queue
from enclaveml.crypto.keys import KeyHandle
from enclaveml.serving._queue import QueueFullError, WorkerStats
from enclaveml.serving._redis_queue import RedisStreamsQueue
from tests.redis_server import MonitorTap, RedisServer, redis_snapshot
from tests.redis_worker import (
    REPLY_CANARY,
    REQUEST_CANARY,
    RecordingHandler,
    expected_reply,
    make_payload,
)

T = TypeVar("T")
STREAM = "enclaveml:requests"
MODEL = "model-CANARY-MODEL-600k"
SIZE = 3 * 224 * 224 * 4


def run(main: Callable[[], Awaitable[T]], timeout_s: float = 90) -> T:
    return asyncio.run(asyncio.wait_for(main(), timeout_s))  # type: ignore[arg-type]


def large_payload(index: int) -> list[bytes | bytearray | memoryview]:
    """An image-sized request as three parts, with the canary at its start, middle and end."""
    middle = bytearray(b"x" * SIZE)
    middle[SIZE // 2 : SIZE // 2 + len(REQUEST_CANARY)] = REQUEST_CANARY
    return [make_payload(index, 64), memoryview(middle), REQUEST_CANARY]


def sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=False)


def assert_no_plaintext(blob: bytes) -> None:
    for canary in (REQUEST_CANARY, REPLY_CANARY, MODEL.encode()):
        assert canary not in blob, f"plaintext {canary!r} reached Redis"


def test_large_requests_are_ciphertext_in_redis_and_survive_kill_9(
    redis_server: RedisServer, cluster_key: KeyHandle, workers: Any
) -> None:
    url = redis_server.url
    total = 60

    async def main() -> dict[int, bytes]:
        async with RedisStreamsQueue(url, cluster_key=cluster_key, block_ms=100) as queue:
            answers: dict[int, bytes] = {}
            gate = asyncio.Semaphore(12)

            async def one(i: int) -> None:
                async with gate:
                    answer = await queue.submit(MODEL, large_payload(i), timeout_s=60)
                assert i not in answers, f"request {i} answered twice"
                answers[i] = answer

            # Queued with no worker yet: what Redis stores and what it is sent is ciphertext.
            tap = MonitorTap(redis_server.port)
            early = [asyncio.create_task(one(i)) for i in range(4)]
            while sync_client(url).xlen(STREAM) < 4:
                await asyncio.sleep(0.02)
            blob, _ = redis_snapshot(url)
            log = tap.stop()
            assert_no_plaintext(blob)
            assert_no_plaintext(log)
            assert log.count(f'"XADD" "{STREAM}"'.encode()) == 4  # no script copies the envelope
            assert b'"EVALSHA"' not in log
            for _, fields in sync_client(url).xrange(STREAM):
                assert len(fields[b"c"]) == 17 + 27 + len(MODEL) + 64 + SIZE + len(REQUEST_CANARY) + 16

            procs = workers(url, cluster_key, n=3, concurrency=2, delay_ms=20, claim_idle_ms=1000)
            victim = procs[0]

            async def killer() -> None:
                client = sync_client(url)
                marker = f"-{victim.proc.pid}-".encode()
                while True:
                    await asyncio.sleep(0.002)
                    if queue.stats.answered < 10:
                        continue
                    summary = client.xpending(STREAM, "enclaveml-workers")
                    owned = [c["pending"] for c in summary["consumers"] if marker in c["name"]]
                    if owned and owned[0] >= 1:
                        victim.kill9()
                        return

            await asyncio.gather(*early, *(one(i) for i in range(4, total)), killer())
            assert queue.stats.ignored_replies == 0
            survivors = [proc.stop() for proc in procs[1:]]
            executions = Counter(i for proc in procs for i in proc.executions())
            assert set(executions) == set(range(total))
            twice = sorted(i for i, n in executions.items() if n > 1)
            assert twice == sorted(i for i in victim.executions() if executions[i] > 1)
            assert sum(s["claimed"] for s in survivors) >= max(1, len(twice))
            return answers

    answers = run(main)
    assert answers == {i: expected_reply(i, MODEL) for i in range(total)}  # each exactly once
    client = sync_client(url)
    assert client.xlen(STREAM) == 0
    assert client.xpending(STREAM, "enclaveml-workers")["pending"] == 0


def test_backlog_bound_across_front_ends(
    redis_url: str, cluster_key: KeyHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each XADD reads the backlog back: a front end refuses once it sees max_len, overshooting by
    at most its in-flight requests when its last reading is out of date, and reads a stale one again."""

    async def main() -> tuple[int, WorkerStats]:
        options: dict[str, Any] = {"cluster_key": cluster_key, "max_len": 6, "block_ms": 100}
        a = RedisStreamsQueue(redis_url, max_in_flight=3, **options)
        b = RedisStreamsQueue(redis_url, **options)
        c = RedisStreamsQueue(redis_url, **options)
        client = sync_client(redis_url)
        pending: dict[int, asyncio.Task[bytes]] = {}

        def submit(queue: RedisStreamsQueue, i: int) -> asyncio.Task[bytes]:
            pending[i] = asyncio.create_task(queue.submit(MODEL, make_payload(i), timeout_s=30))
            return pending[i]

        async def backlog(n: int) -> None:
            while client.xlen(STREAM) < n:
                await asyncio.sleep(0.01)

        submit(a, 0)
        await backlog(1)
        submit(c, 1)  # c last saw a backlog of 2
        await backlog(2)
        for i in range(2, 6):  # b fills the backlog to max_len, and then refuses
            submit(b, i)
        await backlog(6)
        with pytest.raises(QueueFullError, match="backlog"):
            await b.submit(MODEL, make_payload(99), timeout_s=30)

        # a's reading (1) is out of date: it adds while reading + in-flight fit, then reads and refuses.
        refused = 0
        for i in range(6, 10):
            task = submit(a, i)
            await asyncio.sleep(0.05)
            if task.done():
                with pytest.raises(QueueFullError, match="backlog"):
                    task.result()
                del pending[i]
                refused += 1
        assert refused >= 2
        assert 6 <= client.xlen(STREAM) <= 6 + 3  # max_len plus at most a's in-flight requests

        # c's reading (2) would let it add too, but it is older than the freshness limit now.
        monkeypatch.setattr(redis_queue, "_BACKLOG_FRESH_S", 0.0)
        with pytest.raises(QueueFullError, match="backlog"):
            await c.submit(MODEL, make_payload(98), timeout_s=30)

        # Nothing accepted is lost: one worker answers every request, once.
        stop = asyncio.Event()
        worker = asyncio.create_task(a.run_worker(RecordingHandler(None, 0), stop_event=stop, concurrency=4))
        answers = dict(zip(pending, await asyncio.gather(*pending.values()), strict=True))
        assert answers == {i: expected_reply(i, MODEL) for i in pending}
        stop.set()
        stats = await worker
        for queue in (a, b, c):
            await queue.aclose()
        return len(pending), stats

    accepted, stats = run(main)
    assert stats.answered == stats.executed == accepted
