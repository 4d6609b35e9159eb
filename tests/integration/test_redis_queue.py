"""RedisStreamsQueue against a real redis-server, with workers in separate processes.

Covers: round trips, no plaintext in Redis (SCAN/XRANGE snapshots and a MONITOR tap), kill -9
of a worker under load (every request answered exactly once; re-executions counted), a worker
with the wrong cluster key, back-pressure, deadlines, heartbeats, poison entries, throughput.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from enclaveml.crypto.keys import KeyHandle
from enclaveml.errors import ConfigurationError
from enclaveml.serving._queue import (
    HandlerError,
    QueueFullError,
    QueueTimeoutError,
    RequestQueue,
    WorkerStats,
)
from enclaveml.serving._queue_envelope import REPLY, REQUEST, QueueCipher, RequestRecord, encode_request
from enclaveml.serving._redis_layout import MAX_TIMEOUT_S
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
MODEL = "model-CANARY-MODEL-c0ffee"
CANARIES = (REQUEST_CANARY, REPLY_CANARY, MODEL.encode(), b"asked to fail")


def run(main: Callable[[], Awaitable[T]], timeout_s: float = 60) -> T:
    return asyncio.run(asyncio.wait_for(main(), timeout_s))  # type: ignore[arg-type]


def sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=False)


async def submit_all(
    queue: RedisStreamsQueue, indices: range, *, in_flight: int, model: str = MODEL, timeout_s: float = 30
) -> dict[int, bytes]:
    """Submit every index with at most ``in_flight`` outstanding; return index -> answer."""
    gate = asyncio.Semaphore(in_flight)
    answers: dict[int, bytes] = {}

    async def one(i: int) -> None:
        async with gate:
            answer = await queue.submit(model, make_payload(i), timeout_s=timeout_s)
        assert i not in answers, f"request {i} answered twice"
        answers[i] = answer

    await asyncio.gather(*(one(i) for i in indices))
    return answers


def assert_no_plaintext(blob: bytes) -> None:
    for canary in CANARIES:
        assert canary not in blob, f"plaintext {canary!r} reached Redis"


def test_round_trip_via_worker_processes_leaves_only_ciphertext_in_redis(
    redis_server: RedisServer, cluster_key: KeyHandle, workers: Any
) -> None:
    url = redis_server.url
    tap = MonitorTap(redis_server.port)

    async def main() -> None:
        async with RedisStreamsQueue(url, cluster_key=cluster_key, block_ms=100) as queue:
            assert isinstance(queue, RequestQueue)
            early = asyncio.create_task(submit_all(queue, range(20), in_flight=20))
            for _ in range(200):  # a busy machine may take a while; nothing consumes them yet
                if sync_client(url).xlen(STREAM) == 20:
                    break
                await asyncio.sleep(0.05)
            blob, types = redis_snapshot(url)  # 20 sealed requests queued, no worker yet
            assert sync_client(url).xlen(STREAM) == 20
            assert_no_plaintext(blob)
            procs = workers(url, cluster_key, n=3, concurrency=4)
            answers = await submit_all(queue, range(20, 220), in_flight=32)
            answers.update(await early)
            assert answers == {i: expected_reply(i, MODEL) for i in range(220)}
            with pytest.raises(HandlerError) as info:
                await queue.submit("fail", make_payload(999), timeout_s=10)
            assert info.value.error_type == "ValueError"
            assert queue.stats.ignored_replies == 0

            # A reply nobody reads: seal a request for a front end that does not listen.
            ghost = os.urandom(16)
            rid = os.urandom(16)
            cipher = QueueCipher(cluster_key)
            record = RequestRecord(int(time.time() * 1000) + 10_000, ghost, MODEL, make_payload(7))
            sync_client(url).xadd(
                STREAM, {"i": rid.hex(), "c": cipher.seal(REQUEST, STREAM, rid, encode_request(record))}
            )
            reply_stream = f"{STREAM}:reply:{ghost.hex()}"
            for _ in range(100):
                if sync_client(url).xlen(reply_stream):
                    break
                await asyncio.sleep(0.05)
            blob, types = redis_snapshot(url)
            assert types[reply_stream.encode()] == b"stream"
            assert_no_plaintext(blob)
            ((_, fields),) = sync_client(url).xrange(reply_stream)
            assert REPLY_CANARY in cipher.open(REPLY, reply_stream, rid, fields[b"c"])
            assert 0 < sync_client(url).pttl(reply_stream) <= 300_000
            assert sync_client(url).pttl(f"{STREAM}:done:{rid.hex()}".encode()) > 0
            for proc in procs:
                stats = proc.stop()
                assert stats["dead_lettered"] == 0
            assert sync_client(url).xlen(STREAM) == 0

    run(main)
    log = tap.stop()
    assert log.count(b'"EVALSHA"') >= 221
    assert b'"XREADGROUP"' in log
    assert_no_plaintext(log)


def test_kill_9_under_load_every_request_answered_exactly_once(
    redis_server: RedisServer, cluster_key: KeyHandle, workers: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = redis_server.url
    total = 600
    procs = workers(url, cluster_key, n=3, concurrency=4, delay_ms=5, claim_idle_ms=1000)

    async def main() -> tuple[dict[int, bytes], int, float]:
        async with RedisStreamsQueue(url, cluster_key=cluster_key, block_ms=100) as queue:
            victim = procs[0]

            async def killer() -> None:
                # Kill it mid-request: after some progress, while it owns pending entries.
                client = sync_client(url)
                marker = f"-{victim.proc.pid}-".encode()
                while True:
                    await asyncio.sleep(0.002)
                    if queue.stats.answered < 150:
                        continue
                    summary = client.xpending(STREAM, "enclaveml-workers")
                    owned = [c["pending"] for c in summary["consumers"] if marker in c["name"]]
                    if owned and owned[0] >= 2:
                        victim.kill9()
                        return

            started = time.monotonic()
            answers, _ = await asyncio.gather(submit_all(queue, range(total), in_flight=32), killer())
            return answers, queue.stats.ignored_replies, time.monotonic() - started

    answers, ignored_replies, elapsed = run(main)
    assert not procs[0].alive()
    assert answers == {i: expected_reply(i, MODEL) for i in range(total)}  # each exactly once
    assert ignored_replies == 0
    survivors = [proc.stop() for proc in procs[1:]]
    executions = Counter(i for proc in procs for i in proc.executions())
    assert set(executions) == set(range(total))
    twice = sorted(i for i, n in executions.items() if n > 1)
    killed_in_flight = [i for i in procs[0].executions() if executions[i] > 1]
    assert twice == sorted(killed_in_flight), "only the killed worker's requests may run twice"
    assert len(twice) <= 4  # its concurrency
    assert sum(s["claimed"] for s in survivors) >= max(1, len(twice))
    client = sync_client(url)
    assert client.xlen(STREAM) == 0
    assert client.xpending(STREAM, "enclaveml-workers")["pending"] == 0
    with capsys.disabled():
        print(
            f"\n[kill -9] {total} requests in {elapsed:.2f} s, answered once each; "
            f"{len(twice)} executed twice (killed worker's in-flight), claimed {survivors[0]['claimed']}"
            f"+{survivors[1]['claimed']}"
        )


def test_wrong_cluster_key_worker_dead_letters_and_keeps_running(
    redis_server: RedisServer, cluster_key: KeyHandle, workers: Any
) -> None:
    url = redis_server.url
    wrong = KeyHandle("cluster", 1, os.urandom(32))
    (bad,) = workers(url, wrong, n=1, concurrency=2)

    async def main() -> None:
        async with RedisStreamsQueue(url, cluster_key=cluster_key, block_ms=100) as queue:
            for i in range(3):
                with pytest.raises(QueueTimeoutError):
                    await queue.submit(MODEL, make_payload(i), timeout_s=0.5)
            assert bad.alive()
            assert queue.stats.undecryptable_replies == 0
            assert queue.stats.ignored_replies == 0
            assert bad.stop()["dead_lettered"] == 3
            client = sync_client(url)
            dead = client.xrange(f"{STREAM}:dead")
            assert [fields[b"w"] for _, fields in dead] == [b"undecryptable"] * 3
            assert client.xlen(STREAM) == 0
            assert not list(client.scan_iter(match=f"{STREAM}:reply:*")), "no reply may be written"
            assert not list(client.scan_iter(match=f"{STREAM}:done:*"))

            # A worker on another key version names the reason; the right key then works.
            stop = asyncio.Event()
            other = RedisStreamsQueue(url, cluster_key=KeyHandle.generate("cluster", 2), block_ms=100)
            task = asyncio.create_task(other.run_worker(RecordingHandler(None, 0), stop_event=stop))
            with pytest.raises(QueueTimeoutError):
                await queue.submit(MODEL, make_payload(5), timeout_s=0.5)
            assert not task.done()
            stop.set()
            assert (await task).dead_lettered == 1
            await other.aclose()
            assert client.xrange(f"{STREAM}:dead")[-1][1][b"w"] == b"key-version"
            workers(url, cluster_key, n=1)
            assert await queue.submit(MODEL, make_payload(6), timeout_s=10) == expected_reply(6, MODEL)

    run(main)


def test_back_pressure_and_deadlines(redis_url: str, cluster_key: KeyHandle) -> None:
    async def main() -> WorkerStats:
        front = RedisStreamsQueue(redis_url, cluster_key=cluster_key, max_in_flight=4, block_ms=100)
        other = RedisStreamsQueue(redis_url, cluster_key=cluster_key, max_len=4, block_ms=100)
        pending = [asyncio.create_task(front.submit(MODEL, make_payload(i), timeout_s=10)) for i in range(4)]
        await asyncio.sleep(0.2)
        with pytest.raises(QueueFullError, match="in-flight") as info:
            await front.submit(MODEL, make_payload(9), timeout_s=10)
        assert info.value.retry_after_s > 0
        with pytest.raises(QueueFullError, match="backlog"):  # XLEN is 4 = other's max_len
            await other.submit(MODEL, make_payload(9), timeout_s=10)
        third = RedisStreamsQueue(redis_url, cluster_key=cluster_key, block_ms=100)
        for timeout_s in (0.0, -1.0, MAX_TIMEOUT_S * 1.01, math.inf, math.nan):  # a week at most
            with pytest.raises(ConfigurationError, match="timeout_s"):
                await third.submit(MODEL, make_payload(10), timeout_s=timeout_s)
        started = time.monotonic()
        with pytest.raises(QueueTimeoutError):  # queued (5th entry), but no worker before its deadline
            await third.submit(MODEL, make_payload(10), timeout_s=0.3)
        assert 0.25 < time.monotonic() - started < 2.0
        assert third.stats.timed_out == 1
        stop = asyncio.Event()
        task = asyncio.create_task(
            front.run_worker(RecordingHandler(None, 0), stop_event=stop, concurrency=2)
        )
        assert await asyncio.gather(*pending) == [expected_reply(i, MODEL) for i in range(4)]
        while sync_client(redis_url).xlen(STREAM):
            await asyncio.sleep(0.02)
        stop.set()
        stats = await task
        for queue in (front, other, third):
            await queue.aclose()
        return stats

    stats = run(main)
    assert (stats.executed, stats.answered, stats.expired) == (4, 4, 1)


def test_a_handler_is_stopped_at_its_request_deadline(redis_url: str, cluster_key: KeyHandle) -> None:
    """Past the deadline the front end has answered 504: the worker stops the work, answers nothing."""
    finished: list[bytes] = []

    async def stuck(model: str, payload: bytes) -> bytes:
        await asyncio.sleep(5)
        finished.append(payload)
        return payload

    async def main() -> WorkerStats:
        queue = RedisStreamsQueue(redis_url, cluster_key=cluster_key, block_ms=50)
        stop = asyncio.Event()
        task = asyncio.create_task(queue.run_worker(stuck, stop_event=stop))
        started = time.monotonic()
        with pytest.raises(QueueTimeoutError):
            await queue.submit(MODEL, make_payload(1), timeout_s=0.5)
        for _ in range(100):  # the worker gives up at the same deadline
            if queue_worker_idle(redis_url):
                break
            await asyncio.sleep(0.05)
        assert time.monotonic() - started < 3
        stop.set()
        stats = await task
        await queue.aclose()
        return stats

    stats = run(main)
    assert (stats.executed, stats.answered, stats.expired) == (1, 0, 1)
    assert finished == []


def queue_worker_idle(redis_url: str) -> bool:
    """No entry left in the stream (acknowledged and deleted)."""
    return int(sync_client(redis_url).xlen(STREAM)) == 0


def test_heartbeat_keeps_slow_requests_from_being_claimed_and_poison_is_dead_lettered(
    redis_url: str, cluster_key: KeyHandle
) -> None:
    executed: Counter[bytes] = Counter()

    async def slow(model: str, payload: bytes) -> bytes:
        executed[payload] += 1
        await asyncio.sleep(0.8)
        return payload

    async def main() -> list[WorkerStats]:
        options: dict[str, Any] = {"cluster_key": cluster_key, "claim_idle_ms": 200, "block_ms": 50}
        queues = [RedisStreamsQueue(redis_url, **options) for _ in range(3)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(q.run_worker(slow, stop_event=stop, concurrency=2)) for q in queues[1:]]
        answers = await asyncio.gather(*(queues[0].submit("m", bytes([i]), timeout_s=10) for i in range(4)))
        assert answers == [bytes([i]) for i in range(4)]
        stop.set()
        stats = list(await asyncio.gather(*tasks))

        # An entry delivered many times (a worker crashed on it each time) is dead-lettered.
        client = sync_client(redis_url)
        entry = client.xadd(STREAM, {"i": "00" * 16, "c": b"sealed?"})
        client.xreadgroup("enclaveml-workers", "crashed", {STREAM: ">"}, count=1)
        for _ in range(5):
            client.xclaim(STREAM, "enclaveml-workers", "crashed", 0, [entry])
        stop = asyncio.Event()
        task = asyncio.create_task(queues[1].run_worker(slow, stop_event=stop))
        for _ in range(100):
            if client.xlen(f"{STREAM}:dead"):
                break
            await asyncio.sleep(0.05)
        stop.set()
        assert (await task).dead_lettered == 1
        assert client.xrange(f"{STREAM}:dead")[0][1][b"w"] == b"max-deliveries"
        assert client.xlen(STREAM) == 0
        for q in queues:
            await q.aclose()
        return stats

    stats = run(main)
    assert executed == Counter(bytes([i]) for i in range(4))  # each ran exactly once
    assert sum(s.duplicates_suppressed for s in stats) == 0


def test_two_workers_finishing_one_request_answer_it_once(
    redis_url: str, cluster_key: KeyHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without heartbeats a slow request is claimed and run again; the marker still allows one reply."""
    from enclaveml.serving._redis_worker import RedisWorker

    async def no_heartbeat(self: RedisWorker) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(RedisWorker, "_heartbeat", no_heartbeat)
    executed: Counter[bytes] = Counter()

    async def slow(model: str, payload: bytes) -> bytes:
        executed[payload] += 1
        await asyncio.sleep(0.6)
        return payload

    async def main() -> tuple[list[WorkerStats], int]:
        options: dict[str, Any] = {"cluster_key": cluster_key, "claim_idle_ms": 150, "block_ms": 50}
        queues = [RedisStreamsQueue(redis_url, **options) for _ in range(3)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(q.run_worker(slow, stop_event=stop, concurrency=2)) for q in queues[1:]]
        assert await queues[0].submit("m", b"once", timeout_s=10) == b"once"
        await asyncio.sleep(0.8)  # the second execution finishes too
        stop.set()
        stats = list(await asyncio.gather(*tasks))
        ignored = queues[0].stats.ignored_replies
        for q in queues:
            await q.aclose()
        return stats, ignored

    stats, ignored = run(main)
    assert executed[b"once"] >= 2  # at-least-once execution ...
    assert sum(s.answered for s in stats) == 1  # ... exactly one reply written
    assert sum(s.duplicates_suppressed for s in stats) == executed[b"once"] - 1
    assert ignored == 0  # so the front end never even saw a second one


