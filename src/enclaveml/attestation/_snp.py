"""AMD SEV-SNP verification: the AMD certificate chain, the VCEK's binding and the report signature.

Chain of trust, checked in this order by :class:`SnpVerifier`::

    ARK  pinned (built-in AMD Milan root, or the one configured); self-signed; an ARK carried
     |   in the evidence must be byte-identical to it, never trusted on its own
    ASK  from the evidence's aux if present, else the configured chain; signed by the ARK
     |
    VCEK from the evidence's aux if present, else ``vcek=``; signed by the ASK; its hwID and
     |   TCB extensions must equal the report's CHIP_ID and REPORTED_TCB
    report  ECDSA P-384 / SHA-384 over bytes [0, 0x2A0), checked with the VCEK's key

AMD signs its certificates with RSA-PSS (SHA-384, MGF1-SHA-384, 48-byte salt); certificates
declaring anything else are refused rather than verified with weaker parameters. Every
certificate must be valid at ``now``. No AMD CRL is consulted (none is available offline);
revocation of an ASK or VCEK is therefore not detected.

The byte formats (report, certificate table) live in :mod:`enclaveml.attestation._snp_report`.

Serial number 0: AMD KDS issues VCEKs whose serial number is 0, which RFC 5280 forbids.
``cryptography`` 50.x loads them with a ``CryptographyDeprecationWarning`` that we silence
narrowly (that message, that category) in :func:`_serial_zero_tolerated`. A future
``cryptography`` release will refuse them (``ValueError`` on load, reported here as a
CollateralError naming the cause). When that happens: pin ``cryptography`` below that
release, or extract tbsCertificate, signature, SubjectPublicKeyInfo and the AMD extensions
with a small DER walker and keep using ``cryptography`` for the RSA-PSS and ECDSA checks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import cache
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from enclaveml.attestation._snp_report import (
    SIGNING_KEY_NONE,
    SIGNING_KEY_VCEK,
    SIGNING_KEY_VLEK,
    SnpCertificates,
    SnpReport,
    build_snp_cert_table,
    der_small_uint,
    parse_snp_cert_table,
    parse_snp_report,
    split_der_sequences,
)
from enclaveml.attestation._time import Instant, to_datetime, to_unix
from enclaveml.attestation._x509_errors import CERTIFICATE_ERRORS
from enclaveml.attestation.claims import SnpClaims
from enclaveml.attestation.evidence import Evidence, TeeType
from enclaveml.errors import (
    CollateralError,
    CollateralExpiredError,
    ConfigurationError,
    EnclaveMLError,
    VerificationError,
)

__all__ = [
    "SnpCertificates",
    "SnpReport",
    "SnpVerifier",
    "build_snp_cert_table",
    "parse_snp_aux",
    "parse_snp_cert_table",
    "parse_snp_report",
]

_BUILTIN_ROOTS = "roots/amd_milan_ask_ark.pem"
_AMD_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_SERIAL_WARNING = r"Parsed a serial number which wasn't positive"
_OID_HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")
_OID_TCB = {
    "bootloader": x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.1"),
    "tee": x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.2"),
    "snp": x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.3"),
    "microcode": x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.8"),
}
_CHIP_ID_SIZE = 64


class SnpVerifier:
    """Verifies AMD SEV-SNP attestation reports (Milan/Genoa, VCEK-signed) and returns SnpClaims.

    ``ask_ark_pem`` replaces the built-in AMD Milan chain (PEM: the ARK, optionally the ASK);
    its self-signed ARK becomes the only root accepted. ``vcek`` (DER or PEM) is used when the
    evidence carries no VCEK of its own.
    """

    def __init__(self, *, ask_ark_pem: bytes | None = None, vcek: bytes | None = None) -> None:
        pem = ask_ark_pem if ask_ark_pem is not None else _builtin_ask_ark()
        self._vcek: x509.Certificate | None = None
        try:
            self._ark, self._ask = _load_trust_anchor(pem)
            if vcek is not None:
                self._vcek = _load_certificate(bytes(vcek), "configured VCEK", ConfigurationError)
                if not _is_p384(self._vcek.public_key()):
                    raise ConfigurationError("the configured VCEK does not hold an ECDSA P-384 public key")
        except CERTIFICATE_ERRORS as exc:
            raise ConfigurationError(f"SnpVerifier certificates could not be processed: {exc}") from exc
        self._ark_der = self._ark.public_bytes(Encoding.DER)

    def verify(self, evidence: Evidence, *, now: Instant = None) -> SnpClaims:
        """Check chain, VCEK binding and report signature at ``now``; raise VerificationError on failure."""
        if evidence.tee is not TeeType.SEV_SNP:
            raise VerificationError(f"SnpVerifier cannot verify {evidence.tee.value} evidence")
        at = to_unix(now)
        try:
            return self._verify(evidence, at)
        except CERTIFICATE_ERRORS as exc:
            # cryptography parses certificate fields lazily, so a hostile certificate can fail
            # on first access of a name, algorithm or key anywhere in the checks.
            raise VerificationError(f"SEV-SNP certificate could not be processed: {exc}") from exc

    def _verify(self, evidence: Evidence, at: int) -> SnpClaims:
        report = parse_snp_report(evidence.data)
        _check_signing_key(report)
        carried = parse_snp_aux(evidence.aux)
        if carried.ark is not None:
            ark = _load_certificate(carried.ark, "ARK in the evidence", CollateralError)
            if ark.public_bytes(Encoding.DER) != self._ark_der:
                raise VerificationError(
                    "the ARK carried in the evidence is not the pinned AMD root key; refusing a chain "
                    "anchored anywhere else (configure SnpVerifier(ask_ark_pem=...) to trust another root)"
                )
        ask = self._ask
        if carried.ask is not None:
            ask = _load_certificate(carried.ask, "ASK in the evidence", CollateralError)
        if ask is None:
            raise CollateralError(
                "no ASK certificate: the evidence carries none and the configured chain has only the ARK"
            )
        vcek = self._vcek
        if carried.vcek is not None:
            vcek = _load_certificate(carried.vcek, "VCEK in the evidence", CollateralError)
        if vcek is None:
            raise CollateralError(_missing_vcek_message(report, self._ark))
        _check_issued_by(ask, self._ark, "ASK", "ARK")
        _require_ca(ask, "ASK")
        _check_issued_by(vcek, ask, "VCEK", "ASK")
        chain = (("ARK", self._ark), ("ASK", ask), ("VCEK", vcek))
        for name, cert in chain:
            _check_validity(cert, name, at)
        _check_vcek_matches_report(vcek, report)
        _check_report_signature(vcek, report)
        return _claims(report, min(cert.not_valid_after_utc for _, cert in chain))


def parse_snp_aux(aux: bytes) -> SnpCertificates:
    """Find the SEV-SNP certificates in ``Evidence.aux``.

    Accepts a certificate table (configfs-tsm ``auxblob``), PEM certificates, or one or more
    concatenated DER certificates; DER/PEM certificates are sorted by what they are (EC key:
    VCEK or VLEK; self-issued RSA: ARK; other RSA: ASK). Empty ``aux`` means no certificates.
    """
    aux = bytes(aux)
    if not aux:
        return SnpCertificates()
    if aux.lstrip().startswith(b"-----BEGIN"):
        try:
            with _serial_zero_tolerated():
                loaded = x509.load_pem_x509_certificates(aux)
        except CERTIFICATE_ERRORS as exc:
            raise CollateralError(f"SEV-SNP aux PEM certificates could not be parsed: {exc}") from exc
        return _classify(loaded)
    ders = split_der_sequences(aux)
    if ders is not None:
        return _classify([_load_certificate(der, "certificate in aux", CollateralError) for der in ders])
    return parse_snp_cert_table(aux)


def _classify(certs: list[x509.Certificate]) -> SnpCertificates:
    try:
        return _classify_loaded(certs)
    except CERTIFICATE_ERRORS as exc:  # an unsupported key type or a malformed name, read lazily
        raise CollateralError(f"certificate in SEV-SNP aux could not be processed: {exc}") from exc


@cache
def _builtin_ask_ark() -> bytes:
    return resources.files("enclaveml.attestation").joinpath(_BUILTIN_ROOTS).read_bytes()


@contextmanager
def _serial_zero_tolerated() -> Iterator[None]:
    """Silence only cryptography's warning about AMD's serial-0 VCEKs (see module docstring).

    ``catch_warnings`` swaps the process-wide filter list; on Python 3.11 another thread's
    warnings may briefly be filtered by it too. That affects warning display only, never a check.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SERIAL_WARNING, category=CryptographyDeprecationWarning)
        yield


