"""How the server talks to the parties: it calls, each party answers.

Every vertical-FL protocol here (PSI, boosting, logistic regression) is driven by the server in
the TEE: it calls a *method* on a party with a :data:`~enclaveml.fl.vertical._codec.Payload` and gets a
payload back. Parties never talk to each other. Two implementations of the server's view of a
party, :class:`PartyChannel`, run the same protocol code:

- :class:`InProcessChannel`: the party's :class:`PartyEndpoint` lives in this process. Every
  message is still encoded to bytes and decoded again, so nothing is shared by reference and
  tests can read exactly what crossed (:attr:`InProcessChannel.transcript`).
- the network channel of :mod:`enclaveml.fl.vertical.server`: the party is a client of the attested
  server (it verified the server's RA-TLS evidence first) and fetches the server's calls.

A party's handler that raises becomes :class:`PartyFailedError` naming only the exception type:
exception text can hold the party's data and must not cross to the server.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from enclaveml.fl.vertical._codec import Payload, decode, encode
from enclaveml.fl.vertical._errors import MessageError, PartyFailedError

__all__ = [
    "Exchange",
    "InProcessChannel",
    "PartyChannel",
    "PartyEndpoint",
    "call_all",
    "require",
]

_log = logging.getLogger(__name__)

Handler = Callable[[Payload], Payload]


class PartyEndpoint:
    """A party's side: named handlers the server may call. Subclasses register theirs.

    ``handlers`` maps a method name to a function of the decoded payload that returns the
    answer payload. Unknown methods are refused with :class:`MessageError`.
    """

    name: str

    def __init__(self, name: str, handlers: Mapping[str, Handler] | None = None) -> None:
        self.name = name
        self._handlers: dict[str, Handler] = dict(handlers or {})

    def register(self, method: str, handler: Handler) -> None:
        """Answer ``method`` with ``handler`` (replacing any earlier one)."""
        self._handlers[method] = handler

    @property
    def methods(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def handle(self, method: str, payload: Payload) -> Payload:
        """Run the handler for ``method``; the transports call this."""
        handler = self._handlers.get(method)
        if handler is None:
            raise MessageError(f"party {self.name!r} has no method {method!r}")
        return handler(payload)


def answer(endpoint: PartyEndpoint, method: str, request: bytes) -> bytes:
    """Decode ``request``, run ``endpoint``'s handler and encode the answer or the failure.

    A failure is encoded as ``{"error": type name}`` so that no exception text crosses over; the
    party's own log gets the full exception.
    """
    try:
        result = endpoint.handle(method, decode(request))
    except Exception as exc:  # noqa: BLE001 - every failure must become an answer, never text
        _log.warning("party %s: %s failed: %s", endpoint.name, method, type(exc).__name__, exc_info=True)
        return encode({"error": type(exc).__name__})
    return encode({"ok": result})


_ERROR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,79}")


def unwrap(party: str, method: str, response: bytes) -> Payload:
    """The server's side of :func:`answer`: the payload, or :class:`PartyFailedError`."""
    message = decode(response)
    if "error" in message:
        error = message["error"]
        # A type name (answer() sends nothing else); anything else a party writes is not repeated
        # into the server's log and every party's outcome (no forged lines, no smuggled data).
        text = (
            error if isinstance(error, str) and _ERROR_NAME.fullmatch(error) else "(not an error type name)"
        )
        raise PartyFailedError(f"party {party!r} failed {method!r}: {text}")
    result = message.get("ok")
    if not isinstance(result, dict):
        raise MessageError(f"party {party!r} sent a malformed answer to {method!r}")
    return result


@runtime_checkable
class PartyChannel(Protocol):
    """The server's view of one party."""

    @property
    def name(self) -> str: ...

    def call(self, method: str, payload: Payload) -> Payload:
        """Ask the party to run ``method``; block until it answers.

        :raises PartyFailedError: the party's handler raised.
        :raises VerticalError: the party is gone or sent something undecodable.
        """
        ...


@dataclass(frozen=True)
class Exchange:
    """One call as it crossed: the method, the request bytes and the answer bytes."""

    method: str
    request: bytes
    response: bytes


@dataclass
class InProcessChannel:
    """A channel to an endpoint in this process, through the same bytes as the network."""

    endpoint: PartyEndpoint
    transcript: list[Exchange] = field(default_factory=list)
    record: bool = True

    @property
    def name(self) -> str:
        return self.endpoint.name

    def call(self, method: str, payload: Payload) -> Payload:
        request = encode(payload)
        response = answer(self.endpoint, method, request)
        if self.record:
            self.transcript.append(Exchange(method, request, response))
        return unwrap(self.name, method, response)


def call_all(
    channels: Sequence[PartyChannel],
    method: str,
    payloads: Payload | Sequence[Payload],
    *,
    parallel: bool = True,
) -> list[Payload]:
    """Call ``method`` on every channel (concurrently), answers in the channels' order.

    ``payloads`` is one payload for all or one per channel. The first failure is raised after
    every call has finished, so no party is left mid-call.
    """
    per = [payloads] * len(channels) if isinstance(payloads, dict) else list(payloads)
    if len(per) != len(channels):
        raise ValueError("one payload per channel, or one for all")
    if not parallel or len(channels) < 2:
        return [ch.call(method, p) for ch, p in zip(channels, per, strict=True)]
    with ThreadPoolExecutor(max_workers=len(channels), thread_name_prefix="vfl-call") as pool:
        futures = [pool.submit(ch.call, method, p) for ch, p in zip(channels, per, strict=True)]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]


def require(payload: Payload, key: str, kind: type | tuple[type, ...]) -> object:
    """``payload[key]`` if it is of ``kind``; :class:`MessageError` naming the key otherwise."""
    value = payload.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise MessageError(f"field {key!r} missing or of the wrong type")
    return value
