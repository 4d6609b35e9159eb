"""Gramine's legacy RA-TLS certificates (raw quote in 1.2.840.113741.1.13.1) parse and are verified."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclaveml.attestation import AllOf, DcapVerifier, LocalCollateral, MeasurementAllowlist, TcbStatus
from enclaveml.attestation.ratls import LEGACY_GRAMINE_OID, parse_legacy_quote, verify_ratls_certificate
from enclaveml.errors import BindingError
from tests.conftest import VECTORS

CASE = json.loads((VECTORS / "expected.json").read_text())["cases"]["sgx/phala_sgx_v3"]
QUOTE = (VECTORS / "sgx" / CASE["quote"]).read_bytes()
NOW = CASE["recommended_now_unix"]


def _legacy_certificate(quote: bytes) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RATLS")])
    moment = dt.datetime.fromtimestamp(NOW, dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(moment - dt.timedelta(days=1))
        .not_valid_after(moment + dt.timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(LEGACY_GRAMINE_OID, quote), critical=False)
        .sign(key, hashes.SHA256())
    )


def test_legacy_certificate_parses_to_the_embedded_quote() -> None:
    cert = _legacy_certificate(QUOTE)
    assert parse_legacy_quote(cert.public_bytes(serialization.Encoding.DER)) == QUOTE


def test_legacy_quote_is_verified_and_its_key_binding_checked() -> None:
    cert = _legacy_certificate(QUOTE)
    verifier = DcapVerifier(LocalCollateral(VECTORS / "sgx" / CASE["collateral"]))
    policy = AllOf(
        MeasurementAllowlist([CASE["report"]["mr_enclave"]]),
        TcbStatus(accepted=["ConfigurationAndSWHardeningNeeded"]),
    )
    # The real quote verifies, but its report data ("Hello, world!") is not SHA-256 of this
    # certificate's key: the legacy binding check must refuse it.
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert hashlib.sha256(spki).digest() != bytes.fromhex(CASE["report"]["report_data"])[:32]
    with pytest.raises(BindingError, match="legacy RA-TLS quote does not bind"):
        verify_ratls_certificate(cert, verifier=verifier, policy=policy, now=NOW)
