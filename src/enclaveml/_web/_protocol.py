"""uvicorn's HTTP protocol with the two connection deadlines it lacks.

uvicorn closes a keep-alive connection that stays idle after a response, but nothing bounds a
connection that never completes a request head (it sends nothing, or a header line now and then)
or one whose client stops reading the response. Either holds a file descriptor, buffers and, for
a response, the request's share of the body budget for ever, so a few hundred such connections
from anyone who can reach the port exhaust the server. :class:`DeadlineHttpProtocol` adds, as
nginx does:

- ``head_timeout_s`` (nginx's ``client_header_timeout``): a request head must be complete within
  this time of the connection opening or of the previous response having been sent; else the
  connection is closed. The request body has its own idle deadline (:class:`~enclaveml._web.LimitAndCount`).
- ``send_timeout_s`` (nginx's ``send_timeout``): while an answer is still on its way to the
  client (whether the app streamed it or wrote it in one piece, over TCP or TLS), the client must
  take some of it within each ``send_timeout_s``, as the kernel's count of acknowledged bytes
  shows; else the connection is aborted (buffers dropped; a pending send of the app returns and
  the request ends normally); and since the answer began going out it must average
  ``min_send_rate`` (1 KiB/s), or a client reading a few bytes per period would hold it for
  weeks. A reader that keeps taking data (acknowledged at least once per ``send_timeout_s``: a
  very large receive buffer read very slowly may acknowledge less often, as with nginx) is not
  cut off by these deadlines, and uvicorn's keep-alive close waits until its answer is delivered.
- Over TLS, a close while an answer is still going out (after a ``Connection: close`` or HTTP/1.0
  request, or an app error mid-answer) waits until the client has taken the answer: uvloop
  starts its 30 s TLS shutdown timer at the close and then drops what its transport still
  buffers, which cut a slow download short (the client saw a clean end after a third of a
  32 MiB answer). Plain TCP needs no such wait: the kernel delivers after the close. At server
  shutdown the wait is bounded by the graceful-shutdown timeout (30 s) all the same.

Both deadlines bound what one connection holds, not how many a client opens: one that finishes a
head every 25 s keeps its connection, and a few hundred of them fill a server's file descriptors.
``max_connections_per_client`` (256 by default, ``ENCLAVEML_MAX_CONNECTIONS_PER_CLIENT``; 0 for no
limit) caps the connections open at once from one IP address: a connection past it is aborted at
once (nginx's ``limit_conn``). Behind a reverse proxy every client is the proxy's address: raise it
there, or set 0 and limit at the proxy. Over TLS a connection is counted once its handshake is
complete (uvloop calls ``connection_made`` then); until then only uvloop's 60 s handshake timeout
bounds it, which uvicorn gives no way to shorten.

At shutdown an idle connection is aborted rather than closed: over TLS a close waits for the
client's close_notify (uvloop: up to 30 s), and uvicorn's shutdown waits for every connection.

Both are one timer per connection at a time, armed with the events (the send deadline reads
``TCP_INFO`` and ``SIOCOUTQ`` when it is armed and when it fires), not work per byte.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import socket
import struct
import termios
import weakref
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from enclaveml.errors import ConfigurationError

__all__ = ["DeadlineHttpProtocol"]


def _limit_from_env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise ConfigurationError(f"{name} must be a whole number (0: no limit), not {value!r}")
    return int(value)


class DeadlineHttpProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=DeadlineHttpProtocol)``: httptools parsing with head and send deadlines."""

    head_timeout_s: ClassVar[float] = 30.0
    send_timeout_s: ClassVar[float] = 60.0
    min_send_rate: ClassVar[float] = 1024.0  # bytes/s an answer's reader must average
    close_poll_s: ClassVar[float] = 0.25  # how often a deferred TLS close looks at the delivery
    max_connections_per_client: ClassVar[int] = _limit_from_env("ENCLAVEML_MAX_CONNECTIONS_PER_CLIENT", 256)

    _head_timer: asyncio.TimerHandle | None = None
    _send_timer: asyncio.TimerHandle | None = None
    _acked = 0  # what _delivery() counted as taken when the send deadline was last armed
    _stretch: tuple[float, int] | None = None  # (loop time, taken) when this stretch of sending began
    _lost = False
    _client: str | None = None  # the address counted against max_connections_per_client

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # No enclaveml server serves WebSockets. An upgrade would hand the connection to another
        # protocol, beyond these deadlines and the per-client count (which it never gave back:
        # 256 upgrade requests locked an address out for good); a request asking for one is
        # answered as plain HTTP instead.
        self.ws_protocol_class = None

    def _unsupported_upgrade_warning(self) -> None:
        pass  # uvicorn logs two warnings per such request: anyone could fill the log with them

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if transport.get_extra_info("sslcontext") is not None:
            transport = cast(asyncio.Transport, _CloseWhenDelivered(transport, self))
        super().connection_made(transport)
        if not self._admit():
            self.transport.abort()
            return
        self._arm_head_deadline()

    def on_headers_complete(self) -> None:
        self._cancel_head_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        idle = not self.pipeline  # a pipelined request waiting already has its head
        super().on_response_complete()
        self._watch_sending()  # an answer written in one piece may still be going out
        if idle and not self.transport.is_closing():
            self._arm_head_deadline()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_sending()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._client is not None:
            counts = _CLIENTS[self.server_state]
            counts[self._client] -= 1
            if not counts[self._client]:
                del counts[self._client]
            self._client = None
        self._cancel_head_deadline()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    def timeout_keep_alive_handler(self) -> None:
        if self._delivery()[1]:
            # The last answer is still going out (a slow reader): closing now would, over TLS,
            # start uvloop's 30 s shutdown timer and cut it off. The send deadline governs.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
            return
        super().timeout_keep_alive_handler()

    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self._delivery()[1]:
            # Idle, everything delivered: abort, not close. Over TLS, close waits (uvloop: up to
            # 30 s) for a close_notify that an idle keep-alive client may never send, and
            # uvicorn's shutdown waits for every connection to end.
            self.transport.abort()
        else:
            super().shutdown()  # an answer still going out is finished (under the send deadline)

    # -- connections per client ----------------------------------------------------------------

    def _admit(self) -> bool:
        """Count this connection against its client's address; False past the limit."""
        limit = self.max_connections_per_client
        peer = self.transport.get_extra_info("peername")
        if limit <= 0 or not isinstance(peer, tuple) or not peer:
            return True  # no limit, or a Unix socket
        client = str(peer[0])
        counts = _CLIENTS.setdefault(self.server_state, collections.Counter())
        if counts[client] >= limit:
            now = self.loop.time()
            if now - _WARNED.get(client, -60.0) >= 60:  # at most one line a minute per client
                if len(_WARNED) > 10_000:
                    _WARNED.clear()
                _WARNED[client] = now
                _log.warning("refusing connections from %s: it has %d open (the limit)", client, limit)
            return False
        counts[client] += 1
        self._client = client
        return True

    # -- the head deadline ---------------------------------------------------------------------

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._delivery()[1]:
            # The previous answer is still going out to a slow reader: the send deadline governs.
            self._arm_head_deadline()
            return
        self.transport.abort()  # as in shutdown: no TLS close_notify exchange with this client

    # -- a TLS close waits for the answer ------------------------------------------------------

    def _close_when_delivered(self, transport: asyncio.Transport) -> None:
        """Close ``transport`` (the TLS transport below the wrapper) once nothing is pending."""
        if self._lost or transport.is_closing():
            return
        if self._delivery()[1]:
            self._watch_sending()  # a reader that stops is aborted by the send deadline
            self.loop.call_later(self.close_poll_s, self._close_when_delivered, transport)
            return
        transport.resume_reading()  # so that uvloop reads the client's close_notify
        transport.close()

    # -- the send deadline ---------------------------------------------------------------------

    def _delivery(self) -> tuple[int, int]:
        """(bytes the client has taken, bytes still on their way to it), to watch progress.

        Over TCP, from the kernel: the bytes the peer acknowledged (``TCP_INFO``'s
        ``tcpi_bytes_acked``, Linux 4.1+) and those in the socket's send queue (``SIOCOUTQ``),
        plus what the transport still buffers. The kernel is the only place that sees an answer
        of any size: uvloop's TLS layer hands an answer written in one piece to the TCP transport
        below it, whose buffer the TLS transport does not report, and while that buffer is
        non-empty the send queue is too. Elsewhere (Unix sockets), from the transport's buffer.
        """
        buffered = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
            acked = int(struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)[0])
            queued = int(struct.unpack("=i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)))[0])
        except (AttributeError, OSError, ValueError, struct.error):
            return -buffered, buffered
        return acked, queued + buffered

    def _watch_sending(self) -> None:
        """Arm the send deadline unless it is armed already (one timer per connection)."""
        if self._send_timer is None and not self._lost:
            self._acked = self._delivery()[0]
            if self._stretch is None:
                self._stretch = (self.loop.time(), self._acked)
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_late)

    def _send_late(self) -> None:
        self._send_timer = None
        if self._lost:
            return
        acked, pending = self._delivery()
        if not pending or self._stretch is None:
            self._stretch = None
            return  # all delivered: nothing to watch until the next answer
        began, acked_then = self._stretch
        steady = acked - acked_then >= self.min_send_rate * (self.loop.time() - began)
        if acked > self._acked and steady:
            self._watch_sending()  # the client took some: it is reading, if slowly
            return
        # A client taking a few bytes per period (a small receive buffer read now and then)
        # would hold the answer for weeks: it must also average min_send_rate since the answer
        # began going out.
        # abort, not close: close would wait to flush what the client is not reading (also for
        # a connection already closing, after a Connection: close answer or a rejection).
        self.transport.abort()


_TCP_INFO_SIZE = 256
_TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info


_CLIENTS: weakref.WeakKeyDictionary[ServerState, collections.Counter[str]] = weakref.WeakKeyDictionary()
_WARNED: dict[str, float] = {}  # event-loop time of the last warning per refused client
_log = logging.getLogger(__name__)


class _CloseWhenDelivered:
    """The TLS transport as uvicorn sees it: ``close()`` waits until the answer is delivered.

    uvicorn closes through the transport it was given (the protocol's and every request
    cycle's), so this is the one place to catch every close. Until the real close, the
    connection reads nothing more (a pipelined request after a ``Connection: close`` one is not
    started) and reports itself closing, as a closed transport would.
    """

    __slots__ = ("_closing", "_protocol", "_transport")

    def __init__(self, transport: asyncio.Transport, protocol: DeadlineHttpProtocol) -> None:
        self._transport = transport
        # Weak: the protocol holds this wrapper, and a cycle would keep every closed connection
        # (SSL objects and buffers included) until the cycle collector ran.
        self._protocol = weakref.ref(protocol)
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        protocol = self._protocol()
        if protocol is None:  # the connection is gone: nothing left to deliver
            self._transport.close()
            return
        self._transport.pause_reading()
        protocol._close_when_delivered(self._transport)
