"""The client SDK: verify the server first, then send data — never the other way round.

:class:`Client` (and :class:`AsyncClient`) connect in three steps before any request body
leaves the process:

1. fetch the server's RA-TLS certificate and verify it against ``policy`` (evidence valid,
   key bound, claims accepted) — :func:`enclaveml.attestation.attest_server`;
2. pin exactly that certificate for every later connection;
3. ask ``GET /attestation?nonce=`` over the pinned channel for *fresh* evidence bound to a
   random nonce and the same TLS key, and verify it again (so a recorded certificate cannot be
   replayed by a server that no longer runs the attested code).

Only then does ``infer`` send inputs (binary tensor extension of the Open Inference Protocol).
Steps 1-3 are :class:`enclaveml.attestation.tls.AttestedSession`, which the FL clients share.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import numpy as np

from enclaveml.attestation import Claims, Policy, Verifier
from enclaveml.attestation._time import Instant
from enclaveml.attestation.tls import AttestedSession
from enclaveml.errors import AttestationError, EnclaveMLError
from enclaveml.serving._oip_codec import HEADER_LENGTH, InferenceError, decode_response, encode_request

__all__ = ["AsyncClient", "Client", "InferenceError"]

_NONCE_SIZE = 32
Inputs = Mapping[str, np.ndarray] | np.ndarray


def _as_inputs(inputs: Inputs, default_name: str | None) -> Mapping[str, np.ndarray]:
    if isinstance(inputs, np.ndarray):
        if default_name is None:
            raise ValueError("pass a mapping of input names to arrays for this model")
        return {default_name: inputs}
    return inputs


def _result(response: httpx.Response, asked: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    if response.status_code != 200:
        try:
            message = str(response.json().get("error", response.text))
        except ValueError:
            message = response.text[:200]
        raise InferenceError(response.status_code, message)
    results = decode_response(response.content, response.headers.get(HEADER_LENGTH))
    if asked is not None and set(results) != set(asked):
        raise EnclaveMLError(
            f"malformed inference response: outputs {sorted(results)} answer a request for {sorted(asked)}"
        )
    return results


class Client:
    """Synchronous client for an attested enclaveml inference server."""

    def __init__(
        self, url: str, *, policy: Policy, verifier: Verifier, timeout: float = 30.0, now: Instant = None
    ) -> None:
        self._attested = AttestedSession(url, policy, verifier, now, timeout)
        self._http = self._attested.server.client(timeout=timeout)
        self._input_names: dict[str, str | None] = {}
        try:
            self.reattest()
        except BaseException:
            self._http.close()
            raise

    @property
    def claims(self) -> Claims:
        """The claims of the server's most recent verified evidence."""
        return self._attested.claims

    @property
    def certificate_fingerprint(self) -> str:
        return self._attested.server.peer.fingerprint

    def reattest(self) -> Claims:
        """Ask for fresh evidence bound to a new nonce and verify it against the policy.

        A failure of any kind (the check, or the request in transport) leaves the client refusing
        to infer (AttestationError) until a reattest passes; while it is under way, calls made in
        between still go out on the previous verdict (as they would have an instant before).
        """
        nonce = os.urandom(_NONCE_SIZE)
        try:
            response = self._http.get("/attestation", params={"nonce": nonce.hex()})
        except httpx.HTTPError as exc:
            self._attested.invalidate()
            raise AttestationError(f"fresh attestation request failed ({type(exc).__name__})") from exc
        except BaseException:
            self._attested.invalidate()
            raise
        return self._attested.check_fresh(nonce, response)

    def model_metadata(self, model: str) -> dict[str, Any]:
        self._attested.require_fresh()
        response = self._http.get(f"/v2/models/{model}")
        if response.status_code != 200:
            raise InferenceError(response.status_code, response.text[:200])
        metadata: dict[str, Any] = response.json()
        return metadata

    def infer(
        self, model: str, inputs: Inputs, *, outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` (a name→array mapping, or one array for single-input models).

        Refuses (AttestationError, nothing sent) while the server's last re-attestation has failed.
        """
        self._attested.require_fresh()
        if isinstance(inputs, np.ndarray) and model not in self._input_names:
            names = [i["name"] for i in self.model_metadata(model)["inputs"]]
            self._input_names[model] = names[0] if len(names) == 1 else None
        body, headers = encode_request(_as_inputs(inputs, self._input_names.get(model)), outputs)
        return _result(self._http.post(f"/v2/models/{model}/infer", content=body, headers=headers), outputs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """Asynchronous client; create with ``await AsyncClient.connect(url, policy=..., verifier=...)``."""

    def __init__(self, attested: AttestedSession, http: httpx.AsyncClient) -> None:
        self._attested = attested
        self._http = http

    @classmethod
    async def connect(
        cls, url: str, *, policy: Policy, verifier: Verifier, timeout: float = 30.0, now: Instant = None
    ) -> AsyncClient:
        # Certificate fetch and verification are short and CPU-bound; run them before the first await.
        attested = AttestedSession(url, policy, verifier, now, timeout)
        client = cls(attested, attested.server.async_client(timeout=timeout))
        try:
            await client.reattest()
        except BaseException:
            await client.aclose()
            raise
        return client

    @property
    def claims(self) -> Claims:
        return self._attested.claims

    async def reattest(self) -> Claims:
        """As :meth:`Client.reattest`: nothing is sent until it passes."""
        nonce = os.urandom(_NONCE_SIZE)
        try:
            response = await self._http.get("/attestation", params={"nonce": nonce.hex()})
        except httpx.HTTPError as exc:
            self._attested.invalidate()
            raise AttestationError(f"fresh attestation request failed ({type(exc).__name__})") from exc
        except BaseException:  # cancelled: the check did not pass
            self._attested.invalidate()
            raise
        return self._attested.check_fresh(nonce, response)

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], *, outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        self._attested.require_fresh()
        body, headers = encode_request(inputs, outputs)
        response = await self._http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        return _result(response, outputs)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
