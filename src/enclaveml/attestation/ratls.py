"""RA-TLS: X.509 certificates whose public key is bound into fresh TEE evidence.

Creating (:func:`create_ratls_certificate`) and verifying (:func:`verify_ratls_certificate`)
follow the *interoperable RA-TLS* form used by Gramine and others:

* extension ``2.23.133.5.4.9`` (tcg-dice-conceptual-message-wrapper), non-critical, whose
  value is CBOR ``#6.TAG([evidence: bstr, claims: bstr])``; ``claims`` is the encoded CBOR map
  ``{"pubkey-hash": bstr(encoded [hash-alg-id, hash(SubjectPublicKeyInfo DER)]), ? "nonce": bstr}``
  (hash-alg-id from the IANA Named Information registry: 1 sha-256, 7 sha-384, 8 sha-512;
  a bare array instead of the bstr-wrapped one is accepted when reading);
* the evidence's 64-byte report data is ``SHA-256(claims) || 32 zero bytes``.

Tags: 60000 carries an Intel SGX/TDX DCAP quote (interoperable). enclaveml also uses
60002 for an SEV-SNP report and 1701667693 ("emlm") for simulation evidence; these two are
understood only by enclaveml. SEV-SNP certificates (VCEK chain) travel in the endorsements
extension ``2.23.133.5.4.2`` under the same tag.

Gramine's legacy format is accepted when verifying: extension ``1.2.840.113741.1.13.1``
holding the raw SGX quote, with ``report_data[0:32] = SHA-256(SubjectPublicKeyInfo DER)``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclaveml._cbor import loads_exact
from enclaveml.attestation._policy_base import Policy
from enclaveml.attestation._time import Instant, to_datetime, to_unix
from enclaveml.attestation._x509_errors import CERTIFICATE_ERRORS
from enclaveml.attestation.appraisal import appraise_evidence
from enclaveml.attestation.claims import Claims
from enclaveml.attestation.evidence import Evidence, EvidenceProvider, TeeType
from enclaveml.attestation.verifier import Verifier
from enclaveml.errors import BindingError, ConfigurationError, VerificationError

__all__ = [
    "LEGACY_GRAMINE_OID",
    "NO_EXPIRY",
    "RATLS_ENDORSEMENTS_OID",
    "RATLS_EVIDENCE_OID",
    "KeyBinding",
    "RatlsCertificate",
    "VerifiedPeer",
    "bind_public_key",
    "create_ratls_certificate",
    "parse_legacy_quote",
    "ratls_report_data",
    "spki_der",
    "verify_key_binding",
    "verify_ratls_certificate",
]

RATLS_EVIDENCE_OID = x509.ObjectIdentifier("2.23.133.5.4.9")
RATLS_ENDORSEMENTS_OID = x509.ObjectIdentifier("2.23.133.5.4.2")
LEGACY_GRAMINE_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
NO_EXPIRY = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
"""``notAfter`` of a certificate with no well-defined expiration date (RFC 5280, 4.1.2.5)."""

_TAG_BY_TEE = {TeeType.SGX: 60000, TeeType.TDX: 60000, TeeType.SEV_SNP: 60002, TeeType.SIMULATION: 1701667693}
_HASHES: dict[int, Any] = {1: hashlib.sha256, 7: hashlib.sha384, 8: hashlib.sha512}
_HASH_IDS = {"sha-256": 1, "sha-384": 7, "sha-512": 8}
_MAX_EXTENSION = 64 * 1024


@dataclass(frozen=True)
class RatlsCertificate:
    """A freshly minted RA-TLS certificate and its private key (which never leaves memory)."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    evidence: Evidence

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self) -> bytes:
        """PKCS#8 PEM of the key, for loading into an SSL context held in memory only."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def __repr__(self) -> str:
        subject = self.certificate.subject.rfc4514_string()
        return f"RatlsCertificate(subject={subject!r}, tee={self.evidence.tee.value})"


@dataclass(frozen=True)
class VerifiedPeer:
    """What a verified RA-TLS certificate proves: these claims hold for the holder of this key."""

    certificate_der: bytes
    claims: Claims
    legacy_format: bool
    nonce: bytes | None

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate DER, hex: what clients pin."""
        return hashlib.sha256(self.certificate_der).hexdigest()


