"""Admin bearer tokens: issue (shown once), authenticate by hash, revoke.

A token is 32 random bytes, handed out as unpadded URL-safe base64 (43 characters) so it
fits an ``Authorization: Bearer`` header. The store keeps only ``SHA-256(token as ASCII)``:
a stolen database does not yield usable tokens, and lookup by hash does not leak a prefix
through timing. This module needs no root key, so the CLI can bootstrap the first token on
the broker host with nothing but the database.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable, Iterable

from enclaveml.errors import AuthorizationError, ConfigurationError
from enclaveml.kms._audit import AuditEvent, attributed
from enclaveml.kms._storage import KeyStore, StoredToken

__all__ = [
    "SCOPES",
    "InvalidTokenError",
    "MissingScopeError",
    "TokenAuthority",
    "hash_token",
]

SCOPES = frozenset({"keys:read", "keys:write", "keys:delete", "keys:wrap", "policy:write", "audit:read"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_MAX_TOKEN = 256


class InvalidTokenError(AuthorizationError):
    """No token, an unknown token or a revoked one (HTTP 401)."""


class MissingScopeError(AuthorizationError):
    """A valid token without the scope this operation needs (HTTP 403)."""


def hash_token(token: str) -> bytes:
    """What the store keeps of a token."""
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


class TokenAuthority:
    """Issues, checks and revokes admin tokens stored in a :class:`KeyStore`."""

    def __init__(self, store: KeyStore, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def create_token(self, name: str, scopes: Iterable[str], *, actor: str | None = None) -> str:
        """Create a token named ``name`` with ``scopes`` and return it; it is not shown again."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigurationError(
                "token names are 1-64 characters: letters, digits and . _ @ - (not first)"
            )
        wanted = frozenset(scopes)
        unknown = wanted - SCOPES
        if unknown or not wanted:
            raise ConfigurationError(
                f"unknown or no token scopes {sorted(unknown)}; choose from {sorted(SCOPES)}"
            )
        token = secrets.token_urlsafe(32)
        now = self._clock()
        self._store.add_token(
            hash_token(token),
            name,
            wanted,
            now=now,
            audit=AuditEvent(
                now, "token.create", "ok", detail=attributed(actor, f"token {name!r} scopes {sorted(wanted)}")
            ),
        )
        return token

    def authenticate(self, token: str | None, scope: str) -> StoredToken:
        """Return the token's record if it is valid and has ``scope``; else raise AuthorizationError."""
        if scope not in SCOPES:
            raise ConfigurationError(f"unknown scope {scope!r}")
        if not token or len(token) > _MAX_TOKEN:
            raise InvalidTokenError("missing or invalid admin token")
        record = self._store.find_token(hash_token(token))
        if record is None or record.revoked:
            # Unknown and revoked look alike: the caller can do nothing different with either.
            raise InvalidTokenError("missing or invalid admin token")
        if scope not in record.scopes:
            raise MissingScopeError(f"admin token {record.name!r} lacks the scope {scope!r}")
        return record

    def revoke_token(self, name: str, *, actor: str | None = None) -> None:
        now = self._clock()
        event = AuditEvent(now, "token.revoke", "ok", detail=attributed(actor, name))
        self._store.revoke_token(name, audit=event)

    def list_tokens(self) -> list[StoredToken]:
        return self._store.list_tokens()
