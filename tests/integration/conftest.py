"""Fixtures for integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer, redis_server_binary

# --- Redis (request queue) -------------------------------------------------------------------


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh real redis-server per test (127.0.0.1, ephemeral port, no persistence), killed after.

    Skipped when redis-server is missing on a developer machine; with ``CI`` set a missing
    server fails the run instead, so CI cannot go green without having tested the queue.
    """
    if redis_server_binary() is None:
        message = "redis-server is not installed: run `bash scripts/install-redis.sh`"
        if _ci():
            pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)")
        pytest.skip(message)
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url
