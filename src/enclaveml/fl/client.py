"""The participant's client: verify the aggregator's code *and* training plan, then take part.

:class:`AggregatorClient` connects in four steps, and nothing of the participant's (not even
its credential) leaves the process before the third:

1. fetch the aggregator's RA-TLS certificate and verify it against ``policy`` (evidence valid,
   TLS key bound, claims accepted — the measurement covers the code, and with the simulation TEE
   the plan too), then pin that certificate;
2. check that the certificate's evidence binds the *expected* plan
   (:func:`~enclaveml.fl.plan.certificate_nonce`): an aggregator running other rules is refused
   here, before any HTTP request is made;
3. ``GET /attestation?nonce=`` over the pinned channel: fresh evidence bound to the same key,
   to a random nonce and to the plan (:func:`~enclaveml.fl.plan.fresh_nonce`), verified again;
4. ``GET /v1/fl/enrolment`` with the credential.

If the aggregator goes away (a crash, a restart from its checkpoint), calls reconnect and
repeat all four steps against the new certificate, for up to ``reconnect_s`` seconds; a new
aggregator that fails any check is refused, never used. ``wait_for_aggregator_s`` does the same
for the first connection (participants started before the aggregator). The attestation steps are
:class:`enclaveml.attestation.tls.AttestedSession`, shared with the inference client.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import httpx

from enclaveml.attestation import Claims, Policy, Verifier
from enclaveml.attestation._time import Instant
from enclaveml.attestation.tls import AttestedSession, retry_delay
from enclaveml.errors import AttestationError, ConfigurationError, PolicyRejectedError
from enclaveml.fl._errors import (
    DuplicateUpdateError,
    FederatedError,
    InvalidUpdateError,
    NotEnrolledError,
    RoundMismatchError,
    TrainingFinishedError,
    UploadInProgressError,
)
from enclaveml.fl._participant import (
    AggregatorConnection,
    InProcessConnection,
    Trainer,
    TrainResult,
    participate,
)
from enclaveml.fl._torch import state_dict_to_weights, weights_to_state_dict
from enclaveml.fl._wire import UPDATE_CONTENT_TYPE, ModelMessage, decode_model, encode_update
from enclaveml.fl.aggregator import token_sha256
from enclaveml.fl.plan import TrainingPlan, certificate_nonce, fresh_nonce
from enclaveml.fl.strategy import Weights

__all__ = [
    "AggregatorClient",
    "AggregatorConnection",
    "InProcessConnection",
    "TrainResult",
    "Trainer",
    "participate",
    "state_dict_to_weights",
    "weights_to_state_dict",
]

_log = logging.getLogger(__name__)
_NONCE_SIZE = 32
_T = TypeVar("_T")
_ERRORS: dict[int, type[FederatedError]] = {
    400: InvalidUpdateError,
    401: NotEnrolledError,
    410: TrainingFinishedError,
    413: InvalidUpdateError,
    503: UploadInProgressError,
}


class AggregatorClient:
    """A participant's verified HTTPS channel to the aggregator (an :class:`AggregatorConnection`)."""

    def __init__(
        self,
        url: str,
        *,
        credential: str,
        policy: Policy,
        verifier: Verifier,
        expected_plan: TrainingPlan | Mapping[str, Any],
        timeout: float = 60.0,
        reconnect_s: float = 120.0,
        wait_for_aggregator_s: float = 0.0,
        now: Instant = None,
    ) -> None:
        self.url = url
        if not isinstance(expected_plan, TrainingPlan):
            expected_plan = TrainingPlan.from_dict(expected_plan)
        self.plan = expected_plan
        if (
            expected_plan.participants
            and token_sha256(credential).hex() not in expected_plan.participants.values()
        ):
            raise ConfigurationError("this credential is not one of the participants the plan names")
        self._auth = {"Authorization": f"Bearer {credential}"}
        self._policy, self._verifier, self._now = policy, verifier, now
        self._timeout, self._reconnect_s = timeout, reconnect_s
        self._http: httpx.Client | None = None
        self.client_id = ""
        self.claims: Claims | None = None
        self._connect_until(time.monotonic() + wait_for_aggregator_s)

    def _connect(self) -> None:
        """Steps 1-4 of the module docstring; on any failure nothing is left open."""
        attested = AttestedSession(self.url, self._policy, self._verifier, self._now, self._timeout)
        expected = certificate_nonce(self.plan.digest)
        if attested.server.peer.nonce != expected:
            raise PolicyRejectedError(
                "training-plan",
                f"a certificate binding {(attested.server.peer.nonce or b'').hex() or 'no plan'}",
                f"the plan {self.plan.digest.hex()} (certificate nonce {expected.hex()})",
                detail="the aggregator runs another training plan; nothing was sent",
            )
        http = attested.server.client(timeout=self._timeout)
        try:
            nonce = os.urandom(_NONCE_SIZE)
            response = http.get("/attestation", params={"nonce": nonce.hex()})
            self.claims = attested.check_fresh(fresh_nonce(self.plan.digest, nonce), response)
            # The credential goes out only now, once code, plan and freshness checked out.
            self.client_id = str(_json(http.get("/v1/fl/enrolment", headers=self._auth))["client_id"])
        except BaseException:
            http.close()
            raise
        if self._http is not None:
            self._http.close()
        self._http = http

    def _call(self, operation: Callable[[httpx.Client], _T]) -> _T:
        """Run ``operation``; if the aggregator is unreachable, re-attest a new one and retry; if it
        is still receiving an earlier upload of ours (503), send the same request again later."""
        deadline = time.monotonic() + self._reconnect_s
        while True:
            try:
                assert self._http is not None
                return operation(self._http)
            except UploadInProgressError as exc:
                if time.monotonic() + 1.0 > deadline:
                    raise
                _log.info("aggregator %s is still receiving an earlier upload (%s); retrying", self.url, exc)
                time.sleep(1.0)
                continue
            except httpx.TransportError as exc:
                # Also bounded when reconnecting succeeds but the request keeps failing in transport.
                if time.monotonic() + 0.5 > deadline:
                    raise FederatedError(f"aggregator {self.url} kept failing the request: {exc}") from exc
                _log.warning("aggregator %s unreachable (%s); reconnecting", self.url, exc)
            time.sleep(0.5)
            self._connect_until(deadline)

    def _connect_until(self, deadline: float) -> None:
        """Connect (all four steps), retrying until ``deadline`` while the aggregator is down or busy."""
        while True:
            try:
                self._connect()
                return
            except AttestationError as exc:
                pause = retry_delay(exc)
                if pause is None:  # a failed check is final
                    raise
                if time.monotonic() + pause > deadline:
                    raise FederatedError(f"aggregator {self.url} is unreachable or busy: {exc}") from exc
            except httpx.TransportError as exc:
                pause = 0.5
                if time.monotonic() > deadline:
                    raise FederatedError(f"aggregator {self.url} is unreachable: {exc}") from exc
            time.sleep(pause)

    # --- the AggregatorConnection interface ----------------------------------------------------

    def fetch_model(self, wait_s: float = 0.0) -> ModelMessage:
        def get(http: httpx.Client) -> ModelMessage:
            response = http.get(
                "/v1/fl/model", params={"wait_s": wait_s}, headers=self._auth, timeout=self._timeout + wait_s
            )
            _raise_for(response)
            return decode_model(response.content)

        message = self._call(get)
        if message.plan_sha256 != self.plan.digest:  # attested already; a cheap second look
            raise PolicyRejectedError("training-plan", message.plan_sha256.hex(), self.plan.digest.hex())
        return message

    def upload(self, round_: int, weights: Weights, num_examples: int, metrics: Mapping[str, float]) -> int:
        body = encode_update(round_, weights, num_examples, metrics)
        headers = {"Content-Type": UPDATE_CONTENT_TYPE, **self._auth}
        answer = self._call(lambda http: _json(http.post(f"/v1/fl/rounds/{round_}/update", content=body,
                                                         headers=headers)))  # fmt: skip
        return int(answer["uploads"])

    def status(self) -> dict[str, Any]:
        return self._call(lambda http: _json(http.get("/v1/fl/status", headers=self._auth)))

    def server_plan(self) -> dict[str, Any]:
        """The plan the aggregator reports (already known to equal ours: it is attested)."""
        return self._call(lambda http: _json(http.get("/v1/fl/plan")))

    def close(self) -> None:
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> AggregatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 300:
        return
    try:
        body = response.json()
        message = str(body.get("error", response.text))
    except ValueError:
        body, message = {}, response.text[:200]
    if response.status_code == 409:
        if "current_round" in body:
            raise RoundMismatchError(message, current=int(body["current_round"]))
        raise DuplicateUpdateError(message)
    error = _ERRORS.get(response.status_code, FederatedError)
    raise error(f"aggregator answered {response.status_code}: {message}")


def _json(response: httpx.Response) -> dict[str, Any]:
    _raise_for(response)
    body: dict[str, Any] = response.json()
    return body
