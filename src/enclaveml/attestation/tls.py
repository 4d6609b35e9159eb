"""TLS plumbing for RA-TLS: server contexts with in-memory keys, and attested, pinned clients.

Server side: :func:`server_ssl_context` loads an RA-TLS certificate and its private key into
an ``ssl.SSLContext`` without writing the key to disk (Linux ``memfd``: the "file" lives
only in this process's memory). :func:`in_memory_key_files` gives the same for libraries
that insist on file names (uvicorn).

Client side: :func:`attest_server` opens a TLS connection, takes the server's certificate,
verifies it as RA-TLS evidence against a policy, and returns an :class:`AttestedServer`
whose ``ssl_context`` trusts exactly that certificate (and so exactly the attested key) and
nothing else. Its ``client()`` / ``async_client()`` give httpx clients pinned the same way,
so no request body can go to a server that was not verified.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclaveml._cbor import loads_exact
from enclaveml._urls import url_host
from enclaveml.attestation._policy_base import Policy
from enclaveml.attestation._time import Instant
from enclaveml.attestation.claims import Claims
from enclaveml.attestation.ratls import (
    RatlsCertificate,
    VerifiedPeer,
    spki_der,
    verify_key_binding,
    verify_ratls_certificate,
)
from enclaveml.attestation.verifier import Verifier
from enclaveml.errors import AttestationBusyError, AttestationError, ConfigurationError, VerificationError

__all__ = [
    "AttestedServer",
    "AttestedSession",
    "attest_server",
    "fetch_peer_certificate",
    "in_memory_key_files",
    "pinned_ssl_context",
    "server_ssl_context",
]


@contextlib.contextmanager
def in_memory_key_files(certificate_pem: bytes, private_key_pem: bytes) -> Iterator[tuple[str, str]]:
    """Yield (certfile, keyfile) paths backed by anonymous memory files, closed on exit."""
    fds: list[int] = []
    try:
        paths = []
        for name, data in (("ratls-cert", certificate_pem), ("ratls-key", private_key_pem)):
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
            paths.append(f"/proc/self/fd/{fd}")
        yield paths[0], paths[1]
    finally:
        for fd in fds:
            os.close(fd)


def server_ssl_context(ratls: RatlsCertificate) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting ``ratls``; the key never touches the file system."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with in_memory_key_files(ratls.certificate_pem, ratls.private_key_pem()) as (certfile, keyfile):
        context.load_cert_chain(certfile, keyfile)
    return context


def pinned_ssl_context(certificate_der: bytes) -> ssl.SSLContext:
    """A client context that trusts exactly one certificate and nothing else.

    Host names are not checked: an RA-TLS server is identified by its attested key, not by
    DNS. Every certificate that validates under this context was signed by that key.
    """
    pem = x509.load_der_x509_certificate(certificate_der).public_bytes(serialization.Encoding.PEM)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=pem.decode())
    return context


def fetch_peer_certificate(host: str, port: int, *, timeout: float = 10.0) -> bytes:
    """Connect once and return the DER certificate the server presents (not yet trusted)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    # The certificate is verified as RA-TLS evidence right after this, not by a CA.
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except UnicodeError as exc:  # IDNA: an empty or over-long label in the host name
        raise ConfigurationError(f"{host!r} is not a valid host name") from exc
    except (OSError, ssl.SSLError) as exc:
        raise AttestationError(f"cannot fetch the TLS certificate of {host}:{port}: {exc}") from exc
    if not der:
        raise AttestationError(f"{host}:{port} presented no certificate")
    return der


@dataclass(frozen=True)
class AttestedServer:
    """A server whose RA-TLS certificate was verified and appraised; talk to it only through this."""

    base_url: str
    peer: VerifiedPeer

    @property
    def ssl_context(self) -> ssl.SSLContext:
        return pinned_ssl_context(self.peer.certificate_der)

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client bound to ``base_url`` that trusts only the attested certificate."""
        return httpx.Client(base_url=self.base_url, verify=self.ssl_context, **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, verify=self.ssl_context, **kwargs)


def attest_server(
    url: str,
    *,
    verifier: Verifier,
    policy: Policy,
    now: Instant = None,
    timeout: float = 10.0,
) -> AttestedServer:
    """Fetch the RA-TLS certificate of ``https://host:port``, verify and appraise it, and pin it."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or 443
    except ValueError as exc:  # a bad port, an unclosed or invalid [IPv6] host
        raise ConfigurationError(f"bad server URL {url!r}: {exc}") from None
    if parts.scheme != "https" or not host:
        raise ConfigurationError(f"RA-TLS servers are reached over https://host:port, got {url!r}")
    der = fetch_peer_certificate(host, port, timeout=timeout)
    peer = verify_ratls_certificate(der, verifier=verifier, policy=policy, now=now)
    return AttestedServer(f"https://{url_host(host)}:{port}", peer)