def blocked_reads(url: str, name: str) -> list[dict[str, Any]]:
    """Connections named ``name`` that Redis holds blocked in an XREADGROUP."""
    return [
        c
        for c in sync_client(url).client_list()
        if c.get("name") == name and c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")
    ]


async def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_worker_reads_on_its_own_connection_and_leaves_no_read_waiting_when_stopped_or_cancelled(
    redis_url: str, cluster_key: KeyHandle
) -> None:
    """New entries come through the worker's blocking read connection, which ends with the worker.

    BLOCK is 3 s here, so a read left behind by a stop or a cancellation would still be waiting
    in Redis when the test looks.
    """

    async def main() -> None:
        options: dict[str, Any] = {"cluster_key": cluster_key, "block_ms": 3000}
        front = RedisStreamsQueue(redis_url, **options)
        for end in ("stop", "cancel"):
            back = RedisStreamsQueue(redis_url, consumer=f"worker {end}", **options)  # a space: not a name
            name = f"worker_{end}:reads"
            stop = asyncio.Event()
            worker = asyncio.create_task(back.run_worker(RecordingHandler(None, 0), stop_event=stop))
            assert await wait_until(lambda: bool(blocked_reads(redis_url, name)), 10), "no blocked read"
            answer = await front.submit(MODEL, make_payload(7), timeout_s=10)
            assert answer == expected_reply(7, MODEL)
            assert await wait_until(lambda: bool(blocked_reads(redis_url, name)), 10)  # waiting again
            started = time.monotonic()
            if end == "stop":
                stop.set()  # the loop ends when the read returns, after its BLOCK time at most
                assert (await worker).answered == 1
            else:
                worker.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await worker
                assert time.monotonic() - started < 1.0  # does not wait for the read
            assert await wait_until(lambda: not blocked_reads(redis_url, name), 1.0), f"read left after {end}"
            await back.aclose()
        await front.aclose()

    run(main)


