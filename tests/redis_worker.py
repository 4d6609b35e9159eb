"""A queue worker process for the Redis integration tests: ``python -m tests.redis_worker --url ...``.

It serves a test handler through :class:`RedisStreamsQueue` until SIGTERM, and appends the
request index of every execution it *starts* to ``--record`` (one line, written through to
the kernel at once, so the record survives ``kill -9``). That lets the tests count how many
requests ran twice, separately from how many were answered twice.

The cluster key comes from ``$ENCLAVEML_TEST_CLUSTER_KEY`` (hex) so that it never shows on a
command line; this is a test harness: real workers get the key from the key broker.

Test payloads look like ``<request canary>|<index>|<padding>``; the answer is
``<reply canary>|<index>|<model>``. Model ``fail`` raises, model ``slow`` sleeps 0.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

from enclaveml.crypto.keys import KeyHandle
from enclaveml.serving._redis_queue import RedisStreamsQueue

REQUEST_CANARY = b"CANARY-REQUEST-7f3a9c"
REPLY_CANARY = b"CANARY-REPLY-51be02"
KEY_ENV = "ENCLAVEML_TEST_CLUSTER_KEY"


def make_payload(index: int, size: int = 1024) -> bytes:
    head = REQUEST_CANARY + b"|" + str(index).encode() + b"|"
    return head + b"x" * max(0, size - len(head))


def expected_reply(index: int, model: str) -> bytes:
    return REPLY_CANARY + b"|" + str(index).encode() + b"|" + model.encode()


class RecordingHandler:
    """The test handler: records each execution's request index, then answers or fails."""

    def __init__(self, record: Path | None, delay_s: float) -> None:
        self._lock = threading.Lock()
        self._file = record.open("a", buffering=1) if record is not None else None
        self._delay_s = delay_s

    def __call__(self, model: str, payload: bytes) -> bytes:
        index = payload.split(b"|", 2)[1]
        if self._file is not None:
            with self._lock:
                self._file.write(index.decode() + "\n")
        if model == "fail":
            raise ValueError("the test handler was asked to fail")
        time.sleep(0.5 if model == "slow" else self._delay_s)
        return REPLY_CANARY + b"|" + index + b"|" + model.encode()


async def _serve(args: argparse.Namespace) -> dict[str, int]:
    key = KeyHandle("cluster", 1, bytes.fromhex(os.environ[KEY_ENV]))
    queue = RedisStreamsQueue(
        args.url,
        cluster_key=key,
        stream=args.stream,
        claim_idle_ms=args.claim_idle_ms,
        block_ms=100,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    handler = RecordingHandler(Path(args.record) if args.record else None, args.delay_ms / 1000)
    try:
        if args.ready:
            Path(args.ready).write_text(str(os.getpid()))
        stats = await queue.run_worker(handler, stop_event=stop, concurrency=args.concurrency)
    finally:
        await queue.aclose()
    return dict(vars(stats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", default="enclaveml:requests")
    parser.add_argument("--record", default="")
    parser.add_argument("--stats", default="")
    parser.add_argument("--ready", default="")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--claim-idle-ms", type=int, default=1000)
    args = parser.parse_args()
    stats = asyncio.run(_serve(args))
    if args.stats:
        Path(args.stats).write_text(json.dumps(stats))


if __name__ == "__main__":
    main()


class WorkerProcess:
    """A running ``python -m tests.redis_worker`` child, started by the tests and stopped by id."""

    def __init__(
        self,
        url: str,
        key_hex: str,
        workdir: Path,
        name: str,
        *,
        concurrency: int = 4,
        delay_ms: float = 0.0,
        claim_idle_ms: int = 1000,
        stream: str = "enclaveml:requests",
    ) -> None:
        import subprocess
        import sys

        self.record = workdir / f"{name}.executions"
        self.stats_path = workdir / f"{name}.stats.json"
        self.ready_path = workdir / f"{name}.ready"
        args = [
            sys.executable, "-m", "tests.redis_worker", "--url", url, "--stream", stream,
            "--record", str(self.record), "--stats", str(self.stats_path),
            "--concurrency", str(concurrency), "--delay-ms", str(delay_ms),
            "--claim-idle-ms", str(claim_idle_ms), "--ready", str(self.ready_path),
        ]  # fmt: skip
        env = {**os.environ, KEY_ENV: key_hex}
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(args, cwd=root, env=env, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the child has imported everything and is about to serve."""
        deadline = time.monotonic() + timeout_s
        while not self.ready_path.exists():
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.proc.pid} did not become ready")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 15.0) -> dict[str, int]:
        """SIGTERM, wait for a clean exit, return the worker's counters ({} if it was killed)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise
        if self.stats_path.exists():
            loaded: dict[str, int] = json.loads(self.stats_path.read_text())
            return loaded
        return {}

    def executions(self) -> list[int]:
        if not self.record.exists():
            return []
        return [int(line) for line in self.record.read_text().split()]
