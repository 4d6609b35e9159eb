"""LimitAndCount's body deadline as a pure ASGI middleware: one timer, one cancellation taken back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import CollectorRegistry

from enclaveml._web._limits import LimitAndCount, ServingStats


def _middleware(app: Any, timeout_s: float) -> LimitAndCount:
    stats = ServingStats(CollectorRegistry())
    return LimitAndCount(
        app, stats=lambda: stats, routes=lambda: [], max_request_bytes=10**6, too_large=ValueError,
        body_timeout_s=timeout_s,
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
