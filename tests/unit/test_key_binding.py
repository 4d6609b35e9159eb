"""Fresh key bindings (the per-request form of RA-TLS evidence): key, nonce and evidence checks."""

from __future__ import annotations

import datetime
import hashlib

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from enclaveml.attestation import default_policy
from enclaveml.attestation.ratls import (
    _TAG_BY_TEE,
    NO_EXPIRY,
    RATLS_EVIDENCE_OID,
    bind_public_key,
    create_ratls_certificate,
    ratls_report_data,
    spki_der,
    verify_key_binding,
    verify_ratls_certificate,
)
from enclaveml.errors import BindingError, ConfigurationError, PolicyRejectedError, VerificationError


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_binding_round_trip_with_nonce(key, sim_provider, sim_verifier, sim_policy) -> None:
    binding = bind_public_key(sim_provider, key.public_key(), nonce=b"n" * 32)
    claims, nonce = verify_key_binding(
        binding.evidence,
        public_key_spki=spki_der(key.public_key()),
        verifier=sim_verifier,
        policy=sim_policy,
        nonce=b"n" * 32,
    )
    assert nonce == b"n" * 32
    assert claims.measurement == sim_provider.measurement


@pytest.mark.parametrize("hash_alg", ["sha-256", "sha-384", "sha-512"])
def test_every_interoperable_hash_algorithm(hash_alg, key, sim_provider, sim_verifier, sim_policy) -> None:
    binding = bind_public_key(sim_provider, key.public_key(), hash_alg=hash_alg)
    verify_key_binding(
        binding.evidence, public_key_spki=spki_der(key.public_key()), verifier=sim_verifier, policy=sim_policy
    )


