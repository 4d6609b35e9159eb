"""LimitAndCount's body deadline as a pure ASGI middleware: one timer, one cancellation taken back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import CollectorRegistry

from enclaveml._web._limits import LimitAndCount, ServingStats


def _middleware(app: Any, timeout_s: float, min_rate: float = 1024.0) -> LimitAndCount:
    stats = ServingStats(CollectorRegistry())
    return LimitAndCount(
        app, stats=lambda: stats, routes=lambda: [], max_request_bytes=10**6, too_large=ValueError,
        body_timeout_s=timeout_s, min_body_rate=min_rate,
    )  # fmt: skip


SCOPE = {"type": "http", "method": "POST", "path": "/x", "headers": [(b"content-length", b"10")]}


def test_a_stalled_body_is_answered_408_and_another_cancellation_is_not_swallowed() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise AssertionError("the body never comes")

    async def scenario() -> tuple[list[Any], list[Any]]:
        never = asyncio.Event()
        sent_alone: list[Any] = []
        sent_both: list[Any] = []

        async def receive() -> Any:
            await never.wait()

        async def send_to(out: list[Any], message: Any) -> None:
            out.append(message)

        alone = asyncio.create_task(_middleware(app, 0.1)(SCOPE, receive, lambda m: send_to(sent_alone, m)))
        await alone  # the deadline alone: answered, not cancelled
        both = asyncio.create_task(_middleware(app, 0.2)(SCOPE, receive, lambda m: send_to(sent_both, m)))
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + 0.25, both.cancel)  # e.g. a server shutting down, just after it
        time.sleep(0.4)  # both callbacks run in one iteration of the loop
        try:
            await both
        except asyncio.CancelledError:
            return sent_alone, sent_both
        raise AssertionError("the other cancellation was swallowed")

    alone, both = asyncio.run(scenario())
    assert [m["status"] for m in alone if "status" in m] == [408]
    assert both == []


def _trickle(size: int, every_s: float, chunks: int, timeout_s: float, min_rate: float) -> list[Any]:
    """Run a body of ``chunks`` chunks, one every ``every_s``, through the middleware; what it sent."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario() -> list[Any]:
        left = chunks
        sent: list[Any] = []

        async def receive() -> Any:
            nonlocal left
            await asyncio.sleep(every_s)
            left -= 1
            return {"type": "http.request", "body": b"x" * size, "more_body": left > 0}

        async def send(message: Any) -> None:
            sent.append(message)

        await _middleware(app, timeout_s, min_rate)(SCOPE, receive, send)
        return sent

    return asyncio.run(scenario())


def test_a_body_trickled_below_the_minimum_rate_is_answered_408() -> None:
    # A chunk well within the idle deadline each time, but 10 bytes/s against a minimum of 100:
    # cut once the first 0.3 s and what the bytes bought are spent (~0.45 s), not after 10 s.
    started = time.monotonic()
    sent = _trickle(1, 0.1, 100, timeout_s=0.3, min_rate=100)
    assert [m["status"] for m in sent if "status" in m] == [408]
    assert b"100 bytes/s" in sent[-1]["body"]
    assert time.monotonic() - started < 2


def test_a_body_above_the_minimum_rate_is_never_cut_off() -> None:
    # 500 bytes/s for 1.5 s, five times the idle deadline: a slow upload that keeps going.
    sent = _trickle(50, 0.1, 15, timeout_s=0.3, min_rate=100)
    assert [m["status"] for m in sent if "status" in m] == [200]
