"""The pieces of a key release: KEMs, the evidence binding and its appraisal, the HPKE seal.

Byte formats (``docs/kbs-protocol.md``):

* workload public key: X25519 raw (32 bytes); MLKEM768-X25519 = ML-KEM-768 public key
  (1184 bytes) || X25519 raw (32 bytes);
* expected report data: ``SHA-256(nonce || public_key) || 32 zero bytes``;
* HPKE base mode, suite (KEM, HKDF-SHA256, AES-256-GCM), plaintext the 32-byte KEK,
  ``info = "enclaveml-kbs-release-v1" 0x00 key_id 0x00 version (ascii)``; the output is
  ``enc || ciphertext`` as ``cryptography``'s ``Suite.encrypt`` returns it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Final

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from enclaveml.attestation import Evidence, Policy, Verifier, appraise_evidence, policy_from_dict
from enclaveml.attestation._time import Instant
from enclaveml.attestation.claims import Claims
from enclaveml.errors import (
    AttestationError,
    BindingError,
    ConfigurationError,
    KeyReleaseDeniedError,
    PolicyRejectedError,
    StorageError,
)

__all__ = [
    "DEFAULT_KEM",
    "KEMS",
    "PublicKey",
    "RecordingVerifier",
    "UnusablePublicKeyError",
    "appraise_release",
    "expected_report_data",
    "parse_public_key",
    "release_info",
    "seal_kek",
    "unloadable_policy",
]

_log = logging.getLogger(__name__)

DEFAULT_KEM: Final = "MLKEM768-X25519"
KEMS: Final = ("MLKEM768-X25519", "X25519")
_MLKEM768_PUBLIC = 1184
_X25519_PUBLIC = 32
_SUITES = {
    "MLKEM768-X25519": hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    "X25519": hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}

PublicKey = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey


class UnusablePublicKeyError(ValueError):
    """The workload's public key has the wrong size or is not a valid key for its KEM."""


def parse_public_key(kem: str, raw: bytes) -> PublicKey:
    """Decode the workload's ephemeral public key for ``kem``; raises UnusablePublicKeyError."""
    try:
        if kem == "X25519":
            if len(raw) != _X25519_PUBLIC:
                raise UnusablePublicKeyError(
                    f"an X25519 public key is {_X25519_PUBLIC} bytes, got {len(raw)}"
                )
            return x25519.X25519PublicKey.from_public_bytes(raw)
        if kem == "MLKEM768-X25519":
            size = _MLKEM768_PUBLIC + _X25519_PUBLIC
            if len(raw) != size:
                raise UnusablePublicKeyError(f"an MLKEM768-X25519 public key is {size} bytes, got {len(raw)}")
            return hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC]),
                x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM768_PUBLIC:]),
            )
    except UnusablePublicKeyError:
        raise
    except ValueError as exc:
        raise UnusablePublicKeyError(f"the {kem} public key is not a valid key") from exc
    raise UnusablePublicKeyError(f"unknown KEM {kem!r}; known: {', '.join(KEMS)}")


def expected_report_data(nonce: bytes, public_key: bytes) -> bytes:
    """The 64 bytes of report data that bind a release's evidence to its nonce and public key."""
    return hashlib.sha256(nonce + public_key).digest() + bytes(32)


def release_info(key_id: str, version: int) -> bytes:
    """HPKE ``info``: a ciphertext for one key version cannot pass as another's."""
    return b"enclaveml-kbs-release-v1\x00" + key_id.encode("utf-8") + b"\x00" + str(version).encode("ascii")


def seal_kek(kem: str, public_key: PublicKey, kek: bytes, key_id: str, version: int) -> bytes:
    """HPKE-encrypt ``kek`` to the workload. Raises UnusablePublicKeyError (e.g. a low-order point)."""
    try:
        return _SUITES[kem].encrypt(kek, public_key, info=release_info(key_id, version))
    except ValueError as exc:
        raise UnusablePublicKeyError(f"cannot encrypt to this {kem} public key") from exc


class RecordingVerifier:
    """Keeps the claims a verifier returned, so a binding or policy denial can audit the measurement."""

    def __init__(self, inner: Verifier) -> None:
        self._inner = inner
        self.claims: Claims | None = None

    def verify(self, evidence: Evidence, *, now: Instant = None) -> Claims:
        self.claims = self._inner.verify(evidence, now=now)
        return self.claims

    @property
    def measurement(self) -> str | None:
        return self.claims.measurement.hex() if self.claims is not None else None


def appraise_release(
    policy_json: str, evidence_bytes: bytes, report_data: bytes, verifier: RecordingVerifier, now: float
) -> Claims:
    """Decode, verify, check the binding and appraise; every refusal becomes KeyReleaseDeniedError.

    The rule is ``evidence`` (undecodable or unverifiable), ``binding`` (report data is not
    ``expected_report_data``), ``policy_invalid`` (the stored policy no longer loads, e.g. one
    written by an older enclaveml that this one refuses) or the name of the policy rule that
    rejected the claims. Evidence
    comes from whoever asks, so an exception no verifier should raise (a parser bug on hostile
    input) is a denial too, audited like any other, not a 500 without an audit record.
    """
    try:
        policy = _load_policy(policy_json)
    except StorageError as exc:
        raise KeyReleaseDeniedError(
            f"{exc}: {exc.__cause__}",
            rule="policy_invalid",
            observed="a stored policy this enclaveml cannot load",
            expected="a valid release policy (enclaveml kbs policy set)",
        ) from None
    try:
        evidence = Evidence.from_bytes(evidence_bytes)
        return appraise_evidence(
            evidence, verifier=verifier, policy=policy, expected_report_data=report_data, now=now
        )
    except PolicyRejectedError as exc:
        raise KeyReleaseDeniedError(
            str(exc), rule=exc.rule, observed=exc.observed, expected=exc.expected
        ) from None
    except BindingError as exc:
        observed = verifier.claims.report_data.hex() if verifier.claims is not None else ""
        raise KeyReleaseDeniedError(
            str(exc), rule="binding", observed=observed, expected=report_data.hex()
        ) from None
    except Exception as exc:  # noqa: BLE001 - fail closed, audited
        if isinstance(exc, AttestationError | ConfigurationError):
            message = f"evidence rejected: {exc}"  # our messages carry no data
        else:  # a verifier bug on hostile input: its text stays out, its traceback goes to the log
            _log.error(
                "evidence verification raised %s; the release is denied", type(exc).__name__, exc_info=exc
            )
            message = f"evidence could not be verified ({type(exc).__name__})"
        raise KeyReleaseDeniedError(
            message, rule="evidence", observed=type(exc).__name__, expected="valid evidence"
        ) from None


def unloadable_policy(policy_json: str) -> str | None:
    """Why a stored policy does not load (for the broker's check at start-up), or None."""
    try:
        _load_policy(policy_json)
    except StorageError as exc:
        return str(exc.__cause__)
    return None


@functools.lru_cache(maxsize=256)
def _load_policy(policy_json: str) -> Policy:
    """Parse a stored policy once per distinct JSON (policies are immutable; unsafe ones warn once)."""
    try:
        return policy_from_dict(json.loads(policy_json))
    except (ValueError, ConfigurationError) as exc:
        raise StorageError("the stored release policy does not load; set the policy again") from exc
