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
- ``send_timeout_s`` (nginx's ``send_timeout``): while the transport holds more of a response
  than it may (the client reads slower than the server writes), the client must take some of it
  within each ``send_timeout_s``; else the connection is aborted, the response's pending send
  returns, and the request ends normally. A slow reader that keeps reading is never cut off.

At shutdown an idle connection is aborted rather than closed: over TLS a close waits for the
client's close_notify (uvloop: up to 30 s), and uvicorn's shutdown waits for every connection.

Both are timers armed and cancelled with the events (the send deadline looks at the transport's
write buffer when it fires), not work per byte.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["DeadlineHttpProtocol"]


class DeadlineHttpProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=DeadlineHttpProtocol)``: httptools parsing with head and send deadlines."""

    head_timeout_s: ClassVar[float] = 30.0
    send_timeout_s: ClassVar[float] = 60.0

    _head_timer: asyncio.TimerHandle | None = None
    _send_timer: asyncio.TimerHandle | None = None
    _unsent = 0  # the transport's write buffer when the send deadline was last armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_headers_complete(self) -> None:
        self._cancel_head_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        idle = not self.pipeline  # a pipelined request waiting already has its head
        super().on_response_complete()
        if idle and not self.transport.is_closing():
            self._arm_head_deadline()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._arm_send_deadline()

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.transport.get_write_buffer_size():
            # Idle, everything sent: abort, not close. Over TLS, close waits (uvloop: up to 30 s)
            # for a close_notify that an idle keep-alive client may never send, and uvicorn's
            # shutdown waits for every connection to end.
            self.transport.abort()
        else:
            super().shutdown()

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size():
            # The previous answer is still going out to a slow reader: the send deadline governs.
            self._arm_head_deadline()
            return
        self.transport.abort()  # as in shutdown: no TLS close_notify exchange with this client

    def _arm_send_deadline(self) -> None:
        self._unsent = self.transport.get_write_buffer_size()
        self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_late)

    def _send_late(self) -> None:
        self._send_timer = None
        if self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() < self._unsent:
            self._arm_send_deadline()  # the client took some: it is reading, if slowly
            return
        # abort, not close: close would wait to flush what the client is not reading.
        self.transport.abort()
