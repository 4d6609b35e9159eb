"""Where the Redis Streams queue keeps things, and the Lua scripts that change them atomically.

Redis is outside the TEE: it sees key names, request ids, sizes and timing, never a model
name, input, output or error text (those are sealed, see :mod:`._queue_envelope`).
``{S}`` is the request stream name (default ``enclaveml:requests``), ``{G}`` the consumer group
(default ``enclaveml-workers``). Every key and field name is ASCII; every value is either ASCII
or an envelope. No Redis Cluster hash tags: one Redis (or a Sentinel-managed primary).

``{S}`` — request stream (type stream), one entry per submitted request::

    field  value
    i      request id: 32 lowercase hex characters (16 random bytes from os.urandom)
    c      request envelope (17 + record + 16 bytes), sealed for (request, {S}, id)

    XADD by front ends, a plain XADD pipelined with XLEN (no script: Redis copies and hashes
    every byte of a script's arguments, and a request envelope is as large as its tensors).
    Front ends refuse new requests once XLEN >= max_len; front ends racing each other can
    overshoot it by their requests in flight. Never trimmed (MAXLEN would drop queued
    requests). Read by workers with XREADGROUP in group {G}, created at id 0 with MKSTREAM by
    the first worker. Entries leave through COMPLETE or DISCARD (XACK + XDEL in one script),
    so the stream only holds requests that are queued or being served, and XLEN is the
    backlog that back-pressure is computed from. No TTL.

``{G}`` consumers — one per worker (default name ``<host>-<pid>-<4 random hex bytes>``); a
worker that stops cleanly deletes its consumer when it owns no pending entry. A worker
killed mid-request leaves its entries in the group's pending list, and another worker takes
them with XAUTOCLAIM once they have been idle ``claim_idle_ms``; live workers refresh the idle
time of the entries they are serving (XCLAIM ... JUSTID) every ``claim_idle_ms / 3``.

``{S}:reply:<front-end id>`` — one reply stream per front end (type stream); the id is 32 hex
characters, random per :class:`RedisStreamsQueue` instance::

    i      request id (32 hex characters), as in the request
    c      reply envelope, sealed for (reply, this reply stream's name, id)

    XADD by workers through COMPLETE (MAXLEN ~ reply_max_len, PEXPIRE reply_ttl_ms on every
    write, so the stream of a front end that died disappears). The front end reads it with
    XREAD (no group: it is the only reader) and XDELs what it has read.

``{S}:done:<request id>`` — completion marker (type string, value ``1``), SET NX by COMPLETE;
PX = time left until the request's deadline (at most ``MAX_TIMEOUT_S``, which also bounds what
``submit`` accepts) + ``done_margin_ms`` (clock skew). Only the worker whose SET NX succeeds
writes a reply, so each request id is answered at most once.

``{S}:dead`` — dead-letter stream (type stream, MAXLEN ~ dead_letter_max_len, no TTL)::

    e      the request entry's id in {S}
    w      reason, ASCII: ``undecryptable`` (wrong cluster key, tampering or malformed entry),
           ``key-version`` (sealed under another cluster key version), ``max-deliveries``
           (claimed more than max_deliveries times: it may crash workers)
    i      request id field as found (may be empty)
    c      the request envelope as found, still sealed (may be empty)
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass
from typing import Any

from enclaveml.errors import ConfigurationError

__all__ = [
    "COMPLETE_LUA",
    "DISCARD_LUA",
    "MAX_TIMEOUT_S",
    "RedisLayout",
    "default_consumer",
    "raise_if_cancelling",
    "reader_client_name",
    "reraise_if_cancelling",
    "stream_entries",
]

# The longest a request may wait for its answer: a week. Far above any serving timeout, and it
# keeps every completion marker's expiry finite and inside what Redis accepts.
MAX_TIMEOUT_S = 7 * 24 * 3600.0

COMPLETE_LUA = """
-- KEYS[1] request stream, KEYS[2] completion marker, KEYS[3] reply stream
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] request id (hex), ARGV[4] reply envelope,
-- ARGV[5] marker TTL ms, ARGV[6] reply stream TTL ms, ARGV[7] reply stream max length
local first = redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[5])
if first then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'i', ARGV[3], 'c', ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if first then return 1 end
return 0
"""

DISCARD_LUA = """
-- KEYS[1] request stream, KEYS[2] dead-letter stream
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] reason ('' = drop silently), ARGV[4] request id,
-- ARGV[5] envelope, ARGV[6] dead-letter max length
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'e', ARGV[2], 'w', ARGV[3], 'i', ARGV[4],
             'c', ARGV[5])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer (got {value!r})")
    return value


def _key_part(name: str, value: str) -> str:
    if not value or not value.isascii() or not value.isprintable() or " " in value:
        raise ConfigurationError(f"{name} must be a non-empty printable ASCII name without spaces")
    return value


@dataclass(frozen=True)
class RedisLayout:
    """Names and limits shared by front ends and workers; both sides must agree on all of them."""

    stream: str = "enclaveml:requests"
    group: str = "enclaveml-workers"
    max_len: int = 10_000
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    block_ms: int = 500
    reply_ttl_ms: int = 300_000
    reply_max_len: int = 100_000
    done_margin_ms: int = 60_000
    dead_letter_max_len: int = 10_000

    def __post_init__(self) -> None:
        _key_part("stream", self.stream)
        _key_part("group", self.group)
        for name in (
            "max_len", "claim_idle_ms", "max_deliveries", "block_ms", "reply_ttl_ms",
            "reply_max_len", "done_margin_ms", "dead_letter_max_len",
        ):  # fmt: skip
            _positive(name, getattr(self, name))

    def reply_stream(self, frontend_id: bytes) -> str:
        return f"{self.stream}:reply:{frontend_id.hex()}"

    def done_key(self, rid_hex: str) -> str:
        return f"{self.stream}:done:{rid_hex}"

    @property
    def dead_letter(self) -> str:
        return f"{self.stream}:dead"


def default_consumer() -> str:
    """Unique per process and restart, so a restarted worker never inherits a dead one's entries."""
    host = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in socket.gethostname()) or "host"
    return f"{host[:40]}-{os.getpid()}-{os.urandom(4).hex()}"


def reader_client_name(consumer: str) -> str:
    """CLIENT SETNAME for a worker's read connection: its consumer name in the characters Redis allows."""
    return "".join(ch if "!" <= ch <= "~" else "_" for ch in consumer)[:80] + ":reads"


def stream_entries(response: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Flatten an XREAD/XREADGROUP answer (RESP2 list or RESP3 dict) into (entry id, fields)."""
    if not response:
        return []
    groups = response.values() if isinstance(response, dict) else (item[1] for item in response)
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    for entries in groups:
        # RESP3 through redis-py wraps each stream's entries in one more list.
        if entries and isinstance(entries[0], list):
            entries = entries[0]
        for entry_id, fields in entries:
            out.append((entry_id, fields or {}))
    return out


def raise_if_cancelling(cause: BaseException | None = None) -> None:
    """Raise CancelledError if this task is being cancelled; call it at the top of retry loops.

    redis-py 8.1 sometimes loses a cancellation that lands while a command completes (seen
    with XREADGROUP at asyncio.run shutdown): the command returns normally and the task's
    cancel request is left pending. A loop that carried on would keep issuing commands on a
    connection pool that the cancellation left inconsistent, and hang in a read forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from cause


def reraise_if_cancelling(exc: BaseException) -> None:
    """In ``except RedisError``: a cancellation surfaced as a Redis error is still a cancellation."""
    raise_if_cancelling(exc)
