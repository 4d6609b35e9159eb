"""The broker's root key: where it comes from, and the one thing it does (wrap KEK material).

The root key is 32 bytes that wrap every stored key-encryption key (AES-256-GCM, see
:meth:`RootKey.wrap`). It comes from a file or from ``$ENCLAVEML_KBS_ROOT_KEY``; it is never
written into the database, only a fingerprint (HMAC-SHA256 of a fixed label) that lets the
broker refuse, at startup, a root key other than the one the database was created with.

Accepted encodings (file contents or environment value), surrounding whitespace ignored:
raw 32 bytes (files only), 64 hexadecimal digits, or standard/URL-safe base64 of 32 bytes.

Location rule: a root-key file inside the database's directory (or below it) is **refused**,
not merely warned about. Whoever copies or backs up the database directory would otherwise
carry away the key that decrypts it, which defeats wrapping the keys at all. Files readable
or writable by "other" are refused; group access only warns (a service group may need it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from enclaveml.crypto.keys import KEY_SIZE, unwrap_key, wrap_key
from enclaveml.errors import ConfigurationError, DecryptionError, StorageError

__all__ = [
    "ROOT_KEY_ENV",
    "RootKey",
    "check_root_key_location",
    "generate_root_key_file",
    "load_root_key",
    "parse_root_key",
]

ROOT_KEY_ENV = "ENCLAVEML_KBS_ROOT_KEY"
_KEK_AAD_LABEL = b"enclaveml-kbs-key-v1"
_FINGERPRINT_LABEL = b"enclaveml-kbs-root-key-check-v1"
_MAX_FILE = 4096

_log = logging.getLogger("enclaveml.kms")


def kek_aad(key_id: str, version: int) -> bytes:
    """AAD of a stored KEK: ``"enclaveml-kbs-key-v1" 0x00 key_id 0x00 version (ascii)``."""
    return _KEK_AAD_LABEL + b"\x00" + key_id.encode("utf-8") + b"\x00" + str(version).encode("ascii")


class RootKey:
    """The 32-byte root key. Cannot be printed, pickled or copied; wraps and unwraps KEKs."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes | bytearray) or len(secret) != KEY_SIZE:
            raise ConfigurationError("the key broker root key must be exactly 32 bytes")
        self._secret = bytes(secret)

    @classmethod
    def generate(cls) -> RootKey:
        return cls(os.urandom(KEY_SIZE))

    def fingerprint(self) -> bytes:
        """A value that identifies this key without revealing it (stored in the database)."""
        return hmac.new(self._secret, _FINGERPRINT_LABEL, hashlib.sha256).digest()

    def wrap(self, key_id: str, version: int, material: bytes) -> bytes:
        """Wrap one KEK version for storage, bound to its key id and version."""
        return wrap_key(self._secret, material, kek_aad(key_id, version))

    def unwrap(self, key_id: str, version: int, wrapped: bytes) -> bytes:
        """Unwrap a stored KEK version; failure means tampered or foreign data (StorageError)."""
        try:
            return unwrap_key(self._secret, wrapped, kek_aad(key_id, version))
        except DecryptionError:
            raise StorageError(
                f"stored material of key {key_id!r} version {version} does not decrypt under the root "
                "key: the database row was altered or copied from another broker"
            ) from None

    def __repr__(self) -> str:
        return "RootKey(<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("the root key cannot be pickled")

    def __copy__(self) -> RootKey:
        raise TypeError("the root key cannot be copied")

    def __deepcopy__(self, memo: dict[int, Any]) -> RootKey:
        raise TypeError("the root key cannot be copied")


def parse_root_key(data: bytes | str, *, source: str, allow_raw: bool = True) -> RootKey:
    """Decode raw, hex or base64 root-key data; error messages never include the data."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    if allow_raw and len(raw) == KEY_SIZE:
        return RootKey(raw)
    text = raw.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return RootKey(binascii.unhexlify(text))
        except (binascii.Error, ValueError):
            pass
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            decoded = decode(text + b"=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            continue
        if len(decoded) == KEY_SIZE:
            return RootKey(decoded)
    raise ConfigurationError(
        f"{source} does not hold a 32-byte root key (expected raw 32 bytes, 64 hex digits or base64)"
    )


def check_root_key_location(key_file: str | Path, database: str | Path) -> None:
    """Refuse a root-key file that lies inside the database's directory (see module docstring)."""
    key_path = Path(key_file).resolve()
    db_dir = Path(database).resolve().parent
    if key_path.is_relative_to(db_dir):
        raise ConfigurationError(
            f"root key file {key_file} lies inside the database directory {db_dir}; keep it "
            "elsewhere (another disk, a secrets mount) so a copy of the database cannot be decrypted"
        )


def load_root_key(
    path: str | Path | None = None,
    *,
    database: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> RootKey:
    """Load the root key from ``path`` or, if none, from ``$ENCLAVEML_KBS_ROOT_KEY``.

    With ``database`` given, a key file inside the database's directory is refused.
    """
    if path is None:
        env = os.environ if environ is None else environ
        value = env.get(ROOT_KEY_ENV)
        if not value:
            raise ConfigurationError(
                f"no key broker root key: pass a root key file or set {ROOT_KEY_ENV} (hex or base64); "
                "create one with generate_root_key_file"
            )
        return parse_root_key(value, source=f"${ROOT_KEY_ENV}", allow_raw=False)
    key_path = Path(path)
    if database is not None:
        check_root_key_location(key_path, database)
    try:
        fd = os.open(key_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ConfigurationError(f"cannot open root key file {key_path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"root key file {key_path} is not a regular file")
        if info.st_mode & 0o007:
            raise ConfigurationError(
                f"root key file {key_path} is accessible to other users (mode "
                f"{stat.S_IMODE(info.st_mode):o}); run chmod 600 on it"
            )
        if info.st_mode & 0o070:
            _log.warning("root key file %s is accessible to its group; prefer mode 600", key_path)
        data = os.read(fd, _MAX_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE:
        raise ConfigurationError(f"root key file {key_path} is too large to be a root key")
    return parse_root_key(data, source=f"root key file {key_path}")


def generate_root_key_file(path: str | Path, *, database: str | Path | None = None) -> Path:
    """Create a new root key at ``path`` (hex text, mode 0600); refuses to overwrite a file."""
    key_path = Path(path)
    if database is not None:
        check_root_key_location(key_path, database)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigurationError(f"root key file {key_path} already exists; not overwriting it") from exc
    except OSError as exc:
        raise ConfigurationError(f"cannot create root key file {key_path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)  # the umask may have removed bits, never added: make it exact
        os.write(fd, os.urandom(KEY_SIZE).hex().encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return key_path
