"""RA-TLS over real TLS sockets on 127.0.0.1 with simulation evidence."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from typing import ClassVar

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from enclaveml.attestation.policy import AllOf, MeasurementAllowlist, UnsafeAllowSimulation
from enclaveml.attestation.ratls import RatlsCertificate, create_ratls_certificate
from enclaveml.attestation.simulation import SimulationProvider, SimulationVerifier
from enclaveml.attestation.tls import attest_server, fetch_peer_certificate, server_ssl_context
from enclaveml.errors import (
    AttestationError,
    BindingError,
    ConfigurationError,
    PolicyRejectedError,
    VerificationError,
)


class _Handler(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(body)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def _serve(context: ssl.SSLContext) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"https://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def ratls(sim_provider: SimulationProvider) -> RatlsCertificate:
    return create_ratls_certificate(sim_provider, nonce=b"fresh-nonce")


@pytest.fixture
def served(ratls: RatlsCertificate) -> Iterator[str]:
    _Handler.received = []
    server, url = _serve(server_ssl_context(ratls))
    yield url
    server.shutdown()


def test_round_trip_over_real_tls(served: str, sim_verifier: SimulationVerifier, sim_policy, ratls) -> None:
    attested = attest_server(served, verifier=sim_verifier, policy=sim_policy)
    assert attested.peer.claims.simulated
    assert attested.peer.nonce == b"fresh-nonce"
    with attested.client() as client:
        response = client.post("/infer", content=b"secret-input")
    assert response.status_code == 200
    assert _Handler.received == [b"secret-input"]


def test_pinned_client_refuses_a_different_server(
    served: str, sim_provider: SimulationProvider, sim_verifier: SimulationVerifier, sim_policy
) -> None:
    attested = attest_server(served, verifier=sim_verifier, policy=sim_policy)
    # A second, equally valid RA-TLS server with another key: the pinned client must refuse it.
    other, other_url = _serve(server_ssl_context(create_ratls_certificate(sim_provider)))
    try:
        with (
            attested.client() as client,
            pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            client.post(f"{other_url}/infer", content=b"secret-input")
    finally:
        other.shutdown()
    assert _Handler.received == []


def test_policy_rejection_sends_nothing(served: str, sim_verifier: SimulationVerifier) -> None:
    policy = UnsafeAllowSimulation(AllOf(MeasurementAllowlist([b"\x01" * 48])))
    with pytest.raises(PolicyRejectedError, match="measurement"):
        attest_server(served, verifier=sim_verifier, policy=policy)
    assert _Handler.received == []


def test_certificate_key_must_match_bound_key(
    sim_provider: SimulationProvider, sim_verifier: SimulationVerifier, sim_policy
) -> None:
    genuine = create_ratls_certificate(sim_provider)
    # Re-issue the same extensions (same evidence) over a different key: binding must fail.
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    builder_cert = genuine.certificate
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    builder = (
        x509.CertificateBuilder()
        .subject_name(builder_cert.subject)
        .issuer_name(builder_cert.issuer)
        .public_key(impostor_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(builder_cert.not_valid_before_utc)
        .not_valid_after(builder_cert.not_valid_after_utc)
    )
    for ext in builder_cert.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    impostor = builder.sign(impostor_key, hashes.SHA256())
    server, url = _serve(server_ssl_context(RatlsCertificate(impostor, impostor_key, genuine.evidence)))
    try:
        with pytest.raises(BindingError, match="different public key"):
            attest_server(url, verifier=sim_verifier, policy=sim_policy)
    finally:
        server.shutdown()


def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(AttestationError, match="cannot fetch the TLS certificate"):
        fetch_peer_certificate("127.0.0.1", 1, timeout=2)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.invalid:99999",
        "https://example.invalid:abc",
        "https://a..b:8443",
        f"https://{'x' * 70}:8443",
        "https://[::1",
        "https://[zz]:443",
    ],
)
def test_a_malformed_server_url_is_a_configuration_error(url: str, sim_verifier: SimulationVerifier) -> None:
    with pytest.raises(ConfigurationError, match=r"URL|host name"):
        attest_server(url, verifier=sim_verifier, policy=UnsafeAllowSimulation(AllOf()), timeout=2)


def test_a_fresh_attestation_answer_with_bytes_after_it_is_refused(
    served: str, sim_provider: SimulationProvider, sim_verifier: SimulationVerifier, sim_policy, ratls
) -> None:
    import cbor2

    from enclaveml.attestation.ratls import bind_public_key
    from enclaveml.attestation.tls import AttestedSession

    session = AttestedSession(served, sim_policy, sim_verifier, None, 5.0)
    nonce = b"n" * 32
    binding = bind_public_key(sim_provider, ratls.private_key.public_key(), nonce=nonce)
    answer = cbor2.dumps({"evidence": binding.evidence, "endorsements": binding.endorsements})
    session.check_fresh(nonce, httpx.Response(200, content=answer))
    assert session.fresh
    with pytest.raises(VerificationError, match="malformed /attestation answer"):
        session.check_fresh(nonce, httpx.Response(200, content=answer + b"\x00"))
    assert not session.fresh