def spki_der(public_key: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a public key: what RA-TLS hashes."""
    return bytes(
        public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def ratls_report_data(claims_bytes: bytes) -> bytes:
    """The report data that binds encoded RA-TLS claims: SHA-256(claims) followed by 32 zeros."""
    return hashlib.sha256(claims_bytes).digest() + bytes(32)


@dataclass(frozen=True)
class KeyBinding:
    """Fresh evidence binding a public key (and optionally a nonce), in the RA-TLS encoding.

    ``evidence`` is the value of the 2.23.133.5.4.9 extension (``#6.TAG([evidence, claims])``);
    ``endorsements`` that of 2.23.133.5.4.2, or ``None``. Servers hand these out both inside
    their certificate and, for per-request freshness, from ``GET /attestation?nonce=...``.
    """

    evidence: bytes
    endorsements: bytes | None
    raw: Evidence


def bind_public_key(
    provider: EvidenceProvider, public_key: Any, *, nonce: bytes | None = None, hash_alg: str = "sha-256"
) -> KeyBinding:
    """Collect fresh evidence whose report data commits to ``public_key`` (its SPKI) and ``nonce``."""
    if hash_alg not in _HASH_IDS:
        raise ConfigurationError(f"hash_alg must be one of {sorted(_HASH_IDS)}")
    alg_id = _HASH_IDS[hash_alg]
    pubkey_hash = bytes(cbor2.dumps([alg_id, _HASHES[alg_id](spki_der(public_key)).digest()]))
    claims: dict[str, bytes] = {"pubkey-hash": pubkey_hash}
    if nonce is not None:
        claims["nonce"] = bytes(nonce)
    claims_bytes = bytes(cbor2.dumps(claims, canonical=True))
    evidence = provider.collect(ratls_report_data(claims_bytes))
    tag = _TAG_BY_TEE[evidence.tee]
    encoded = bytes(cbor2.dumps(cbor2.CBORTag(tag, [evidence.data, claims_bytes])))
    endorsements = bytes(cbor2.dumps(cbor2.CBORTag(tag, evidence.aux))) if evidence.aux else None
    return KeyBinding(encoded, endorsements, evidence)


def verify_key_binding(
    evidence: bytes,
    *,
    public_key_spki: bytes,
    verifier: Verifier,
    policy: Policy,
    nonce: bytes | None = None,
    endorsements: bytes | None = None,
    now: Instant = None,
) -> tuple[Claims, bytes | None]:
    """Verify an RA-TLS evidence value against a public key (SPKI DER) and optional nonce.

    Returns the appraised claims and the nonce the evidence carries. Raises BindingError when
    the evidence binds another key or nonce, VerificationError / PolicyRejectedError otherwise.
    """
    # A server chooses these (e.g. in its /attestation answer): check types before using them.
    if not isinstance(evidence, bytes) or not isinstance(endorsements, bytes | None):
        raise VerificationError("RA-TLS evidence and endorsements must be byte strings")
    aux = _decode_endorsements(endorsements) if endorsements else b""
    decoded, claims_bytes = _decode_evidence_extension(evidence, aux)
    got_nonce = _check_claims(claims_bytes, public_key_spki, nonce)
    claims = appraise_evidence(
        decoded,
        verifier=verifier,
        policy=policy,
        expected_report_data=ratls_report_data(claims_bytes),
        now=now,
    )
    return claims, got_nonce


def create_ratls_certificate(
    provider: EvidenceProvider,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    nonce: bytes | None = None,
    hash_alg: str = "sha-256",
    common_name: str = "enclaveml RA-TLS",
    dns_names: tuple[str, ...] = ("localhost",),
    validity: dt.timedelta | None = None,
    ip_addresses: tuple[str, ...] = (),
) -> RatlsCertificate:
    """Generate (or use) a key, bind its SPKI into fresh evidence, and self-sign a certificate.

    By default the certificate has no expiry: its ``notAfter`` is RFC 5280's value for "no
    well-defined expiration date" (9999-12-31 23:59:59 UTC, :data:`NO_EXPIRY`). Its trust comes
    from the evidence, not from a validity period: the key is generated in the TEE, lives in its
    memory and ends with the process, verifiers appraise the evidence against their current
    collateral and policy whenever they check the certificate, and the clients of every enclaveml
    server ask for fresh evidence bound to a nonce and this key when they connect (and again on
    each ``reattest()``; a client that fails one sends nothing until one passes). A bounded
    period would only make long-running servers unreachable once it ran out: the clients pin
    this exact certificate, so a re-issued one (same key, new dates) fails their handshake.
    Pass ``validity`` for a certificate that expires that long after now. ``dns_names`` and
    ``ip_addresses`` go into the subject alternative names (for clients that check host names;
    enclaveml's own clients pin the certificate instead).
    """
    private_key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    binding = bind_public_key(provider, private_key.public_key(), nonce=nonce, hash_alg=hash_alg)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(NO_EXPIRY if validity is None else now + validity)
        .add_extension(
            x509.SubjectAlternativeName(_alternative_names(dns_names, ip_addresses)), critical=False
        )
        # Non-critical on purpose: OpenSSL and mbedTLS refuse certificates with unknown critical extensions.
        .add_extension(x509.UnrecognizedExtension(RATLS_EVIDENCE_OID, binding.evidence), critical=False)
    )
    if binding.endorsements is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(RATLS_ENDORSEMENTS_OID, binding.endorsements), critical=False
        )
    certificate = builder.sign(private_key, hashes.SHA256())
    return RatlsCertificate(certificate, private_key, binding.raw)


def _alternative_names(dns_names: tuple[str, ...], ip_addresses: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    try:
        names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
    except ValueError as exc:
        raise ConfigurationError(f"not an IP address for the certificate: {exc}") from None
    return names


def verify_ratls_certificate(
    certificate: x509.Certificate | bytes,
    *,
    verifier: Verifier,
    policy: Policy,
    nonce: bytes | None = None,
    now: Instant = None,
) -> VerifiedPeer:
    """Verify an RA-TLS certificate: key binding, evidence, optional nonce, and appraisal policy.

    Raises BindingError when the evidence does not bind this certificate's key (or the nonce),
    VerificationError for malformed certificates or evidence, PolicyRejectedError when the
    claims are not acceptable.
    """
    cert = _load_certificate(certificate)
    now_unix = to_unix(now)
    _check_certificate(cert, now_unix)
    try:  # parsed lazily by cryptography: a malformed one raises only here
        spki = spki_der(cert.public_key())
        extensions = {ext.oid: ext.value for ext in cert.extensions}
    except CERTIFICATE_ERRORS as exc:
        raise VerificationError(f"RA-TLS certificate has a malformed key or extension: {exc}") from exc
    standard = extensions.get(RATLS_EVIDENCE_OID)
    if isinstance(standard, x509.UnrecognizedExtension):
        endorsements = extensions.get(RATLS_ENDORSEMENTS_OID)
        verified, got_nonce = verify_key_binding(
            standard.value,
            public_key_spki=spki,
            verifier=verifier,
            policy=policy,
            nonce=nonce,
            endorsements=endorsements.value if isinstance(endorsements, x509.UnrecognizedExtension) else None,
            now=now_unix,
        )
        return VerifiedPeer(cert.public_bytes(serialization.Encoding.DER), verified, False, got_nonce)
    legacy = extensions.get(LEGACY_GRAMINE_OID)
    if isinstance(legacy, x509.UnrecognizedExtension):
        if nonce is not None:
            raise BindingError("legacy Gramine RA-TLS certificates cannot carry a nonce")
        claims = verifier.verify(Evidence(TeeType.SGX, legacy.value), now=now_unix)
        if not hmac.compare_digest(claims.report_data[:32], hashlib.sha256(spki).digest()):
            raise BindingError("legacy RA-TLS quote does not bind this certificate's public key")
        policy.check(claims)
        return VerifiedPeer(cert.public_bytes(serialization.Encoding.DER), claims, True, None)
    raise VerificationError("certificate carries no RA-TLS evidence extension (2.23.133.5.4.9 or legacy)")


def parse_legacy_quote(certificate: x509.Certificate | bytes) -> bytes:
    """Return the raw SGX quote of a legacy Gramine RA-TLS certificate (without verifying it)."""
    cert = _load_certificate(certificate)
    try:
        ext = cert.extensions.get_extension_for_oid(LEGACY_GRAMINE_OID).value
    except x509.ExtensionNotFound as exc:
        raise VerificationError("certificate has no legacy Gramine RA-TLS extension") from exc
    assert isinstance(ext, x509.UnrecognizedExtension)
    return bytes(ext.value)


def _load_certificate(certificate: x509.Certificate | bytes) -> x509.Certificate:
    if isinstance(certificate, x509.Certificate):
        return certificate
    try:
        if certificate.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(certificate)
        return x509.load_der_x509_certificate(certificate)
    except CERTIFICATE_ERRORS as exc:
        raise VerificationError("RA-TLS certificate is not a valid X.509 certificate") from exc


def _check_certificate(cert: x509.Certificate, now_unix: int) -> None:
    now = to_datetime(now_unix)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise VerificationError(
            f"RA-TLS certificate is not valid at {now.isoformat()} "
            f"(valid {cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()})"
        )
    try:
        cert.verify_directly_issued_by(cert)
    except (*CERTIFICATE_ERRORS, InvalidSignature) as exc:
        raise VerificationError("RA-TLS certificate is not correctly self-signed by its own key") from exc


def _decode_tagged(value: bytes, what: str) -> cbor2.CBORTag:
    if len(value) > _MAX_EXTENSION:
        raise VerificationError(f"RA-TLS {what} extension is too large")
    try:
        obj = loads_exact(value)
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise VerificationError(f"RA-TLS {what} extension is not valid CBOR") from exc
    if not isinstance(obj, cbor2.CBORTag):
        raise VerificationError(f"RA-TLS {what} extension is not a tagged CBOR value")
    return obj


def _decode_evidence_extension(value: bytes, aux: bytes) -> tuple[Evidence, bytes]:
    tagged = _decode_tagged(value, "evidence")
    body = tagged.value
    if not (isinstance(body, list | tuple) and len(body) == 2 and all(isinstance(x, bytes) for x in body)):
        raise VerificationError("RA-TLS evidence must be [evidence: bstr, claims: bstr]")
    raw, claims_bytes = body
    if tagged.tag == 60000:
        evidence = Evidence.from_bytes(raw)
        if evidence.tee not in (TeeType.SGX, TeeType.TDX):
            raise VerificationError("RA-TLS tag 60000 must carry an Intel SGX/TDX quote")
        return evidence, claims_bytes
    for tee, tag in _TAG_BY_TEE.items():
        if tag == tagged.tag and tee not in (TeeType.SGX, TeeType.TDX):
            return Evidence(tee, raw, aux), claims_bytes
    raise VerificationError(f"unsupported RA-TLS evidence CBOR tag {tagged.tag}")


def _decode_endorsements(encoded: bytes) -> bytes:
    value = _decode_tagged(encoded, "endorsements").value
    if not isinstance(value, bytes):
        raise VerificationError("RA-TLS endorsements must be a byte string")
    return value


def _check_claims(claims_bytes: bytes, spki: bytes, nonce: bytes | None) -> bytes | None:
    try:
        claims = loads_exact(claims_bytes)
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise VerificationError("RA-TLS claims are not valid CBOR") from exc
    if not isinstance(claims, dict) or "pubkey-hash" not in claims:
        raise VerificationError("RA-TLS claims must be a map with a 'pubkey-hash' entry")
    entry = claims["pubkey-hash"]
    if isinstance(entry, bytes):
        try:
            entry = loads_exact(entry)
        except Exception as exc:  # cbor2 raises several unrelated types on garbage
            raise VerificationError("RA-TLS pubkey-hash is not a CBOR hash-entry") from exc
    if not (isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[1], bytes)):
        raise VerificationError("RA-TLS pubkey-hash must be [hash-alg-id, hash-value]")
    alg, value = entry
    if type(alg) is not int or alg not in _HASHES:  # (a list would not even hash; True == 1)
        raise VerificationError(f"RA-TLS pubkey-hash uses unsupported hash algorithm id {alg!r}")
    if not hmac.compare_digest(_HASHES[alg](spki).digest(), value):
        raise BindingError("RA-TLS evidence binds a different public key than the certificate's")
    got_nonce = claims.get("nonce")
    if got_nonce is not None and not isinstance(got_nonce, bytes):
        raise VerificationError("RA-TLS nonce claim must be a byte string")
    if nonce is not None and (got_nonce is None or not hmac.compare_digest(got_nonce, nonce)):
        raise BindingError("RA-TLS certificate does not carry the expected nonce")
    return got_nonce
