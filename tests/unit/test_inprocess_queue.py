"""InProcessQueue: round trips, back-pressure, deadlines, handler failures, stopping and closing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from enclaveml.errors import ConfigurationError, EnclaveMLError
from enclaveml.serving import ModelRepository, QueueWorker
from enclaveml.serving._queue import (
    HandlerError,
    InProcessQueue,
    QueueClosedError,
    QueueError,
    QueueFull,
    QueueFullError,
    QueueTimeoutError,
    RequestQueue,
    WorkerStats,
)

T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(main(), 20))  # type: ignore[arg-type]


def echo(model: str, payload: bytes) -> bytes:
    return model.encode() + b":" + payload


async def aecho(model: str, payload: bytes) -> bytes:
    await asyncio.sleep(0)
    return b"async:" + payload


class Workers:
    """Start n workers on a queue; stop() sets the event and returns their stats."""

    def __init__(self, queue: InProcessQueue, handler: object, n: int = 1, concurrency: int = 1) -> None:
        self.stop_event = asyncio.Event()
        self.tasks = [
            asyncio.create_task(
                queue.run_worker(handler, stop_event=self.stop_event, concurrency=concurrency)  # type: ignore[arg-type]
            )
            for _ in range(n)
        ]

    async def stop(self) -> list[WorkerStats]:
        self.stop_event.set()
        return list(await asyncio.gather(*self.tasks))


def test_satisfies_the_request_queue_protocol() -> None:
    assert isinstance(InProcessQueue(), RequestQueue)
    assert QueueFull is QueueFullError
    assert issubclass(QueueError, EnclaveMLError)
    assert issubclass(QueueTimeoutError, TimeoutError)


@pytest.mark.parametrize("handler", [echo, aecho])
def test_round_trip_with_several_workers(handler: Callable[[str, bytes], object]) -> None:
    async def main() -> list[WorkerStats]:
        queue = InProcessQueue()
        workers = Workers(queue, handler, n=3, concurrency=2)
        results = await asyncio.gather(*(queue.submit("m", str(i).encode(), timeout_s=5) for i in range(50)))
        prefix = b"m:" if handler is echo else b"async:"
        assert results == [prefix + str(i).encode() for i in range(50)]
        assert queue.in_flight == 0
        return await workers.stop()

    stats = run(main)
    assert sum(s.answered for s in stats) == 50
    assert sum(s.executed for s in stats) == 50


def test_full_queue_rejects_immediately_with_retry_after() -> None:
    async def main() -> None:
        queue = InProcessQueue(max_in_flight=2)
        pending = [asyncio.create_task(queue.submit("m", b"x", timeout_s=5)) for _ in range(2)]
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(QueueFullError) as info:
            await queue.submit("m", b"x", timeout_s=5)
        assert time.monotonic() - started < 0.05
        assert info.value.retry_after_s > 0
        workers = Workers(queue, echo)
        assert await asyncio.gather(*pending) == [b"m:x", b"m:x"]
        assert await queue.submit("m", b"y", timeout_s=5) == b"m:y"  # capacity is back
        await workers.stop()

    run(main)


def test_timeout_is_typed_and_expired_requests_are_not_executed() -> None:
    async def main() -> WorkerStats:
        queue = InProcessQueue()
        started = time.monotonic()
        with pytest.raises(QueueTimeoutError):
            await queue.submit("m", b"late", timeout_s=0.05)
        assert 0.04 < time.monotonic() - started < 1.0
        workers = Workers(queue, echo)
        assert await queue.submit("m", b"fresh", timeout_s=5) == b"m:fresh"
        (stats,) = await workers.stop()
        return stats

    stats = run(main)
    assert (stats.expired, stats.executed, stats.answered) == (1, 1, 1)


def test_handler_errors_are_typed_and_do_not_stop_the_worker() -> None:
    def flaky(model: str, payload: bytes) -> bytes:
        if payload == b"bad":
            raise ValueError("cannot parse the request")
        return payload

    def wrong_type(model: str, payload: bytes) -> bytes:
        return "text"  # type: ignore[return-value]

    async def main() -> WorkerStats:
        queue = InProcessQueue()
        workers = Workers(queue, flaky)
        with pytest.raises(HandlerError) as info:
            await queue.submit("m", b"bad", timeout_s=5)
        assert info.value.error_type == "ValueError"
        assert "cannot parse" in str(info.value)
        assert isinstance(info.value.__cause__, ValueError)
        assert await queue.submit("m", b"good", timeout_s=5) == b"good"
        (stats,) = await workers.stop()
        other = Workers(queue, wrong_type)
        with pytest.raises(HandlerError) as info:
            await queue.submit("m", b"x", timeout_s=5)
        assert info.value.error_type == "TypeError"
        await other.stop()
        return stats

    stats = run(main)
    assert (stats.handler_errors, stats.answered) == (1, 1)


def test_concurrency_runs_requests_in_parallel_and_stop_drains_started_ones() -> None:
    async def slow(model: str, payload: bytes) -> bytes:
        await asyncio.sleep(0.2)
        return payload

    async def main() -> None:
        queue = InProcessQueue()
        workers = Workers(queue, slow, n=1, concurrency=4)
        started = time.monotonic()
        results = await asyncio.gather(*(queue.submit("m", bytes([i]), timeout_s=5) for i in range(4)))
        assert results == [bytes([i]) for i in range(4)]
        assert time.monotonic() - started < 0.6  # 4 x 0.2 s serially would be 0.8 s
        inflight = asyncio.create_task(queue.submit("m", b"last", timeout_s=5))
        await asyncio.sleep(0.05)  # the worker has started it
        (stats,) = await workers.stop()
        assert await inflight == b"last"
        assert stats.answered == 5

    run(main)


def test_a_cancelled_worker_leaves_the_next_request_to_the_others() -> None:
    """Cancelling one worker while it waits for a job must not leave a get() that swallows one."""

    async def main() -> None:
        queue = InProcessQueue()
        doomed = Workers(queue, echo, n=1)
        await asyncio.sleep(0.05)  # it waits in the queue's get()
        doomed.tasks[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed.tasks[0]
        survivors = Workers(queue, echo, n=1)
        answers = await asyncio.gather(*(queue.submit("m", bytes([i]), timeout_s=2) for i in range(3)))
        assert answers == [b"m:" + bytes([i]) for i in range(3)]
        (stats,) = await survivors.stop()
        assert stats.answered == 3

    run(main)


def test_a_job_taken_by_a_worker_cancelled_before_starting_it_goes_back_to_the_queue() -> None:
    async def main() -> None:
        queue = InProcessQueue()
        doomed = Workers(queue, echo, n=1)
        await asyncio.sleep(0.05)
        request = asyncio.create_task(queue.submit("m", b"x", timeout_s=2))
        await asyncio.sleep(0)  # submit queued the job and woke the worker's get()...
        doomed.tasks[0].cancel()  # ...which takes it in the same pass as the worker is cancelled
        with pytest.raises(asyncio.CancelledError):
            await doomed.tasks[0]
        survivors = Workers(queue, echo, n=1)
        assert await request == b"m:x"
        (stats,) = await survivors.stop()
        assert stats.answered == 1

    run(main)


def test_close_fails_waiters_and_later_submits() -> None:
    async def main() -> None:
        queue = InProcessQueue()
        waiting = asyncio.create_task(queue.submit("m", b"x", timeout_s=5))
        await asyncio.sleep(0.01)
        await queue.aclose()
        with pytest.raises(QueueClosedError):
            await waiting
        with pytest.raises(QueueClosedError):
            await queue.submit("m", b"x", timeout_s=5)

    run(main)


def test_invalid_arguments_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        InProcessQueue(max_in_flight=0)

    async def main() -> None:
        queue = InProcessQueue()
        with pytest.raises(ConfigurationError):
            await queue.submit("m", b"x", timeout_s=0)
        with pytest.raises(ConfigurationError):
            await queue.run_worker(echo, stop_event=asyncio.Event(), concurrency=0)

    run(main)
    for limits in ({"instances": 0}, {"max_batch_size": 0}, {"max_delay_ms": -1.0}):
        with pytest.raises(ConfigurationError):
            QueueWorker(ModelRepository(), InProcessQueue(), **limits)  # type: ignore[arg-type]