def test_a_queue_given_its_own_client_reads_through_it(redis_url: str, cluster_key: KeyHandle) -> None:
    """Without a URL there is no blocking read connection: the worker reads through the given client."""

    async def main() -> WorkerStats:
        client = aioredis.Redis.from_url(redis_url, decode_responses=False, client_name="given-client")
        front = RedisStreamsQueue(redis_url, cluster_key=cluster_key, block_ms=100)
        back = RedisStreamsQueue("", cluster_key=cluster_key, block_ms=2000, consumer="given", client=client)
        stop = asyncio.Event()
        handler = RecordingHandler(None, 0)
        worker = asyncio.create_task(back.run_worker(handler, stop_event=stop, concurrency=4))
        assert await wait_until(lambda: bool(blocked_reads(redis_url, "given-client")), 10)
        answers = await submit_all(front, range(8), in_flight=8)
        assert answers == {i: expected_reply(i, MODEL) for i in range(8)}
        stop.set()
        stats = await worker
        await front.aclose()
        await back.aclose()
        await client.aclose()
        return stats

    assert run(main).answered == 8


def test_replies_finishing_together_leave_in_one_pipeline_and_survive_a_script_flush(
    redis_url: str, cluster_key: KeyHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's completions share one round trip; after NOSCRIPT (Redis restarted) each answers once."""
    from enclaveml.serving import _redis_worker

    flushes: list[int] = []
    real_flush = _redis_worker._CompletionPipeline._flush

    async def spy(self: _redis_worker._CompletionPipeline) -> None:
        flushes.append(len(self._queued))
        await real_flush(self)

    monkeypatch.setattr(_redis_worker._CompletionPipeline, "_flush", spy)
    entered: list[bytes] = []
    all_in, release = asyncio.Event(), asyncio.Event()

    async def gated(model: str, payload: bytes) -> bytes:
        entered.append(payload)
        if len(entered) % 8 == 0:
            all_in.set()
        await release.wait()  # eight requests finish in the same event-loop pass, like a model batch
        return payload[::-1]

    async def main() -> tuple[list[dict[int, bytes]], WorkerStats]:
        options: dict[str, Any] = {"cluster_key": cluster_key, "block_ms": 50}
        front, back = RedisStreamsQueue(redis_url, **options), RedisStreamsQueue(redis_url, **options)
        stop = asyncio.Event()
        worker = asyncio.create_task(back.run_worker(gated, stop_event=stop, concurrency=8))
        rounds: list[dict[int, bytes]] = []
        for first in (0, 8):
            if first:
                await asyncio.to_thread(sync_client(redis_url).script_flush)  # as after a Redis restart
            all_in.clear()
            release.clear()
            pending = asyncio.create_task(submit_all(front, range(first, first + 8), in_flight=8))
            await all_in.wait()
            release.set()
            rounds.append(await pending)
        stop.set()
        stats = await worker
        await front.aclose()
        await back.aclose()
        return rounds, stats

    rounds, stats = run(main)
    assert rounds == [{i: make_payload(i)[::-1] for i in range(k, k + 8)} for k in (0, 8)]
    assert flushes == [8, 8]  # one pipeline per batch, also when every script call in it hit NOSCRIPT
    assert stats.answered == 16
    assert stats.broker_errors == 0
    assert stats.duplicates_suppressed == 0


def test_throughput_smoke(
    redis_server: RedisServer, cluster_key: KeyHandle, workers: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = redis_server.url
    workers(url, cluster_key, n=2, concurrency=16)

    async def measure(queue: RedisStreamsQueue, in_flight: int, seconds: float) -> tuple[float, float, float]:
        latencies: list[float] = []
        payload = make_payload(1)
        end = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                await queue.submit(MODEL, payload, timeout_s=10)
                latencies.append(time.perf_counter() - t0)

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(in_flight)))
        rate = len(latencies) / (time.monotonic() - started)
        cuts = statistics.quantiles(latencies, n=100)
        return rate, cuts[49] * 1000, cuts[98] * 1000

    async def main() -> dict[int, tuple[float, float, float]]:
        async with RedisStreamsQueue(url, cluster_key=cluster_key, max_in_flight=64) as queue:
            await measure(queue, 32, 0.5)  # warm-up: connections, scripts, workers
            return {n: await measure(queue, n, 2.0) for n in (1, 32)}

    results = run(main)
    with capsys.disabled():
        for n, (rate, p50, p99) in results.items():
            print(f"\n[throughput] in flight {n}: {rate:.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    assert results[32][0] > 100