class AttestedSession:
    """A verified, pinned RA-TLS server and the check of the fresh evidence it answers later.

    Construction runs :func:`attest_server` (certificate fetched, verified, appraised, pinned).
    :meth:`check_fresh` verifies an ``/attestation?nonce=`` answer: CBOR ``{"evidence": bstr,
    "endorsements": bstr / null}`` (:func:`enclaveml.attestation.ratls.bind_public_key`) whose
    evidence must bind the same TLS key and ``nonce`` and satisfy the same policy. The clients of
    the inference server, the FL aggregator and the vertical-FL server all connect through it.
    """

    def __init__(self, url: str, policy: Policy, verifier: Verifier, now: Instant, timeout: float) -> None:
        self._policy, self._verifier, self._now = policy, verifier, now
        self.server: AttestedServer = attest_server(
            url, verifier=verifier, policy=policy, now=now, timeout=timeout
        )
        self._spki = spki_der(x509.load_der_x509_certificate(self.server.peer.certificate_der).public_key())
        self.claims: Claims = self.server.peer.claims
        self.fresh = False  # whether the most recent check_fresh passed

    def invalidate(self) -> None:
        """Distrust the server until a check passes: call when asking for fresh evidence failed
        before :meth:`check_fresh` (reset, timeout), so the last verdict does not stand."""
        self.fresh = False

    def check_fresh(self, nonce: bytes, response: httpx.Response) -> Claims:
        """Verify the answer to ``GET /attestation?nonce=...``; the claims, or an AttestationError.

        Until a check passes, and after one fails, :meth:`require_fresh` refuses: a server that
        fails a re-attestation is not trusted with data again until it passes one.
        """
        self.fresh = False
        if response.status_code in (429, 503):
            raise AttestationBusyError(
                f"server is busy producing attestations ({response.status_code}); retry later",
                _retry_after(response.headers.get("Retry-After")),
            )
        if response.status_code != 200:
            raise AttestationError(f"server refused fresh attestation ({response.status_code})")
        try:
            token = loads_exact(response.content)
            evidence, endorsements = token["evidence"], token.get("endorsements")
        except Exception as exc:  # cbor2 raises several unrelated types on garbage
            raise VerificationError("malformed /attestation answer") from exc
        claims, _ = verify_key_binding(
            evidence,
            public_key_spki=self._spki,
            verifier=self._verifier,
            policy=self._policy,
            nonce=nonce,
            endorsements=endorsements,
            now=self._now,
        )
        self.claims = claims
        self.fresh = True
        return claims

    def require_fresh(self) -> None:
        """Raise AttestationError unless the most recent fresh-evidence check passed."""
        if not self.fresh:
            raise AttestationError(
                "the server's most recent attestation check failed or never ran; nothing is sent to it "
                "until a re-attestation passes"
            )


def retry_delay(exc: AttestationError) -> float | None:
    """Seconds to wait before connecting again after ``exc``, or None when ``exc`` is final.

    Worth waiting out: a server that cannot be reached (not started yet, restarting) and one
    whose attestation slots are full (``AttestationBusyError``: its ``Retry-After``, with jitter
    so that many clients reconnecting after a restart do not come back together). Any failed
    check is final: a server that fails one is refused, never retried into acceptance.
    """
    if isinstance(exc, AttestationBusyError):
        return exc.retry_after_s * (1.0 + random.random())  # noqa: S311 - jitter, not a secret
    if type(exc) is AttestationError and isinstance(exc.__cause__, OSError):
        return 0.5
    return None


def _retry_after(value: str | None) -> float:
    """Seconds from a ``Retry-After`` in seconds (dates and nonsense: 1 s), within 0.1..60."""
    try:
        seconds = float(value) if value is not None else 1.0
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.1), 60.0) if math.isfinite(seconds) else 1.0
