"""Closed-loop HTTP(S) load for ``benchmarks.serving``: ``python -m benchmarks._serving_load ARGS``.

Each process runs ``--threads`` threads; each thread holds one keep-alive connection
(``http.client``, TCP_NODELAY) and sends the same pre-encoded body again as soon as the previous
answer arrives, so ``threads`` requests are always in flight. Sending stops at ``--stop`` (a
``time.monotonic()`` instant: CLOCK_MONOTONIC is system-wide on Linux, so the orchestrator's
instants mean the same here); requests already sent are waited for, so the server is idle when
the process exits. For HTTPS, the connection trusts exactly the DER certificate in ``--cert``
(the one the orchestrator attested), through :func:`enclaveml.attestation.tls.pinned_ssl_context`.

Output, one JSON object on stdout: ``done`` and ``latency`` (seconds; requests answered 200
inside ``[--start, --stop]``), ``errors`` (non-200 or broken connections, any time), and this
process's CPU seconds. Only the standard library is imported, and the enclaveml TLS helper only
for HTTPS, so the generator stays light on the cores it shares with the server.

The orchestrator's side lives here too (standard library only): :func:`run_load` starts the
load processes and merges what they report, :class:`RoleProcess` runs a server process of
:mod:`benchmarks._serving_roles`, and :func:`proc_cpu_s` / :func:`machine_busy_s` read the CPU
accounting from ``/proc``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["LoadSpec", "RoleProcess", "aligned_rate", "machine_busy_s", "proc_cpu_s", "run_load"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class _Tally:
    done: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    answered: int = 0  # 200s at any time, for CPU per request
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _connector(url: str, cert: bytes | None) -> Callable[[], http.client.HTTPConnection]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    if parts.scheme != "https":
        return lambda: http.client.HTTPConnection(host, port, timeout=120)
    if cert is None:
        raise SystemExit("https needs --cert (the attested certificate to pin)")
    from enclaveml.attestation.tls import pinned_ssl_context

    context = pinned_ssl_context(cert)
    return lambda: http.client.HTTPSConnection(host, port, context=context, timeout=120)


def _client(
    args: argparse.Namespace, body: bytes, connect: Callable[[], http.client.HTTPConnection], tally: _Tally
) -> None:
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(args.header_length),
    }
    path = urlsplit(args.url).path
    conn = connect()
    try:
        while time.monotonic() < args.stop:
            sent = time.monotonic()
            try:
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()  # the next request reconnects
                ok = False
            answered = time.monotonic()
            with tally.lock:
                if not ok:
                    tally.errors += 1
                else:
                    tally.answered += 1
                    if args.start <= answered <= args.stop:
                        tally.done.append(answered)
                        tally.latency.append(answered - sent)
            if not ok:
                time.sleep(0.05)  # back off: a refused request must not become a busy loop
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="closed-loop load for benchmarks.serving")
    parser.add_argument("--url", required=True, help="the infer URL, http(s)://host:port/v2/models/M/infer")
    parser.add_argument("--body", required=True, type=Path, help="the pre-encoded request body")
    parser.add_argument("--header-length", required=True, type=int, help="its JSON header's length")
    parser.add_argument("--cert", type=Path, help="DER certificate to pin (https)")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--start", type=float, required=True, help="monotonic instant: measuring starts")
    parser.add_argument("--stop", type=float, required=True, help="monotonic instant: sending stops")
    args = parser.parse_args()
    body = args.body.read_bytes()
    connect = _connector(args.url, args.cert.read_bytes() if args.cert else None)
    tally = _Tally()
    threads = [
        threading.Thread(target=_client, args=(args, body, connect, tally), daemon=True)
        for _ in range(args.threads)
    ]
    before = os.times()  # imports and set-up excluded from the CPU count
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = os.times()
    json.dump(
        {
            "done": tally.done,
            "latency": tally.latency,
            "answered": tally.answered,
            "errors": tally.errors,
            "cpu_s": after.user + after.system - before.user - before.system,
            "cpu_total_s": after.user + after.system,
        },
        sys.stdout,
    )


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RoleProcess:
    """One process of :mod:`benchmarks._serving_roles`; ``ready()`` returns what it printed."""

    def __init__(self, role: str, args: list[str], env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "benchmarks._serving_roles", role, *args]
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )

    def ready(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"server process {self.proc.pid} failed to start (exit {self.proc.wait()})")
        return line[1] if len(line) > 1 else ""

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait, and return the ``stats`` line it printed ({} if it had none)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        stats = [line[6:] for line in out.splitlines() if line.startswith("stats ")]
        return dict(json.loads(stats[-1])) if stats else {}


def aligned_rate(done: list[float], batch: int, window: tuple[float, float]) -> float:
    """Completions per second over whole batch periods.

    Completions come in bursts of one batch, so a plain count over a window is off by up to a
    batch. ``batch*m / (done[k+batch*m] - done[k])`` spans exactly ``m`` batch periods; the
    median over ``k < batch`` (``done`` sorted, inside the window) is taken.
    """
    m = (len(done) - batch) // batch
    if m < 1:
        return len(done) / (window[1] - window[0])
    return batch * m / statistics.median(done[k + batch * m] - done[k] for k in range(batch))


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (every process, ours and other users')."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class LoadSpec:
    """What every load process of one measurement gets."""

    url: str
    body: Path
    header_length: int
    cert: Path | None = None


def run_load(
    spec: LoadSpec, *, processes: int, threads: int, warmup_s: float, seconds: float
) -> dict[str, Any]:
    """Run ``processes`` x ``threads`` clients; measure ``seconds`` after ``warmup_s``; merge results.

    Returns ``done``/``latency`` (sorted by ``done``), ``answered`` (all 200s, window or not),
    ``errors``, ``cpu_s`` (all load processes, start-up excluded; ``cpu_total_s`` with it)
    and the window ``[start, stop]``. Returns only after every process has drained and exited.
    """
    lead = 0.3  # process start-up, so that warm-up time is not spent importing
    start = time.monotonic() + lead + warmup_s
    stop = start + seconds
    command = [
        sys.executable, "-m", "benchmarks._serving_load", "--url", spec.url, "--body", str(spec.body),
        "--header-length", str(spec.header_length), "--threads", str(threads),
        "--start", repr(start), "--stop", repr(stop),
    ]  # fmt: skip
    if spec.cert is not None:
        command += ["--cert", str(spec.cert)]
    children = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        for _ in range(processes)
    ]
    pairs: list[tuple[float, float]] = []
    answered, errors, cpu, cpu_total = 0, 0, 0.0, 0.0
    for child in children:
        out, _ = child.communicate(timeout=stop - time.monotonic() + 180)
        if child.returncode != 0:
            raise RuntimeError(f"load process {child.pid} failed with exit status {child.returncode}")
        result = json.loads(out)
        pairs += zip(result["done"], result["latency"], strict=True)
        answered += result["answered"]
        errors += result["errors"]
        cpu += result["cpu_s"]
        cpu_total += result["cpu_total_s"]
    pairs.sort()
    return {
        "done": [d for d, _ in pairs],
        "latency": [lat for _, lat in pairs],
        "answered": answered,
        "errors": errors,
        "cpu_s": cpu,
        "cpu_total_s": cpu_total,
        "window": (start, stop),
    }


if __name__ == "__main__":
    main()