def test_other_nonce_other_key_tampering_and_policy(key, sim_provider, sim_verifier, sim_policy) -> None:
    binding = bind_public_key(sim_provider, key.public_key(), nonce=b"a" * 16)
    spki = spki_der(key.public_key())
    with pytest.raises(BindingError, match="nonce"):
        verify_key_binding(
            binding.evidence, public_key_spki=spki, verifier=sim_verifier, policy=sim_policy, nonce=b"b" * 16
        )
    other = spki_der(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(BindingError, match="different public key"):
        verify_key_binding(binding.evidence, public_key_spki=other, verifier=sim_verifier, policy=sim_policy)
    tampered = bytearray(binding.evidence)
    tampered[-40] ^= 1
    with pytest.raises((VerificationError, BindingError)):
        verify_key_binding(bytes(tampered), public_key_spki=spki, verifier=sim_verifier, policy=sim_policy)
    with pytest.raises(PolicyRejectedError):
        verify_key_binding(
            binding.evidence, public_key_spki=spki, verifier=sim_verifier, policy=default_policy()
        )


def _binding_with_claims(provider, claims: dict[str, object]) -> bytes:  # type: ignore[no-untyped-def]
    """Evidence over hand-made RA-TLS claims (what a hostile server could send)."""
    claims_bytes = cbor2.dumps(claims, canonical=True)
    evidence = provider.collect(ratls_report_data(claims_bytes))
    return cbor2.dumps(cbor2.CBORTag(_TAG_BY_TEE[evidence.tee], [evidence.data, claims_bytes]))


@pytest.mark.parametrize("alg", [[1], True, "1", 1.0])
def test_a_hostile_pubkey_hash_algorithm_is_a_verification_error(
    alg: object, key, sim_provider, sim_verifier, sim_policy
) -> None:
    spki = spki_der(key.public_key())
    evidence = _binding_with_claims(sim_provider, {"pubkey-hash": [alg, hashlib.sha256(spki).digest()]})
    with pytest.raises(VerificationError, match="hash algorithm"):
        verify_key_binding(evidence, public_key_spki=spki, verifier=sim_verifier, policy=sim_policy)


def test_claims_or_evidence_with_bytes_after_the_cbor_item_are_refused(
    key, sim_provider, sim_verifier, sim_policy
) -> None:
    # cbor2.loads ignores what follows the first item: a bound value must have one encoding only.
    spki = spki_der(key.public_key())
    pubkey_hash = [1, hashlib.sha256(spki).digest()]
    claims_bytes = cbor2.dumps({"pubkey-hash": pubkey_hash}, canonical=True) + b"junk"
    evidence = sim_provider.collect(ratls_report_data(claims_bytes))  # the TEE hashed the junk too
    padded_claims = cbor2.dumps(cbor2.CBORTag(_TAG_BY_TEE[evidence.tee], [evidence.data, claims_bytes]))
    with pytest.raises(VerificationError, match="not valid CBOR"):
        verify_key_binding(padded_claims, public_key_spki=spki, verifier=sim_verifier, policy=sim_policy)
    honest = _binding_with_claims(sim_provider, {"pubkey-hash": pubkey_hash})
    verify_key_binding(honest, public_key_spki=spki, verifier=sim_verifier, policy=sim_policy)
    with pytest.raises(VerificationError, match="not valid CBOR"):
        verify_key_binding(honest + b"\x00", public_key_spki=spki, verifier=sim_verifier, policy=sim_policy)


def test_claims_with_a_repeated_key_or_an_indefinite_length_are_refused(
    key, sim_provider, sim_verifier, sim_policy
) -> None:
    spki = spki_der(key.public_key())
    good = cbor2.dumps([1, hashlib.sha256(spki).digest()])
    other = cbor2.dumps([1, hashlib.sha256(b"someone else").digest()])
    # {"pubkey-hash": other, "pubkey-hash": good}: cbor2 would keep the last entry.
    name = cbor2.dumps("pubkey-hash")
    repeated = b"\xa2" + name + cbor2.dumps(other) + name + cbor2.dumps(good)
    indefinite = b"\xbf" + name + cbor2.dumps(good) + b"\xff"
    for claims_bytes in (repeated, indefinite):
        evidence = sim_provider.collect(ratls_report_data(claims_bytes))
        tagged = cbor2.dumps(cbor2.CBORTag(_TAG_BY_TEE[evidence.tee], [evidence.data, claims_bytes]))
        with pytest.raises(VerificationError, match="not valid CBOR"):
            verify_key_binding(tagged, public_key_spki=spki, verifier=sim_verifier, policy=sim_policy)


@pytest.mark.parametrize(("evidence", "endorsements"), [(5, None), ("text", None), (b"x", 7), (b"x", [b"y"])])
def test_evidence_and_endorsements_of_the_wrong_type_are_verification_errors(
    evidence: object, endorsements: object, key, sim_verifier, sim_policy
) -> None:
    with pytest.raises(VerificationError, match="byte strings"):
        verify_key_binding(
            evidence,  # type: ignore[arg-type]
            public_key_spki=spki_der(key.public_key()),
            verifier=sim_verifier,
            policy=sim_policy,
            endorsements=endorsements,  # type: ignore[arg-type]
        )


_PLACEHOLDER_OID = x509.ObjectIdentifier("2.23.133.5.4.8")  # as long as RATLS_EVIDENCE_OID in DER


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    length = bytes([size]) if size < 0x80 else bytes([0x80 | ((size.bit_length() + 7) // 8)])
    if size >= 0x80:
        length += size.to_bytes(length[0] & 0x7F, "big")
    return bytes([tag]) + length + body


def _resigned(
    certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey, old: bytes, new: bytes
) -> bytes:
    """The certificate with ``old`` replaced by ``new`` (same length) in its TBS part, signed again
    by ``key``: a hostile server signs whatever it likes, and cryptography's builder refuses to
    make some of these certificates (a duplicate extension) itself."""
    assert len(old) == len(new)
    assert certificate.tbs_certificate_bytes.count(old) == 1
    tbs = certificate.tbs_certificate_bytes.replace(old, new)
    algorithm = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))  # ecdsa-with-SHA256
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + signature))


