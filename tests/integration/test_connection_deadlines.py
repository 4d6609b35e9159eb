"""Connection deadlines uvicorn lacks: a request head that never completes, a response never read.

Real uvicorn servers on 127.0.0.1 with :class:`DeadlineHttpProtocol` (short deadlines subclassed
in); plain HTTP and the RA-TLS path that every enclaveml server uses.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse

from enclaveml._web import DeadlineHttpProtocol, LimitAndCount, ServerThread, ServingStats, start_in_thread
from enclaveml.attestation.tls import in_memory_key_files
from enclaveml.kms._tlscert import self_signed_certificate


class QuickDeadlines(DeadlineHttpProtocol):
    head_timeout_s = 0.5
    send_timeout_s = 0.5
    min_send_rate = 4 * 1024 * 1024  # scaled with the deadlines: the steady readers take ~16 MB/s


def _app() -> tuple[FastAPI, ServingStats]:
    from prometheus_client import CollectorRegistry

    app = FastAPI()
    stats = ServingStats(CollectorRegistry())
    chunk = np.zeros(1024 * 1024, dtype=np.uint8).tobytes()

    @app.get("/small")
    def small() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/whole")
    async def whole() -> Response:  # 32 MiB in one send: the response is complete at once
        return Response(chunk * 32, media_type="application/octet-stream")

    @app.get("/whole-48")
    async def whole_48() -> Response:
        return Response(chunk * 48, media_type="application/octet-stream")

    @app.get("/big")
    async def large() -> StreamingResponse:  # 32 MiB, one send per MiB: each waits for the client
        return StreamingResponse(iter([chunk] * 32), media_type="application/octet-stream")

    app.add_middleware(
        LimitAndCount, stats=lambda: stats, routes=lambda: app.router.routes, max_request_bytes=1024,
        too_large=ValueError, max_bytes_in_flight=4096,
    )  # fmt: skip
    return app, stats


@contextlib.contextmanager
def _serve(
    protocol: type[DeadlineHttpProtocol], *, tls: bool = False, keep_alive_s: float = 5
) -> Iterator[tuple[str, int, ServingStats, ServerThread]]:
    app, stats = _app()
    with contextlib.ExitStack() as stack:
        files: dict[str, str] = {}
        if tls:
            made = self_signed_certificate()
            cert, key = stack.enter_context(in_memory_key_files(made.certificate_pem, made.private_key_pem))
            files = {"ssl_certfile": cert, "ssl_keyfile": key}
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, loop="uvloop", http=protocol, log_level="warning",
            timeout_keep_alive=keep_alive_s, **files,
        )  # fmt: skip
        running = start_in_thread(config, name="test-deadlines", startup_timeout=15)
    try:
        host, port = running.url.split("://")[1].split(":")
        yield host, int(port), stats, running
    finally:
        running.stop(15)


def _connect(host: str, port: int, tls: bool) -> socket.socket:
    sock = socket.create_connection((host, port))
    if not tls:
        return sock
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(sock)


def _wait_no_connections(running: ServerThread, seconds: float) -> float:
    started = time.monotonic()
    while running.server.server_state.connections:
        assert time.monotonic() - started < seconds, "the server still holds the connection"
        time.sleep(0.05)
    return time.monotonic() - started


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``sock`` (reading and dropping what it sends)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(65536):
            pass
    return time.monotonic() - started


@pytest.mark.parametrize(
    "first", [b"", b"GET /small HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half a head"]
)
def test_a_request_head_that_never_completes_is_closed(first: bytes) -> None:
    with _serve(QuickDeadlines) as (host, port, _, _), socket.create_connection((host, port)) as idle:
        if first:
            idle.sendall(first)
        assert _closed_within(idle, 10) < 5


def test_the_head_deadline_applies_after_each_response_and_not_to_working_clients() -> None:
    with _serve(QuickDeadlines) as (host, port, _, _), socket.create_connection((host, port)) as sock:
        for _ in range(3):  # a client that keeps sending requests keeps its connection
            sock.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"ok":"yes"}'):
                answer += sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200 OK")
            time.sleep(0.3)
        sock.sendall(b"GET /small HTTP/1.1\r\n")  # then half a head: closed
        assert _closed_within(sock, 10) < 5


def test_without_the_deadline_such_a_connection_stays_open() -> None:
    class NoDeadline(DeadlineHttpProtocol):
        head_timeout_s = 3600.0

    with _serve(NoDeadline) as (host, port, _, _), socket.create_connection((host, port)) as idle:
        idle.settimeout(1.5)
        with pytest.raises(TimeoutError):
            idle.recv(1)


def test_a_response_left_unread_is_aborted_and_the_request_ends() -> None:
    with _serve(QuickDeadlines) as (host, port, stats, _), socket.create_connection((host, port)) as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 10
        while stats.requests("/big") == 0:  # the request ends once the connection is aborted
            assert time.monotonic() < deadline, "the unread response held the request"
            time.sleep(0.05)
        # (What the kernel had already accepted is still delivered to the socket; the server's
        # process holds none of it any more.)
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=10) as http:
            assert http.get("/small").status_code == 200


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_an_answer_written_in_one_piece_and_left_unread_is_dropped(tls: bool, close: bool) -> None:
    # Every enclaveml answer is one piece (inference, FL model, /attestation, key broker); over
    # TLS uvloop passes it to the TCP layer below, and after a Connection: close answer the
    # transport is closing: in neither case may the client hold it by not reading.
    head = b"GET /whole HTTP/1.1\r\nHost: x\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n"
    with _serve(QuickDeadlines, tls=tls) as (host, port, _, running), _connect(host, port, tls) as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.sendall(head)
        assert _wait_no_connections(running, 10) < 5
        with httpx.Client(base_url=f"{'https' if tls else 'http'}://{host}:{port}", verify=False) as http:
            assert http.get("/small").status_code == 200


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_a_reader_taking_a_little_each_period_is_dropped(tls: bool) -> None:
    # Some progress in every period, far below min_send_rate: it would hold the answer for weeks.
    with _serve(QuickDeadlines, tls=tls) as (host, port, _, running), _connect(host, port, tls) as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        reader.sendall(b"GET /whole HTTP/1.1\r\nHost: x\r\n\r\n")
        reader.settimeout(5)
        assert reader.recv(4096)  # the answer is on its way
        started = time.monotonic()
        with contextlib.suppress(OSError):  # reset, or the TLS stream cut
            while running.server.server_state.connections and time.monotonic() - started < 6:
                reader.recv(16384)  # progress in every period, at ~0.8 MB/s
                time.sleep(0.02)
        assert not running.server.server_state.connections
        assert time.monotonic() - started < 5


def test_the_keep_alive_close_waits_while_an_answer_is_going_out() -> None:
    # Over TLS a close starts uvloop's 30 s shutdown timer, which would cut a slow download.
    with (
        _serve(QuickDeadlines, tls=True, keep_alive_s=0.3) as (host, port, _, running),
        httpx.Client(base_url=f"https://{host}:{port}", verify=False) as http,
        http.stream("GET", "/whole") as answer,
    ):
        received, closing_seen = 0, False
        started = time.monotonic()
        for chunk in answer.iter_bytes(64 * 1024):
            received += len(chunk)
            time.sleep(0.004)
            if time.monotonic() - started > 1:  # well past the keep-alive timeout
                closing_seen |= any(c.transport.is_closing() for c in running.server.server_state.connections)
        assert received == 32 * 1024 * 1024
        assert not closing_seen


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest.mark.parametrize("path", ["/big", "/whole"])
def test_a_reader_that_keeps_reading_gets_the_whole_response(path: str, tls: bool) -> None:
    # Reading /whole takes seconds after the server has finished the response: neither the head
    # deadline armed then nor the send deadline may cut it off while the client keeps reading.
    with (
        _serve(QuickDeadlines, tls=tls) as (host, port, _, _),
        httpx.Client(base_url=f"{'https' if tls else 'http'}://{host}:{port}", verify=False) as http,
    ):
        started = time.monotonic()
        with http.stream("GET", path) as answer:
            received = 0
            for chunk in answer.iter_bytes(64 * 1024):
                received += len(chunk)
                time.sleep(0.004)
        assert received == 32 * 1024 * 1024
        assert time.monotonic() - started > 3 * QuickDeadlines.send_timeout_s


def test_ratls_servers_use_the_deadline_protocol_and_stop_at_once_beside_an_idle_client() -> None:
    from enclaveml._web import uvicorn_config
    from enclaveml.attestation import create_ratls_certificate
    from enclaveml.attestation.simulation import SimulationKey, SimulationProvider

    provider = SimulationProvider(key=SimulationKey.generate(), entry_point="test")
    ratls = create_ratls_certificate(provider)
    app, _ = _app()
    with uvicorn_config(app, ratls, host="127.0.0.1", port=0) as config:
        assert config.http is DeadlineHttpProtocol
        running = start_in_thread(config, name="test-ratls-deadline", startup_timeout=15)
    try:
        host, port = running.url.removeprefix("https://").split(":")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection((host, int(port))) as raw, context.wrap_socket(raw) as tls:
            tls.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
            assert tls.recv(4096).startswith(b"HTTP/1.1 200 OK")
            # The client keeps its connection and reads no more (so never answers a TLS
            # close_notify): stopping must not wait for it (uvloop would, for 30 s).
            started = time.monotonic()
            running.stop(15)
            assert time.monotonic() - started < 5
            assert not running.thread.is_alive()
    finally:
        running.stop(15)


def test_a_tls_answer_closed_after_connection_close_is_delivered_to_a_slow_reader() -> None:
    # uvloop starts a 30 s TLS shutdown timer at the close and then drops what its TCP transport
    # still buffers (what the kernel holds is still delivered): an answer read at 0.2 MB/s after
    # a Connection: close request ended silently after ~10 MB. The close now waits until the
    # answer is delivered (under the send deadline).
    class Patient(DeadlineHttpProtocol):
        send_timeout_s = 5
        min_send_rate = 256 * 1024

    rate = 1.25 * 1024 * 1024  # ~37 MiB read when the timer would fire, ~11 still to come
    with _serve(Patient, tls=True) as (host, port, _, running), _connect(host, port, True) as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        reader.sendall(b"GET /whole-48 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reader.settimeout(10)
        received, started = b"", time.monotonic()
        while data := reader.recv(65536):
            received += data
            time.sleep(max(0.0, started + len(received) / rate - time.monotonic()))
        head, _, body = received.partition(b"\r\n\r\n")
        assert b"content-length: 50331648" in head.lower()
        assert len(body) == 48 * 1024 * 1024
        assert time.monotonic() - started > 31  # past uvloop's shutdown timeout
        reader.close()  # the server's close_notify came after the answer: it closed when delivered
        _wait_no_connections(running, 10)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_connections_past_the_per_client_limit_are_refused(tls: bool) -> None:
    # A head finished every 25 s keeps a connection under both deadlines: a few hundred of them
    # from one address filled the broker's file descriptors (review U).
    class ThreePerClient(QuickDeadlines):
        head_timeout_s = 30
        max_connections_per_client = 3

    with _serve(ThreePerClient, tls=tls) as (host, port, _, running):
        held = [_connect(host, port, tls) for _ in range(3)]
        try:
            deadline = time.monotonic() + 10
            while len(running.server.server_state.connections) < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with contextlib.suppress(OSError):  # refused: reset, or closed during the handshake
                extra = _connect(host, port, tls)
                extra.settimeout(5)
                with contextlib.suppress(OSError):
                    extra.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert extra.recv(4096) == b""
                extra.close()
            assert len(running.server.server_state.connections) == 3
            held.pop().close()
            _wait_until_connections(running, 2)
            with httpx.Client(base_url=f"{'https' if tls else 'http'}://{host}:{port}", verify=False) as http:
                assert http.get("/small").status_code == 200  # a slot is free again
        finally:
            for sock in held:
                sock.close()


def _wait_until_connections(running: ServerThread, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(running.server.server_state.connections) != count:
        assert time.monotonic() < deadline, "the server did not see the connection end"
        time.sleep(0.01)


@pytest.mark.parametrize(("value", "expected"), [("5", "5"), ("0", "0"), ("", "256"), ("lots", "error")])
def test_the_per_client_limit_comes_from_the_environment(value: str, expected: str) -> None:
    import os
    import subprocess
    import sys

    code = (
        "from enclaveml.errors import ConfigurationError\n"
        "try:\n"
        "    from enclaveml._web import DeadlineHttpProtocol\n"
        "    print(DeadlineHttpProtocol.max_connections_per_client)\n"
        "except ConfigurationError as exc:\n"
        "    print('error', exc)\n"
    )
    env = {**os.environ, "ENCLAVEML_MAX_CONNECTIONS_PER_CLIENT": value}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split()[0] == expected


def test_websocket_upgrade_requests_are_plain_http_and_give_their_connection_back() -> None:
    # An upgrade handed the connection to uvicorn's WebSocket protocol, which never gave back its
    # place in the per-client count: a few hundred upgrade requests locked the address out.
    class ThreePerClient(QuickDeadlines):
        head_timeout_s = 30
        max_connections_per_client = 3

    upgrade = (
        b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    with _serve(ThreePerClient) as (host, port, _, running):
        for _ in range(6):
            with socket.create_connection((host, port)) as sock:
                sock.sendall(upgrade)
                answer = sock.recv(4096)
                assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:100]  # served as plain HTTP
            _wait_until_connections(running, 0)
        with httpx.Client(base_url=f"http://{host}:{port}") as http:
            assert http.get("/small").status_code == 200
