"""A private, throw-away ``redis-server`` for tests (no pytest imports, so scripts can use it too).

Each :class:`RedisServer` runs the real binary on 127.0.0.1 with an ephemeral port, no
persistence (``--save '' --appendonly no``) and its own temporary directory, and is killed
when stopped. Tests must see the same server CI sees, not a mock: the queue's guarantees
depend on Redis semantics (consumer groups, XAUTOCLAIM, Lua atomicity).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["MonitorTap", "RedisServer", "RedisServerUnavailable", "redis_server_binary", "redis_snapshot"]


class RedisServerUnavailable(RuntimeError):
    """``redis-server`` is not installed (run ``scripts/install-redis.sh``)."""


def redis_server_binary() -> str | None:
    """Path of ``redis-server`` (``$REDIS_SERVER`` wins over PATH), or None when absent."""
    explicit = os.environ.get("REDIS_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("redis-server")


def _free_port() -> int:
    # Bind-then-close leaves a tiny race with other processes; start() retries on failure.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` child process; use as a context manager or call start()/stop()."""

    def __init__(self, *, startup_timeout_s: float = 10.0) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RedisServerUnavailable("redis-server not found on PATH; run scripts/install-redis.sh")
        self._binary = binary
        self._startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self._tmp = tempfile.TemporaryDirectory(prefix="enclaveml-redis-")
        last_error = ""
        for _attempt in range(5):
            self.port = _free_port()
            log = Path(self._tmp.name) / "redis.log"
            args = [
                self._binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._tmp.name,
                "--logfile", str(log),
                "--daemonize", "no",
                "--protected-mode", "yes",
            ]  # fmt: skip
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            if self._wait_ready():
                return self
            last_error = log.read_text(errors="replace")[-2000:] if log.exists() else "no log"
            self._kill()
        self.stop()
        raise RuntimeError(f"redis-server did not start: {last_error}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None

    def stop(self) -> None:
        self._kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def redis_snapshot(url: str) -> tuple[bytes, dict[bytes, bytes]]:
    """Everything stored in Redis, by ordinary commands only (SCAN, TYPE, XRANGE, XINFO, GET).

    Returns one blob of every key name, stream entry id, field, value, group and consumer
    name and string value, plus each key's type, for "no plaintext in Redis" assertions.
    """
    import redis

    client = redis.Redis.from_url(url, decode_responses=False)
    blob = bytearray()
    types: dict[bytes, bytes] = {}
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            types[key] = kind
            blob += key + b"\n"
            if kind == b"stream":
                for entry_id, fields in client.xrange(key):
                    blob += entry_id + b"".join(name + value for name, value in fields.items())
                for group in client.xinfo_groups(key):
                    blob += repr(group).encode()
                    for consumer in client.xinfo_consumers(key, group["name"]):
                        blob += repr(consumer).encode()
            elif kind == b"string":
                blob += client.get(key) or b""
            else:
                raise AssertionError(f"unexpected Redis key type {kind!r} for {key!r}")
    finally:
        client.close()
    return bytes(blob), types


class MonitorTap:
    """Records every command Redis executes (MONITOR, over a raw socket) until stopped."""

    def __init__(self, port: int) -> None:
        import threading

        self._sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._sock.sendall(b"MONITOR\r\n")
        self._sock.settimeout(0.1)
        self._data = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            self._data += chunk

    def stop(self) -> bytes:
        time.sleep(0.2)  # let the last commands arrive
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        return bytes(self._data)
