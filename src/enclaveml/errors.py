"""The one exception hierarchy of enclaveml.

Every error raised on purpose by enclaveml derives from :class:`EnclaveMLError`, so
callers can catch the whole family at one boundary. Third-party exceptions (dcap-qvl's
``ValueError``, ``cryptography``'s ``InvalidSignature``, ``OSError`` from a TEE device,
``httpx`` transport errors) are translated where they cross into our code, with the
original kept as ``__cause__``.

::

    EnclaveMLError
    ├── ConfigurationError          bad arguments, files or settings given by the operator
    ├── AttestationError
    │   ├── EvidenceError           evidence could not be collected or decoded
    │   │   └── TEENotAvailableError  no supported TEE interface on this machine
    │   ├── VerificationError       signature, certificate chain or format check failed
    │   │   ├── CollateralError     collateral missing, malformed or unfetchable
    │   │   └── CollateralExpiredError  `now` lies outside the collateral's validity window
    │   ├── PolicyRejectedError     verified claims do not satisfy the appraisal policy
    │   ├── BindingError            evidence is not bound to the expected key / nonce
    │   └── AttestationBusyError    the server cannot produce fresh evidence now: retry later
    ├── CryptoError
    │   └── DecryptionError         authentication failed; says nothing more (no oracle)
    └── KeyBrokerError              the key broker refused or failed a request
        ├── KeyNotFoundError        no such key (or version)
        ├── KeyDisabledError        the key exists but is disabled
        ├── KeyReleaseDeniedError   attestation, binding, nonce or policy check failed: no key
        ├── AuthorizationError      missing/invalid admin token or scope
        └── StorageError            the broker's database failed or is inconsistent

Messages say what failed and what to do. They never contain key material or plaintext.
"""

from __future__ import annotations

__all__ = [
    "AttestationBusyError",
    "AttestationError",
    "AuthorizationError",
    "BindingError",
    "CollateralError",
    "CollateralExpiredError",
    "ConfigurationError",
    "CryptoError",
    "DecryptionError",
    "EnclaveMLError",
    "EvidenceError",
    "KeyBrokerError",
    "KeyDisabledError",
    "KeyNotFoundError",
    "KeyReleaseDeniedError",
    "PolicyRejectedError",
    "StorageError",
    "TEENotAvailableError",
    "VerificationError",
]


class EnclaveMLError(Exception):
    """Root of every error enclaveml raises on purpose."""


class ConfigurationError(EnclaveMLError):
    """An argument, file or setting supplied by the operator is invalid."""


class AttestationError(EnclaveMLError):
    """Base class of everything that goes wrong while producing or checking evidence."""


class EvidenceError(AttestationError):
    """Evidence could not be collected from the TEE, or could not be decoded."""


class TEENotAvailableError(EvidenceError):
    """No supported TEE interface was found; enclaveml never falls back to simulation."""


class VerificationError(AttestationError):
    """The evidence failed a cryptographic or structural check (signature, chain, format)."""


class CollateralError(VerificationError):
    """Verification collateral is missing, malformed or could not be fetched."""


class CollateralExpiredError(CollateralError):
    """The verification time lies outside the collateral's or certificates' validity window."""


class PolicyRejectedError(AttestationError):
    """Verified claims were rejected by an appraisal policy rule.

    ``rule`` names the rule that rejected, ``observed`` is the value it saw and
    ``expected`` describes what it wanted, so operators can fix the policy or the workload.
    """

    def __init__(self, rule: str, observed: str, expected: str, *, detail: str = "") -> None:
        self.rule = rule
        self.observed = observed
        self.expected = expected
        self.detail = detail
        message = f"policy rule '{rule}' rejected the evidence: observed {observed}; expected {expected}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class BindingError(AttestationError):
    """The evidence does not bind the expected public key, nonce or report data."""


class AttestationBusyError(AttestationError):
    """The server refused to produce fresh evidence for now (429/503); nothing was verified.

    Not a verdict on the server: ``retry_after_s`` (from its ``Retry-After``) says when to ask
    again. Until a check passes the server is still not trusted with data.
    """

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CryptoError(EnclaveMLError):
    """Base class of cryptographic failures outside attestation."""


class DecryptionError(CryptoError):
    """Decryption or authentication failed. Deliberately says nothing else."""


class KeyBrokerError(EnclaveMLError):
    """The key broker refused or failed a request."""


class KeyNotFoundError(KeyBrokerError):
    """The named key (or key version) does not exist."""


class KeyDisabledError(KeyBrokerError):
    """The key exists but is disabled: nothing is wrapped or released with it."""


class KeyReleaseDeniedError(KeyBrokerError):
    """Key release refused: nonce, evidence, binding or policy check failed. No key material was sent.

    ``rule`` names the check that failed (a policy rule name, or ``nonce`` / ``binding`` /
    ``evidence``), ``observed`` what was seen.
    """

    def __init__(self, message: str, *, rule: str = "", observed: str = "", expected: str = "") -> None:
        self.rule = rule
        self.observed = observed
        self.expected = expected
        super().__init__(message)


class AuthorizationError(KeyBrokerError):
    """The admin request lacks a valid bearer token with the required scope."""


class StorageError(KeyBrokerError):
    """The broker's storage failed or holds inconsistent data."""
