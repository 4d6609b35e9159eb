"""Key handles and the two small interfaces that sealing and unsealing need.

A sealed artifact's payload is encrypted under a fresh per-file *data key*; that data key
is *wrapped* (AES-256-GCM, with the artifact header as associated data) by a named,
versioned *key-encryption key* (KEK) held by the key broker. Two roles follow:

* :class:`DataKeyWrapper` — used when sealing: wraps a data key under the latest version
  of a named KEK and says which version it used. Implemented by :class:`KeyHandle`
  (local key) and by the broker's admin client (the KEK stays in the broker).
* :class:`DataKeyUnwrapper` — used when unsealing: unwraps a data key given key id and
  version. Implemented by :class:`KeyHandle` / :class:`KeyRing` (keys released to an
  attested workload) and by the broker's release client (releases on demand).

Wrapped data key format (:func:`wrap_key`), 60 bytes for a 32-byte data key::

    nonce (12 random bytes) || AES-256-GCM(kek, nonce, data_key, aad) (32 + 16-byte tag)

Key handles never reveal their secret through ``repr``/``str``, refuse to be pickled, and
compare by identity only, so key bytes do not leak into logs, caches or exception text.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclaveml.errors import ConfigurationError, DecryptionError, KeyNotFoundError

__all__ = [
    "KEY_SIZE",
    "DataKeyUnwrapper",
    "DataKeyWrapper",
    "KeyHandle",
    "KeyRing",
    "WrappedKeyError",
    "unwrap_key",
    "wrap_key",
]

KEY_SIZE = 32
_NONCE_SIZE = 12
_MAX_WRAPPED = 64 + _NONCE_SIZE + 16


def wrap_key(kek: bytes, data_key: bytes, aad: bytes) -> bytes:
    """Wrap ``data_key`` (at most 64 bytes) under ``kek`` with AES-256-GCM bound to ``aad``."""
    if len(kek) != KEY_SIZE:
        raise ConfigurationError("key-encryption keys are 32 bytes (AES-256)")
    if not 0 < len(data_key) <= 64:
        raise ConfigurationError("only keys of 1..64 bytes are wrapped")
    nonce = os.urandom(_NONCE_SIZE)
    return nonce + AESGCM(kek).encrypt(nonce, data_key, aad)


class WrappedKeyError(DecryptionError):
    """A wrapped key did not open under its key-encryption key (damaged, or another key's).

    Its own type so that readers of sealed files can tell a damaged artifact from an unwrapper
    that failed for its own reasons (e.g. a key broker's answer that did not decrypt).
    """


def unwrap_key(kek: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`wrap_key`; any mismatch raises WrappedKeyError and reveals nothing."""
    if len(kek) != KEY_SIZE or not _NONCE_SIZE + 16 < len(wrapped) <= _MAX_WRAPPED:
        raise WrappedKeyError("invalid wrapped key")
    try:
        return AESGCM(kek).decrypt(wrapped[:_NONCE_SIZE], wrapped[_NONCE_SIZE:], aad)
    except InvalidTag:
        raise WrappedKeyError("invalid wrapped key") from None


@runtime_checkable
class DataKeyWrapper(Protocol):
    """Wraps data keys under the current version of a named key-encryption key."""

    def wrap_data_key(self, key_id: str, data_key: bytes, aad: bytes) -> tuple[int, bytes]:
        """Return ``(kek_version, wrapped_data_key)``."""
        ...


@runtime_checkable
class DataKeyUnwrapper(Protocol):
    """Unwraps data keys wrapped by a given key id and version."""

    def unwrap_data_key(self, key_id: str, version: int, wrapped: bytes, aad: bytes) -> bytes:
        """Return the data key, or raise DecryptionError / KeyNotFoundError."""
        ...


class KeyHandle:
    """One version of one key-encryption key, held in memory. It can wrap and unwrap; it cannot be shown."""

    __slots__ = ("_secret", "key_id", "version")

    def __init__(self, key_id: str, version: int, secret: bytes) -> None:
        if not key_id or not isinstance(key_id, str):
            raise ConfigurationError("key_id must be a non-empty string")
        if not isinstance(version, int) or version < 1:
            raise ConfigurationError("key versions start at 1")
        if not isinstance(secret, bytes | bytearray) or len(secret) != KEY_SIZE:
            raise ConfigurationError("key material must be 32 bytes")
        self.key_id = key_id
        self.version = version
        self._secret = bytes(secret)

    @classmethod
    def generate(cls, key_id: str, version: int = 1) -> KeyHandle:
        return cls(key_id, version, AESGCM.generate_key(bit_length=256))

    def wrap_data_key(self, key_id: str, data_key: bytes, aad: bytes) -> tuple[int, bytes]:
        self._require(key_id, self.version)
        return self.version, wrap_key(self._secret, data_key, aad)

    def unwrap_data_key(self, key_id: str, version: int, wrapped: bytes, aad: bytes) -> bytes:
        self._require(key_id, version)
        return unwrap_key(self._secret, wrapped, aad)

    def _require(self, key_id: str, version: int) -> None:
        if key_id != self.key_id or version != self.version:
            raise KeyNotFoundError(
                f"this handle holds key {self.key_id!r} version {self.version}, "
                f"not {key_id!r} version {version}"
            )

    def secret_bytes(self) -> bytes:
        """The raw key. Only for handing to another cryptographic API inside the TEE (e.g. Parquet)."""
        return self._secret

    def __repr__(self) -> str:
        return f"KeyHandle(key_id={self.key_id!r}, version={self.version}, secret=<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("key handles cannot be pickled")

    def __copy__(self) -> KeyHandle:
        raise TypeError("key handles cannot be copied")

    def __deepcopy__(self, memo: dict[int, Any]) -> KeyHandle:
        raise TypeError("key handles cannot be copied")


class KeyRing:
    """Several key handles (ids and versions); unwraps with the matching one, wraps with the newest."""

    def __init__(self, *handles: KeyHandle) -> None:
        self._handles: dict[tuple[str, int], KeyHandle] = {}
        for handle in handles:
            self.add(handle)

    def add(self, handle: KeyHandle) -> None:
        self._handles[(handle.key_id, handle.version)] = handle

    def get(self, key_id: str, version: int) -> KeyHandle:
        try:
            return self._handles[(key_id, version)]
        except KeyError:
            raise KeyNotFoundError(f"no key {key_id!r} version {version} in this key ring") from None

    def wrap_data_key(self, key_id: str, data_key: bytes, aad: bytes) -> tuple[int, bytes]:
        versions = [v for (k, v) in self._handles if k == key_id]
        if not versions:
            raise KeyNotFoundError(f"no key {key_id!r} in this key ring")
        return self._handles[(key_id, max(versions))].wrap_data_key(key_id, data_key, aad)

    def unwrap_data_key(self, key_id: str, version: int, wrapped: bytes, aad: bytes) -> bytes:
        return self.get(key_id, version).unwrap_data_key(key_id, version, wrapped, aad)

    def __len__(self) -> int:
        return len(self._handles)

    def __repr__(self) -> str:
        return f"KeyRing({sorted(self._handles)})"

    def __reduce__(self) -> Any:
        raise TypeError("key rings cannot be pickled")