def _load_certificate(blob: bytes, what: str, error: type[EnclaveMLError]) -> x509.Certificate:
    try:
        with _serial_zero_tolerated():
            if blob.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(blob)
            return x509.load_der_x509_certificate(blob)
    except CERTIFICATE_ERRORS as exc:
        hint = (
            " (this cryptography release refuses AMD's serial-0 VCEKs; see _snp)"
            if "serial" in str(exc)
            else ""
        )
        raise error(f"{what} is not a valid X.509 certificate (DER or PEM): {exc}{hint}") from exc


def _load_trust_anchor(pem: bytes) -> tuple[x509.Certificate, x509.Certificate | None]:
    """Return (ARK, ASK or None) from a PEM chain, checking the ARK signs itself and the ASK."""
    try:
        certs = x509.load_pem_x509_certificates(bytes(pem))
    except CERTIFICATE_ERRORS as exc:
        raise ConfigurationError(f"ask_ark_pem is not a PEM certificate chain: {exc}") from exc
    roots = [c for c in certs if c.subject == c.issuer]
    others = [c for c in certs if c.subject != c.issuer]
    if len(roots) != 1 or len(others) > 1:
        raise ConfigurationError(
            f"ask_ark_pem must hold one self-signed ARK and at most one ASK; found {len(roots)} "
            f"self-signed and {len(others)} other certificate(s)"
        )
    ark, ask = roots[0], (others[0] if others else None)
    try:
        _check_issued_by(ark, ark, "ARK", "ARK itself")
        _require_ca(ark, "ARK")
        if ask is not None:
            _check_issued_by(ask, ark, "ASK", "ARK")
            _require_ca(ask, "ASK")
    except VerificationError as exc:
        raise ConfigurationError(f"ask_ark_pem is not a valid AMD chain: {exc}") from exc
    return ark, ask


