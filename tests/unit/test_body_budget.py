"""LimitAndCount's shared budget for request bodies in flight, as a pure ASGI middleware."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from enclaveml._web._limits import LimitAndCount, ServingStats, charge_body_bytes
from enclaveml.errors import ConfigurationError


def _middleware(app: Any, *, budget: int, limit: int = 100) -> LimitAndCount:
    stats = ServingStats(CollectorRegistry())
    return LimitAndCount(
        app, stats=lambda: stats, routes=lambda: [], max_request_bytes=limit, too_large=ValueError,
        max_bytes_in_flight=budget,
    )  # fmt: skip


def _scope() -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/x", "headers": []}


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def _answer(send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _statuses(sent: list[Any]) -> list[int]:
    return [m["status"] for m in sent if m["type"] == "http.response.start"]


def test_a_body_that_would_pass_the_budget_gets_503_and_the_budget_comes_back() -> None:
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _read_body(receive)
        await release.wait()  # e.g. waiting in the batcher's queue: the body is still held
        await _answer(send)

    def chunks(*parts: bytes) -> Any:
        queue = list(parts)

        async def receive() -> Any:
            body = queue.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(queue)}

        return receive

    async def scenario() -> tuple[LimitAndCount, list[list[Any]], list[int]]:
        middleware = _middleware(app, budget=100)
        sent: list[list[Any]] = [[], [], [], []]

        def run(index: int, receive: Any) -> asyncio.Task[None]:
            async def send(message: Any) -> None:
                sent[index].append(message)

            return asyncio.create_task(middleware(_scope(), receive, send))

        first = run(0, chunks(b"a" * 30, b"a" * 30))
        second = run(1, chunks(b"b" * 30))
        await asyncio.sleep(0.05)
        held = [middleware.bytes_in_flight]
        third = run(2, chunks(b"c" * 20, b"c" * 20))  # 60 + 30 + 20 fits, + 20 does not
        await third
        held.append(middleware.bytes_in_flight)
        release.set()
        await asyncio.gather(first, second)
        held.append(middleware.bytes_in_flight)
        await run(3, chunks(b"d" * 40, b"d" * 40))  # fits again once the others ended
        held.append(middleware.bytes_in_flight)
        return middleware, sent, held

    middleware, sent, held = asyncio.run(scenario())
    assert held == [90, 90, 0, 0]
    assert [_statuses(s) for s in sent] == [[200], [200], [503], [200]]
    refused = dict(sent[2][0]["headers"])
    assert refused[b"retry-after"] == b"1"
    assert b"connection" not in refused  # kept: the rest of the body is read and dropped
    assert middleware._stats().status_count(503) == 1


def test_a_request_alone_is_admitted_whatever_it_charges_and_derived_buffers_count() -> None:
    gate = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = await _read_body(receive)
        if scope["path"] == "/hold":
            await gate.wait()
        else:
            charge_body_bytes(scope, len(body) * 10)  # e.g. its decompressed copy
        await _answer(send)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"x" * 50, "more_body": False}

    async def scenario() -> tuple[list[int], list[int], int]:
        middleware = _middleware(app, budget=100)
        alone: list[int] = []
        crowded: list[int] = []

        def send_to(out: list[int]) -> Any:
            async def send(message: Any) -> None:
                if message["type"] == "http.response.start":
                    out.append(message["status"])

            return send

        await middleware(_scope(), receive, send_to(alone))  # 500 bytes, but alone: admitted
        holder = asyncio.create_task(middleware({**_scope(), "path": "/hold"}, receive, send_to([])))
        await asyncio.sleep(0.01)
        await middleware(_scope(), receive, send_to(crowded))  # 500 more with 50 held: refused
        gate.set()
        await holder
        return alone, crowded, middleware.bytes_in_flight

    alone, crowded, left = asyncio.run(scenario())
    assert alone == [200]
    assert crowded == [503]
    assert left == 0


def test_the_budget_cannot_be_smaller_than_one_request() -> None:
    with pytest.raises(ConfigurationError, match="at least max_request_bytes"):
        _middleware(lambda *a: None, budget=99, limit=100)


def test_without_a_budget_nothing_is_charged() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _read_body(receive)
        charge_body_bytes(scope, 10**12)
        await _answer(send)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"x" * 50, "more_body": False}

    stats = ServingStats(CollectorRegistry())
    middleware = LimitAndCount(
        app, stats=lambda: stats, routes=lambda: [], max_request_bytes=100, too_large=ValueError
    )
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(middleware(_scope(), receive, send))
    assert _statuses(sent) == [200]
    assert middleware.bytes_in_flight == 0