@pytest.mark.parametrize(
    "hostile",
    ["malformed subject alternative name", "ediPartyName in the names", "evidence extension twice"],
)
def test_a_certificate_with_a_malformed_extension_is_a_verification_error(
    key, sim_provider, sim_verifier, sim_policy, hostile: str
) -> None:
    """Whatever cryptography raises when it first reads the extensions (ValueError,
    UnsupportedGeneralNameType, DuplicateExtension) is a VerificationError, never a bare exception."""
    binding = bind_public_key(sim_provider, key.public_key())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.UnrecognizedExtension(RATLS_EVIDENCE_OID, binding.evidence), critical=False)
    )
    if hostile == "malformed subject alternative name":
        names = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x04\x03bad")
        der = (
            builder.add_extension(names, critical=False)
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
    elif hostile == "ediPartyName in the names":
        certificate = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        ).sign(key, hashes.SHA256())
        der = _resigned(certificate, key, b"\x82\x09localhost", b"\xa5\x09\x80\x07foo.bar")
    else:
        second = x509.UnrecognizedExtension(_PLACEHOLDER_OID, binding.evidence)
        certificate = builder.add_extension(second, critical=False).sign(key, hashes.SHA256())
        # The placeholder's DER OID (2.23.133.5.4.8) becomes the evidence OID (2.23.133.5.4.9).
        der = _resigned(
            certificate, key, bytes.fromhex("0606678105050408"), bytes.fromhex("0606678105050409")
        )
    loaded = x509.load_der_x509_certificate(der)
    loaded.verify_directly_issued_by(loaded)  # correctly self-signed: only the content is hostile
    with pytest.raises(VerificationError, match="malformed key or extension"):
        verify_ratls_certificate(der, verifier=sim_verifier, policy=sim_policy)


def test_certificates_have_no_expiry_unless_a_validity_is_asked_for(
    sim_provider, sim_verifier, sim_policy
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    lasting = create_ratls_certificate(sim_provider).certificate
    assert lasting.not_valid_after_utc == NO_EXPIRY
    verify_ratls_certificate(
        lasting, verifier=sim_verifier, policy=sim_policy, now=now + datetime.timedelta(days=3650)
    )
    hour = create_ratls_certificate(sim_provider, validity=datetime.timedelta(hours=1)).certificate
    verify_ratls_certificate(
        hour, verifier=sim_verifier, policy=sim_policy, now=now + datetime.timedelta(minutes=59)
    )
    for outside in (now + datetime.timedelta(hours=2), now - datetime.timedelta(hours=1)):
        with pytest.raises(VerificationError, match="not valid at"):
            verify_ratls_certificate(hour, verifier=sim_verifier, policy=sim_policy, now=outside)


def test_certificate_names_sort_ip_literals_from_dns_names_and_leave_out_wildcards(sim_provider) -> None:
    from enclaveml._urls import certificate_names

    assert certificate_names("0.0.0.0", ["server.example", "10.0.0.5", "[fd00::1]"]) == (
        ("localhost", "server.example"),
        ("127.0.0.1", "::1", "10.0.0.5", "fd00::1"),
    )
    assert certificate_names("::") == (("localhost",), ("127.0.0.1", "::1"))
    assert certificate_names("127.0.0.1") == (("localhost",), ("127.0.0.1", "::1"))
    dns, ips = certificate_names("api.example")
    certificate = create_ratls_certificate(sim_provider, dns_names=dns, ip_addresses=ips).certificate
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "api.example"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    with pytest.raises(ConfigurationError, match="not an IP address"):
        create_ratls_certificate(sim_provider, ip_addresses=("not-an-ip",))
    # Internationalised names as A-labels; a port, a space or a path is no name (refused before
    # `serve` releases any key).
    assert certificate_names("0.0.0.0", ["bücher.example"])[0] == ("localhost", "xn--bcher-kva.example")
    for bad in ("[2001:db8::1]:8443", "a b", "host/x", "-x.example"):
        with pytest.raises(ConfigurationError, match="neither an IP address nor a host name"):
            certificate_names("127.0.0.1", [bad])