def _classify_loaded(certs: list[x509.Certificate]) -> SnpCertificates:
    found: dict[str, bytes] = {}
    for cert in certs:
        key = cert.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            kind = "vlek" if any(n.value == "SEV-VLEK" for n in names) else "vcek"
        elif isinstance(key, rsa.RSAPublicKey):
            kind = "ark" if cert.subject == cert.issuer else "ask"
        else:
            raise CollateralError(f"unexpected certificate in SEV-SNP aux: {cert.subject.rfc4514_string()}")
        if kind in found:
            raise CollateralError(f"SEV-SNP aux holds more than one {kind.upper()} certificate")
        found[kind] = cert.public_bytes(Encoding.DER)
    return SnpCertificates(**found)


def _check_signing_key(report: SnpReport) -> None:
    if report.signing_key == SIGNING_KEY_VCEK:
        return
    if report.signing_key == SIGNING_KEY_VLEK:
        raise VerificationError("SEV-SNP report is signed by a VLEK; only VCEK-signed reports are supported")
    if report.signing_key == SIGNING_KEY_NONE:
        raise VerificationError("SEV-SNP report is not signed (SIGNING_KEY = 7)")
    raise VerificationError(f"SEV-SNP report names a reserved SIGNING_KEY value {report.signing_key}")


def _check_issued_by(cert: x509.Certificate, issuer: x509.Certificate, name: str, issuer_name: str) -> None:
    if cert.issuer != issuer.subject:
        raise VerificationError(
            f"{name} certificate was not issued by the {issuer_name}: its issuer is "
            f"'{cert.issuer.rfc4514_string()}', the {issuer_name} is '{issuer.subject.rfc4514_string()}'"
        )
    if (
        cert.signature_algorithm_oid != x509.SignatureAlgorithmOID.RSASSA_PSS
        or cert.signature_algorithm_parameters != _AMD_PSS
        or not isinstance(cert.signature_hash_algorithm, hashes.SHA384)
    ):
        raise VerificationError(
            f"{name} certificate is not signed with RSA-PSS (SHA-384, MGF1-SHA-384, salt 48) as AMD's are"
        )
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise VerificationError(
            f"the {issuer_name} does not hold an RSA key, so it cannot have signed the {name}"
        )
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _AMD_PSS, hashes.SHA384())
    except InvalidSignature as exc:
        raise VerificationError(
            f"{name} certificate signature does not verify with the {issuer_name}'s key"
        ) from exc


