"""The workload side of key release: prove what we are, get one key-encryption key back.

:class:`KeyBrokerClient` runs inside the TEE. One release (``docs/kbs-protocol.md``):

1. ``POST /v1/challenge`` → a 32-byte single-use nonce;
2. a fresh ephemeral HPKE key pair, made for this release only and dropped after it;
3. evidence from the TEE whose report data is ``SHA-256(nonce || public_key) || 32 zero bytes``,
   so the broker knows the key it encrypts to lives inside the attested workload;
4. ``POST /v1/keys/{id}/release`` with nonce, evidence, public key and KEM;
5. HPKE-decrypt the answer with ``info = "enclaveml-kbs-release-v1" 0x00 key_id 0x00 version``
   and wrap the 32 bytes in a :class:`~enclaveml.crypto.keys.KeyHandle`.

The client also implements :class:`~enclaveml.crypto.keys.DataKeyUnwrapper`: unsealing asks
for ``(key_id, version)`` and the client releases that version once, then keeps its handle in
memory (never on disk) for later files. Key bytes appear in no log line, repr or exception.
With ``max_key_age_s`` a handle older than that is released afresh before its next use, so a
long-lived reader (``kms.parquet.read_table`` on new files for days) stops opening them within
that time once the owner disables the key, retires the version or changes the policy at the
broker. (A pyarrow dataset object keeps the keys it unwrapped itself: docs/formats.md.)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from types import TracebackType
from typing import Any

import httpx
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from enclaveml.attestation.evidence import EvidenceProvider
from enclaveml.crypto.keys import KEY_SIZE, KeyHandle
from enclaveml.errors import ConfigurationError, DecryptionError, KeyBrokerError
from enclaveml.kms._http import BrokerHttp, Verify, b64d, b64e, key_path

# The byte formats both ends must agree on live in one place, shared with the broker.
from enclaveml.kms._release import KEMS, expected_report_data, release_info

__all__ = ["KEMS", "KeyBrokerClient"]

_log = logging.getLogger(__name__)

_NONCE_SIZE = 32
_SUITES = {
    "MLKEM768-X25519": hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    "X25519": hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}
_Private = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey


def _ephemeral_key_pair(kem: str) -> tuple[_Private, bytes]:
    """A fresh key pair and its wire encoding (hybrid: ML-KEM-768 public key || X25519 raw key)."""
    classical = x25519.X25519PrivateKey.generate()
    classical_public = classical.public_key().public_bytes_raw()
    if kem == "X25519":
        return classical, classical_public
    post_quantum = mlkem.MLKEM768PrivateKey.generate()
    public = post_quantum.public_key().public_bytes_raw() + classical_public
    return hpke.MLKEM768X25519PrivateKey(post_quantum, classical), public


class KeyBrokerClient:
    """Releases key-encryption keys from the broker to this attested workload.

    ``verify`` pins the broker's TLS identity: a CA or certificate file path (what
    ``enclaveml kbs serve`` writes), an ``ssl.SSLContext``, or True for the system CAs.
    ``transport`` replaces the network (tests only). ``max_key_age_s`` bounds how long a
    released key is reused before it is released again (default: until :meth:`forget`).
    """

    def __init__(
        self,
        url: str,
        evidence_provider: EvidenceProvider,
        *,
        verify: Verify = True,
        kem: str = "MLKEM768-X25519",
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        max_key_age_s: float | None = None,
    ) -> None:
        if max_key_age_s is not None and (
            isinstance(max_key_age_s, bool)
            or not isinstance(max_key_age_s, int | float)
            or not 0 < max_key_age_s < math.inf
        ):
            raise ConfigurationError(
                f"max_key_age_s must be a positive number of seconds, not {max_key_age_s!r}"
            )
        if kem not in _SUITES:
            raise ConfigurationError(f"unknown KEM {kem!r}; the key broker speaks {', '.join(KEMS)}")
        if not isinstance(evidence_provider, EvidenceProvider):
            raise ConfigurationError("evidence_provider must implement EvidenceProvider (tee, collect)")
        self.kem = kem
        self._provider = evidence_provider
        self._http = BrokerHttp(url, verify=verify, timeout=timeout, transport=transport)
        self.max_key_age_s = max_key_age_s
        self._handles: dict[tuple[str, int], KeyHandle] = {}
        self._obtained: dict[tuple[str, int], float] = {}  # time.monotonic() of each handle's release
        # Held across a cache miss so concurrent unwraps of one file set do not each
        # spend a nonce and an attestation on the same key version.
        self._cache_lock = threading.Lock()

    @property
    def url(self) -> str:
        return self._http.url

    def release(self, key_id: str, version: int | None = None) -> KeyHandle:
        """Attest and release ``key_id`` (``version``, or the latest enabled one when None).

        Raises KeyReleaseDeniedError (naming the failing rule), KeyNotFoundError,
        KeyDisabledError or KeyBrokerError; every call spends one fresh nonce.
        """
        path = key_path(key_id)
        if version is not None and (not isinstance(version, int) or version < 1):
            raise ConfigurationError("key versions start at 1")
        challenge = self._http.request("POST", "/v1/challenge")
        nonce = b64d(challenge.get("nonce"), "nonce")
        if len(nonce) != _NONCE_SIZE:
            raise KeyBrokerError(f"the key broker sent a {len(nonce)}-byte nonce; the protocol uses 32")
        private_key, public_key = _ephemeral_key_pair(self.kem)
        evidence = self._provider.collect(expected_report_data(nonce, public_key))
        body: dict[str, Any] = {
            "nonce": b64e(nonce),
            "evidence": b64e(evidence.to_bytes()),
            "public_key": b64e(public_key),
            "kem": self.kem,
            "version": version,
        }
        answer = self._http.request("POST", f"/v1/keys/{path}/release", json_body=body)
        released = answer.get("version")
        if answer.get("key_id") != key_id or not isinstance(released, int) or released < 1:
            raise KeyBrokerError(f"the key broker answered a release of {key_id!r} for another key")
        if version is not None and released != version:
            raise KeyBrokerError(f"asked for {key_id!r} version {version}, the broker released {released}")
        if answer.get("kem") != self.kem:
            raise KeyBrokerError(f"the key broker encrypted to KEM {answer.get('kem')!r}, not {self.kem}")
        ciphertext = b64d(answer.get("ciphertext"), "ciphertext")
        try:
            secret = _SUITES[self.kem].decrypt(ciphertext, private_key, info=release_info(key_id, released))
        except InvalidTag:
            # Deliberately uninformative: the caller cannot act on details, an attacker could.
            raise DecryptionError("the released key could not be decrypted") from None
        if len(secret) != KEY_SIZE:
            raise KeyBrokerError(f"the key broker released {len(secret)} bytes; keys are {KEY_SIZE} bytes")
        _log.info("released key %r version %d (%s evidence)", key_id, released, evidence.tee.value)
        return KeyHandle(key_id, released, secret)

    def handle(self, key_id: str, version: int) -> KeyHandle:
        """The cached handle of ``(key_id, version)``, releasing it first when not held (or too old).

        A handle older than ``max_key_age_s`` is dropped before the new release is asked for, so
        a refusal (key disabled, version retired, policy changed) leaves nothing cached.
        """
        entry = (key_id, version)
        with self._cache_lock:
            cached = self._handles.get(entry)
            age_limit = self.max_key_age_s
            if (
                cached is not None
                and age_limit is not None
                and time.monotonic() - self._obtained[entry] > age_limit
            ):
                del self._handles[entry], self._obtained[entry]
                cached = None
            if cached is None:
                cached = self.release(key_id, version)
                self._handles[entry] = cached
                self._obtained[entry] = time.monotonic()
            return cached

    def unwrap_data_key(self, key_id: str, version: int, wrapped: bytes, aad: bytes) -> bytes:
        """:class:`DataKeyUnwrapper`: unwrap with the released KEK, releasing it on first use."""
        return self.handle(key_id, version).unwrap_data_key(key_id, version, wrapped, aad)

    @property
    def cached_versions(self) -> list[tuple[str, int]]:
        """The ``(key_id, version)`` pairs whose handles this client holds (never the keys)."""
        # dict.copy is atomic under the GIL: no lock, so a repr never waits on a release in flight.
        return sorted(self._handles.copy())

    def forget(self) -> None:
        """Drop every cached key handle (e.g. after a policy change should take effect)."""
        with self._cache_lock:
            self._handles.clear()
            self._obtained.clear()

    def close(self) -> None:
        """Close the connection pool and forget released keys."""
        self.forget()
        self._http.close()

    def __enter__(self) -> KeyBrokerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KeyBrokerClient(url={self.url!r}, kem={self.kem!r}, cached={self.cached_versions})"

    def __reduce__(self) -> Any:
        raise TypeError("KeyBrokerClient holds released keys and cannot be pickled")
