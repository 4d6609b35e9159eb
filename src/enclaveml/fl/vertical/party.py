"""A party's connection to the vertical-FL server: verify its code *and* job plan, then answer its calls.

:class:`ServerConnection` connects in four steps, and nothing of the party's (not even its
credential) leaves the process before the third:

1. fetch the server's RA-TLS certificate, verify it against ``policy`` and pin it
   (:class:`~enclaveml.attestation.tls.AttestedSession`);
2. check that the certificate's evidence binds the *expected* plan
   (:func:`~enclaveml.fl.plan.certificate_nonce`): a server set to run another job (another task,
   another label party, other hyperparameters) is refused before any request is made;
3. ``GET /attestation?nonce=`` over the pinned channel: fresh evidence bound to the same key, a
   random nonce and the plan (:func:`~enclaveml.fl.plan.fresh_nonce`), verified again;
4. from then on, with the credential: fetch the server's calls one by one, answer each with the
   party's :class:`~enclaveml.fl.vertical._channel.PartyEndpoint`, until the server says the job is over.

The endpoint decides what the party reveals: it answers only the methods it registered, and a
handler that fails crosses as its exception's type name only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2
import httpx

from enclaveml.attestation import Claims, Policy, Verifier
from enclaveml.attestation._time import Instant
from enclaveml.attestation.tls import AttestedSession, retry_delay
from enclaveml.errors import AttestationError, ConfigurationError, PolicyRejectedError
from enclaveml.fl.plan import certificate_nonce, fresh_nonce
from enclaveml.fl.vertical._channel import Exchange, PartyEndpoint, answer
from enclaveml.fl.vertical._errors import MessageError, VerticalError
from enclaveml.fl.vertical._session import token_sha256
from enclaveml.fl.vertical.plan import VerticalPlan

__all__ = ["JobOutcome", "ServerConnection"]

_log = logging.getLogger(__name__)
_NONCE_SIZE = 32
_POLL_S = 20.0


@dataclass
class JobOutcome:
    """How the job ended, as the server reported it, and how many calls this party answered."""

    state: str
    error: str | None = None
    calls: int = 0
    transcript: list[Exchange] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"


class ServerConnection:
    """A party's verified HTTPS channel to the vertical-FL server (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        credential: str,
        policy: Policy,
        verifier: Verifier,
        expected_plan: VerticalPlan | Mapping[str, Any],
        timeout: float = 60.0,
        wait_for_server_s: float = 0.0,
        now: Instant = None,
    ) -> None:
        self.url = url
        self.plan = (
            expected_plan
            if isinstance(expected_plan, VerticalPlan)
            else VerticalPlan.from_dict(expected_plan)
        )
        if self.plan.credentials and token_sha256(credential).hex() not in self.plan.credentials.values():
            raise ConfigurationError("this credential is not one the plan names for its parties")
        self._auth = {"Authorization": f"Bearer {credential}"}
        self._timeout = timeout
        deadline = time.monotonic() + wait_for_server_s
        while True:
            try:
                self._http, self.claims = self._connect(policy, verifier, now)
                return
            except AttestationError as exc:
                pause = retry_delay(exc)  # None: a failed check, final
                if pause is None or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)

    def _connect(self, policy: Policy, verifier: Verifier, now: Instant) -> tuple[httpx.Client, Claims]:
        attested = AttestedSession(self.url, policy, verifier, now, self._timeout)
        expected = certificate_nonce(self.plan.digest)
        if attested.server.peer.nonce != expected:
            raise PolicyRejectedError(
                "job-plan",
                f"a certificate binding {(attested.server.peer.nonce or b'').hex() or 'no plan'}",
                f"the plan {self.plan.digest.hex()} (certificate nonce {expected.hex()})",
                detail="the server runs another job plan; nothing was sent",
            )
        http = attested.server.client(timeout=self._timeout)
        try:
            nonce = os.urandom(_NONCE_SIZE)
            response = http.get("/attestation", params={"nonce": nonce.hex()})
            claims = attested.check_fresh(fresh_nonce(self.plan.digest, nonce), response)
        except BaseException:
            http.close()
            raise
        return http, claims

    def serve(self, endpoint: PartyEndpoint, *, record: bool = False) -> JobOutcome:
        """Answer the server's calls with ``endpoint`` until the job is over; the outcome.

        ``record`` keeps every exchange (request and answer bytes) in the outcome, for tests that
        prove what crossed. Raises :class:`VerticalError` if the server goes away mid-job.
        """
        outcome = JobOutcome(state="running")
        while True:
            try:
                response = self._http.get(
                    "/v1/vfl/calls",
                    params={"wait_s": _POLL_S},
                    headers=self._auth,
                    timeout=self._timeout + _POLL_S,
                )
            except httpx.TransportError as exc:
                raise VerticalError(f"the server {self.url} went away: {type(exc).__name__}") from None
            if response.status_code == 204:
                continue
            call = _call(response)
            if "done" in call:
                done = call["done"]
                outcome.state = str(done.get("state", "unknown"))
                outcome.error = str(done["error"]) if done.get("error") else None
                return outcome
            method, request, call_id = call["method"], call["request"], call["id"]
            reply = answer(endpoint, method, request)
            outcome.calls += 1
            if record:
                outcome.transcript.append(Exchange(method, request, reply))
            try:
                posted = self._http.post(
                    f"/v1/vfl/calls/{call_id}",
                    content=reply,
                    headers={**self._auth, "Content-Type": "application/cbor"},
                )
            except httpx.TransportError as exc:
                raise VerticalError(f"the server {self.url} went away: {type(exc).__name__}") from None
            if posted.status_code != 204:
                raise VerticalError(f"the server refused the answer to {method!r} ({posted.status_code})")

    def status(self) -> dict[str, Any]:
        response = self._http.get("/v1/vfl/status", headers=self._auth)
        _raise_for(response)
        body: dict[str, Any] = response.json()
        return body

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServerConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 300:
        return
    try:
        message = str(response.json().get("error", ""))
    except ValueError:
        message = ""
    raise VerticalError(f"the server answered {response.status_code}: {message[:200]}")


def _call(response: httpx.Response) -> dict[str, Any]:
    _raise_for(response)
    try:
        call = cbor2.loads(response.content)
    except Exception:  # noqa: BLE001 - cbor2 raises several unrelated types on garbage
        raise MessageError("the server sent a call that is not CBOR") from None
    if isinstance(call, dict) and isinstance(call.get("done"), dict):
        return call
    if not (
        isinstance(call, dict)
        and isinstance(call.get("id"), str)
        and isinstance(call.get("method"), str)
        and isinstance(call.get("request"), bytes)
    ):
        raise MessageError("the server sent a malformed call")
    return call
