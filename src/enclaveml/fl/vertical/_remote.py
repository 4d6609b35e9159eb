"""The server's end of a party that is a network client: calls wait in an outbox until the party fetches them.

A party connected to the server (:mod:`enclaveml.fl.vertical.party`) long-polls
``GET /v1/vfl/calls`` and answers with ``POST /v1/vfl/calls/{id}``. :class:`RemoteChannel` is the
server-side :class:`~enclaveml.fl.vertical._channel.PartyChannel` behind those routes: ``call()``
encodes the request, leaves it for the party and blocks until the party's answer arrives or
``call_timeout_s`` passes. One call is in flight per party at a time (the protocols never ask
one party two things at once); a second concurrent ``call()`` is a bug and is refused.

Call ids are random, so an answer cannot be posted for a call the party was never given, and
an answer for any other id than the one in flight is refused (409) and changes nothing.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field

from enclaveml.fl.vertical._channel import Exchange, unwrap
from enclaveml.fl.vertical._codec import Payload, encode
from enclaveml.fl.vertical._errors import ProtocolError, VerticalError

__all__ = ["PendingCall", "RemoteChannel"]


class PartyGoneError(VerticalError):
    """A party did not fetch or answer a call in time, or the job ended while it was in flight."""

    status = 504


@dataclass
class PendingCall:
    """A call the server made and the party has not answered yet."""

    id: str
    method: str
    request: bytes
    fetched: bool = False
    receiving: bool = False  # an answer's body is being read (one at a time)
    response: bytes | None = None
    done: threading.Event = field(default_factory=threading.Event)


class RemoteChannel:
    """One party as the server sees it over the network (thread-safe)."""

    def __init__(self, name: str, *, call_timeout_s: float, record: bool = False) -> None:
        self._name = name
        self.call_timeout_s = call_timeout_s
        self.record = record
        self.transcript: list[Exchange] = []
        self._lock = threading.Condition()
        self._pending: PendingCall | None = None
        self._closed: str | None = None
        self.connected = threading.Event()

    @property
    def name(self) -> str:
        return self._name

    # --- the job's side ------------------------------------------------------------------------

    def call(self, method: str, payload: Payload) -> Payload:
        request = encode(payload)
        pending = PendingCall(secrets.token_hex(16), method, request)
        with self._lock:
            if self._closed is not None:
                raise PartyGoneError(f"party {self._name!r}: {self._closed}")
            if self._pending is not None:
                raise ProtocolError(f"party {self._name!r} already has a call in flight")
            self._pending = pending
            self._lock.notify_all()
        try:
            if not pending.done.wait(self.call_timeout_s):
                raise PartyGoneError(
                    f"party {self._name!r} did not answer {method!r} within {self.call_timeout_s:g} s"
                )
        finally:
            with self._lock:
                self._pending = None
        if pending.response is None:
            raise PartyGoneError(f"party {self._name!r}: {self._closed or 'the job ended'}")
        if self.record:
            self.transcript.append(Exchange(method, request, pending.response))
        return unwrap(self._name, method, pending.response)

    def close(self, reason: str) -> None:
        """Fail the call in flight (if any) and every later one with ``reason``."""
        with self._lock:
            self._closed = reason
            if self._pending is not None:
                self._pending.done.set()
            self._lock.notify_all()

    # --- the routes' side ----------------------------------------------------------------------

    def next_call(self, wait_s: float) -> PendingCall | None:
        """The call in flight that the party has not fetched yet, waiting up to ``wait_s`` for one.

        A call fetched once and not answered is handed out again (the party's connection may have
        dropped after the fetch); the party answers it once.
        """
        self.connected.set()
        with self._lock:
            self._lock.wait_for(lambda: self._open_call() is not None or self._closed is not None, wait_s)
            pending = self._open_call()
            if pending is None:
                return None
            pending.fetched = True
            return pending

    def _open_call(self) -> PendingCall | None:
        """The call in flight if it still waits for its answer (caller holds the lock)."""
        pending = self._pending
        return pending if pending is not None and not pending.done.is_set() else None

    def claim_answer(self, call_id: str) -> None:
        """Before reading an answer's body: the call must be in flight and no other answer to it
        be arriving, so a party cannot make the server read model-sized bodies it will refuse.

        :raises ProtocolError: no call with that id is in flight, or an answer to it is arriving.
        """
        with self._lock:
            pending = self._answerable(call_id)
            if pending.receiving:
                raise ProtocolError(f"party {self._name!r} is already sending an answer to this call")
            pending.receiving = True

    def release_answer(self, call_id: str) -> None:
        """The answer claimed with :meth:`claim_answer` did not arrive (the body read failed)."""
        with self._lock:
            pending = self._pending
            if pending is not None and secrets.compare_digest(pending.id, call_id):
                pending.receiving = False

    def answer(self, call_id: str, response: bytes) -> None:
        """Deliver the party's answer to the call in flight.

        :raises ProtocolError: no call with that id is in flight (already answered, or never made).
        """
        with self._lock:
            pending = self._answerable(call_id)
            pending.response = response
            pending.done.set()

    def _answerable(self, call_id: str) -> PendingCall:
        """The call in flight with ``call_id``, fetched and not answered (caller holds the lock)."""
        pending = self._pending
        if (
            pending is None
            or not pending.fetched
            or pending.done.is_set()
            or not secrets.compare_digest(pending.id, call_id)
        ):
            raise ProtocolError(f"party {self._name!r} answered a call that is not in flight")
        return pending

    @property
    def closed(self) -> bool:
        return self._closed is not None