def _require_ca(cert: x509.Certificate, name: str) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError) as exc:
        raise VerificationError(f"{name} certificate has no usable basicConstraints extension") from exc
    if not constraints.ca:
        raise VerificationError(f"{name} certificate is not a CA certificate")


def _check_validity(cert: x509.Certificate, name: str, at: int) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start.timestamp() <= at <= end.timestamp():
        raise CollateralExpiredError(
            f"{name} certificate is not valid at {to_datetime(at).isoformat()}: it is valid from "
            f"{start.isoformat()} to {end.isoformat()}"
        )


def _amd_extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        raise CollateralError(f"VCEK extensions could not be parsed: {exc}") from exc
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise CollateralError(f"VCEK extension {oid.dotted_string} has an unexpected type")
    return value.value


def _check_vcek_matches_report(vcek: x509.Certificate, report: SnpReport) -> None:
    hwid = _amd_extension(vcek, _OID_HWID)
    if hwid is not None and len(hwid) == _CHIP_ID_SIZE + 2 and hwid[:2] == b"\x04\x40":
        hwid = hwid[2:]  # tolerate the hwID wrapped as a DER OCTET STRING
    if hwid is None or len(hwid) != _CHIP_ID_SIZE:
        raise VerificationError("VCEK has no 64-byte hwID extension (1.3.6.1.4.1.3704.1.4); is it a VCEK?")
    if hwid != report.chip_id:
        masked = " (the host masked CHIP_ID, so no VCEK can match)" if report.mask_chip_key else ""
        raise VerificationError(
            f"VCEK hwID does not match the report's CHIP_ID{masked}: the VCEK belongs to another chip"
        )
    mismatched = []
    for component, oid in _OID_TCB.items():
        raw = _amd_extension(vcek, oid)
        if raw is None:
            raise VerificationError(f"VCEK lacks the {component} TCB extension ({oid.dotted_string})")
        certified = der_small_uint(raw, component)
        reported: int = getattr(report.reported_tcb, component)
        if certified != reported:
            mismatched.append(f"{component} {certified} != {reported}")
    if mismatched:
        raise VerificationError(
            f"VCEK TCB does not match the report's REPORTED_TCB ({report.reported_tcb}): "
            f"{', '.join(mismatched)}; fetch the VCEK for the reported TCB"
        )


def _check_report_signature(vcek: x509.Certificate, report: SnpReport) -> None:
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not _is_p384(key):
        raise VerificationError("VCEK does not hold an ECDSA P-384 public key")
    signature = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        key.verify(signature, report.signed_data, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise VerificationError("SEV-SNP report signature does not verify with the VCEK") from exc


def _is_p384(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)


def _missing_vcek_message(report: SnpReport, ark: x509.Certificate) -> str:
    # AMD names its roots "ARK-<product>", and KDS serves VCEKs per product.
    names = ark.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    product = cn.removeprefix("ARK-") if cn.startswith("ARK-") else "<product>"
    tcb = report.reported_tcb
    url = (
        f"https://kdsintf.amd.com/vcek/v1/{product}/{report.chip_id.hex()}?blSPL={tcb.bootloader}"
        f"&teeSPL={tcb.tee}&snpSPL={tcb.snp}&ucodeSPL={tcb.microcode}"
    )
    return (
        "no VCEK certificate: the evidence's aux carries none and SnpVerifier was not given vcek=. "
        "Collect evidence with its certificate table (configfs-tsm auxblob), or download the VCEK "
        f"from AMD KDS ({url}) and pass it as SnpVerifier(vcek=...)"
    )


def _claims(report: SnpReport, expiry: datetime) -> SnpClaims:
    return SnpClaims(
        tee=TeeType.SEV_SNP,
        measurement=report.measurement,
        report_data=report.report_data,
        debug=report.debug,
        tcb_status=None,
        collateral_expiry=expiry,
        host_data=report.host_data,
        policy=report.policy,
        reported_tcb=report.reported_tcb,
        chip_id=report.chip_id,
        guest_svn=report.guest_svn,
        vmpl=report.vmpl,
        family_id=report.family_id,
        image_id=report.image_id,
        id_key_digest=report.id_key_digest,
        author_key_digest=report.author_key_digest,
        report_version=report.version,
        platform_info=report.platform_info,
    )
