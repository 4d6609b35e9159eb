"""One vertical-FL job inside the server: the enrolled parties, their channels, the job thread, the outcome.

:class:`VerticalSession` does no networking: :mod:`enclaveml.fl.vertical.server` exposes it over
RA-TLS. The job (a function of the parties' channels, label party first, in plan order) starts in
a thread once every party has connected, and its outcome (result or error) is kept for the
server's operator; parties learn only whether it succeeded. Credentials are random tokens the
operator hands to each party; only their SHA-256 is kept. Stopping the server cancels the job
(:meth:`VerticalSession.cancel`): a wait for parties ends at once and calls in flight fail, so
no job thread outlives its server.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from enclaveml.errors import ConfigurationError, EnclaveMLError
from enclaveml.fl.plan import token_sha256
from enclaveml.fl.vertical._channel import PartyChannel
from enclaveml.fl.vertical._errors import VerticalError
from enclaveml.fl.vertical._remote import PartyGoneError, RemoteChannel
from enclaveml.fl.vertical.plan import VerticalPlan

__all__ = ["Job", "NotEnrolledError", "VerticalSession", "token_sha256"]

_log = logging.getLogger(__name__)
_CANCEL_POLL_S = 0.1  # how soon a job still waiting for its parties notices cancel()

Job = Callable[[Sequence[PartyChannel]], Any]
"""What the server runs: a function of the parties' channels (label party first)."""


class NotEnrolledError(VerticalError):
    """The request carried no credential, or one that belongs to no party of this plan."""

    status = 401


class VerticalSession:
    """The job of one plan over its parties (see the module docstring)."""

    def __init__(
        self,
        plan: VerticalPlan,
        credentials: Mapping[str, bytes],
        job: Job,
        *,
        connect_timeout_s: float = 600.0,
        record: bool = False,
    ) -> None:
        missing = [p for p in plan.parties if p not in credentials]
        if missing or set(credentials) - set(plan.parties):
            raise ConfigurationError("give exactly one credential hash per party of the plan")
        if any(len(h) != 32 for h in credentials.values()):
            raise ConfigurationError("credential hashes are SHA-256 digests (32 bytes)")
        if plan.credentials and {p: bytes(h).hex() for p, h in credentials.items()} != plan.credentials:
            raise ConfigurationError("the party credentials differ from those the plan names")
        self.plan = plan
        self._by_hash = {bytes(h): name for name, h in credentials.items()}
        self.channels = {
            name: RemoteChannel(name, call_timeout_s=plan.call_timeout_s, record=record)
            for name in plan.parties
        }
        self._job = job
        self._connect_timeout_s = connect_timeout_s
        self.state = "waiting"  # then "running", and "succeeded", "failed" or "cancelled"
        self._cancelled: str | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._told: set[str] = set()  # parties that have fetched the outcome
        self._all_told = threading.Event()
        self._thread: threading.Thread | None = None

    def authenticate(self, token: str) -> str:
        """The party a credential belongs to (constant-time over the known hashes)."""
        digest = token_sha256(token)
        found = ""
        for known, name in self._by_hash.items():
            if secrets.compare_digest(known, digest):
                found = name
        if not found:
            raise NotEnrolledError("unknown credential")
        return found

    def start(self) -> None:
        if self._thread is not None:
            raise ConfigurationError("the job has already been started")
        self._thread = threading.Thread(target=self._run, name="enclaveml-vfl-job", daemon=True)
        self._thread.start()

    def cancel(self, reason: str = "the server stopped") -> None:
        """End the job now with state "cancelled": waits for parties return, calls in flight fail.

        Does nothing once the job has finished.
        """
        if self.finished.is_set():
            return
        self._cancelled = reason
        for channel in self.channels.values():
            channel.close(reason)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or ``timeout`` passed (False)."""
        return self.finished.wait(timeout)

    def told(self, party: str) -> None:
        """``party`` has fetched the outcome (the server calls this when it hands it out)."""
        self._told.add(party)
        if self._told >= set(self.plan.parties):
            self._all_told.set()

    def wait_told(self, timeout: float) -> bool:
        """After the job: block until every party has fetched the outcome, or ``timeout`` passed.

        A server that stops as soon as the job ends leaves a party whose last poll comes a moment
        later without its outcome (it then writes no aligned rows and seals no model part).
        """
        return self._all_told.wait(timeout)

    def outcome(self) -> dict[str, Any]:
        """What a party may know: the state, and for a failure the error's type and message.

        Every message of enclaveml's errors is written to carry no data; anything else (a bug)
        crosses as its type name only.
        """
        body: dict[str, Any] = {"state": self.state}
        if self.error is not None:
            message = str(self.error) if isinstance(self.error, EnclaveMLError) else ""
            body["error"] = f"{type(self.error).__name__}: {message}"[:300]
        return body

    def _run(self) -> None:
        try:
            self._await_parties()
            self.state = "running"
            channels = [self.channels[name] for name in self.plan.parties]
            self.result = self._job(channels)
            self.state = "succeeded"
        except BaseException as exc:  # noqa: BLE001 - any failure ends the job and is reported
            self.error = exc
            if self._cancelled is not None:
                self.state = "cancelled"
                _log.info("vertical job cancelled: %s", self._cancelled)
                return
            self.state = "failed"
            # Only our own messages are written to carry no data; anything else is logged by type.
            detail = str(exc) if isinstance(exc, EnclaveMLError) else ""
            _log.error("vertical job failed: %s %s", type(exc).__name__, detail)
        finally:
            # Finished first: a poll that the closing wakes must find the outcome, not a 204.
            self.finished.set()
            for channel in self.channels.values():
                channel.close(f"the job has {self.state}")

    def _await_parties(self) -> None:
        deadline = time.monotonic() + self._connect_timeout_s
        for name, channel in self.channels.items():
            while not channel.connected.wait(min(_CANCEL_POLL_S, max(0.0, deadline - time.monotonic()))):
                if self._cancelled is not None:
                    raise PartyGoneError(f"party {name!r}: {self._cancelled}")
                if time.monotonic() >= deadline:
                    raise PartyGoneError(
                        f"party {name!r} did not connect within {self._connect_timeout_s:g} s"
                    )
