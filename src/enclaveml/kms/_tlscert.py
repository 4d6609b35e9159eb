"""A self-signed TLS certificate for a development key broker.

Production brokers should present a certificate from the operator's own CA; for development
and tests a self-signed one is enough, because clients pin the broker's certificate file
(``--ca``) rather than trusting a public CA. :func:`self_signed_certificate` keeps the private key
in memory (``enclaveml kbs serve`` and the demo hand it to the server through an anonymous memory
file, so no copy is left on disk however the process ends); :func:`create_self_signed_certificate`
writes both files, the key with mode 0600.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enclaveml._files import write_atomically
from enclaveml.errors import ConfigurationError

__all__ = ["SelfSignedCertificate", "create_self_signed_certificate", "self_signed_certificate"]


@dataclass(frozen=True)
class SelfSignedCertificate:
    certificate_pem: bytes
    private_key_pem: bytes = field(repr=False)
    fingerprint: str  # SHA-256 of the DER certificate, hex

    def write_certificate(self, path: str | Path) -> None:
        """Write the certificate (public: what clients pin) atomically, mode 0644."""
        _write(Path(path), self.certificate_pem, 0o644)


def create_self_signed_certificate(
    cert_path: str | Path,
    key_path: str | Path,
    *,
    hostnames: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    days: int = 365,
) -> str:
    """Write a self-signed ECDSA P-256 server certificate and its key; return the SHA-256 fingerprint (hex).

    See :func:`self_signed_certificate`; the key is written with mode 0600 from its first byte.
    """
    made = self_signed_certificate(hostnames=hostnames, ip_addresses=ip_addresses, days=days)
    _write(Path(key_path), made.private_key_pem, 0o600)
    made.write_certificate(cert_path)
    return made.fingerprint


def self_signed_certificate(
    *,
    hostnames: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    days: int = 365,
) -> SelfSignedCertificate:
    """A self-signed ECDSA P-256 server certificate and its key, in memory.

    The certificate names ``hostnames`` and ``ip_addresses`` as subject alternative names so
    clients can keep host-name checking on while pinning this file as their only trust anchor.
    """
    if not hostnames and not ip_addresses:
        raise ConfigurationError("a broker certificate needs at least one host name or IP address")
    if not 0 < days <= 3650:
        raise ConfigurationError("certificate validity must be 1..3650 days")
    try:
        ips = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    except ValueError as exc:
        raise ConfigurationError(f"invalid IP address for the broker certificate: {exc}") from exc
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0] if hostnames else "enclaveml-kbs")]
    )
    now = datetime.now(UTC)
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([*(x509.DNSName(h) for h in hostnames), *ips]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return SelfSignedCertificate(
        certificate.public_bytes(serialization.Encoding.PEM),
        key_pem,
        certificate.fingerprint(hashes.SHA256()).hex(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` from the first byte (a key never exists with wider permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(path, data, mode=mode)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror}") from exc
