"""What ``cryptography`` raises on certificate content it cannot use, in one tuple.

Why: certificates reach the verifiers from the party being verified (an RA-TLS server's
certificate, the VCEK inside SEV-SNP evidence), and ``cryptography`` parses most fields lazily,
on first access, raising several unrelated exception types: ``ValueError`` for malformed DER,
``TypeError`` for a name attribute of the wrong ASN.1 type (e.g. a BIT STRING common name),
``DuplicateExtension`` and ``UnsupportedGeneralNameType`` for extensions, ``InvalidVersion``,
``UnsupportedAlgorithm``. Each place where such a certificate is read translates all of them
into an enclaveml error (fail closed, typed), so none escapes as a bare exception that callers
handling :class:`~enclaveml.errors.AttestationError` would not expect.
"""

from __future__ import annotations

from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

__all__ = ["CERTIFICATE_ERRORS"]

CERTIFICATE_ERRORS: Final = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
