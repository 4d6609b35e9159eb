"""The key broker's business logic, independent of HTTP: keys, policies, wrapping, release.

:class:`KeyBroker` is what ``server.py`` exposes over HTTPS and what tests drive directly.
It owns the rules of ``docs/kbs-protocol.md``:

* key material is generated here, wrapped by the root key before it reaches storage, and
  unwrapped only to wrap a data key (admin ``wrap``) or to HPKE-seal it to an attested
  workload (``release``);
* a release consumes its nonce first, so a nonce serves exactly one attempt, successful or
  not; then it checks the KEM and public key, the key's state, verifies the evidence, checks
  the binding ``SHA-256(nonce || public_key) || 0^32`` and appraises the claims against the
  key's policy; the audit record is committed *before* the sealed key is returned;
* every release, denial and admin change is audited (time, key, version, verdict,
  measurement, rule) and counted in the broker's own Prometheus registry.

Nothing here puts key material or plaintext into a log line, an exception or the audit log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from enclaveml.attestation import Policy, Verifier, dump_policy, policy_from_dict
from enclaveml.crypto.keys import KEY_SIZE, wrap_key
from enclaveml.errors import (
    ConfigurationError,
    KeyBrokerError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
    StorageError,
)
from enclaveml.kms._audit import AuditEvent, AuditRecord, ChainVerdict, attributed, policy_detail
from enclaveml.kms._metrics import BrokerMetrics
from enclaveml.kms._release import (
    DEFAULT_KEM,
    KEMS,
    RecordingVerifier,
    UnusablePublicKeyError,
    appraise_release,
    expected_report_data,
    parse_public_key,
    seal_kek,
    unloadable_policy,
)
from enclaveml.kms._rootkey import RootKey
from enclaveml.kms._storage import KeyStore, NonceStatus, StoredKey, StoredToken
from enclaveml.kms._tokens import TokenAuthority

__all__ = ["Challenge", "InvalidRequestError", "KemNotAllowedError", "KeyBroker", "KeyInfo", "Release"]

_log = logging.getLogger("enclaveml.kms")
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NONCE_SIZE = 32
_MAX_VERSION = 2**63 - 1


class InvalidRequestError(KeyBrokerError):
    """The request is malformed (bad key id, public key, field sizes): HTTP 400."""


class KemNotAllowedError(InvalidRequestError):
    """The requested KEM is unknown or refused by this broker's configuration."""

    def __init__(self, kem: str, allowed: frozenset[str]) -> None:
        self.allowed = allowed
        shown = kem if len(kem) <= 40 else f"{kem[:40]}... ({len(kem)} characters)"
        super().__init__(f"KEM {shown!r} is not allowed here; use one of {sorted(allowed)}")


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes
    expires_at: float


@dataclass(frozen=True, slots=True)
class Release:
    """A released key: the KEK HPKE-sealed to the workload's public key (never the KEK itself)."""

    key_id: str
    version: int
    kem: str
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    versions: tuple[int, ...]
    latest: int
    state: str
    policy: dict[str, Any]
    min_version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "versions": list(self.versions),
            "latest": self.latest,
            "min_version": self.min_version,
            "state": self.state,
            "policy": self.policy,
        }


class KeyBroker:
    """Keys, policies, tokens, wrapping and attested release over a :class:`KeyStore`.

    Construction binds the root key to the store: a root key other than the one the
    database was created with raises StorageError here, at startup, not at the first release.
    """

    def __init__(
        self,
        store: KeyStore,
        root_key: RootKey,
        verifier: Verifier,
        *,
        nonce_ttl: float = 60.0,
        allowed_kems: Iterable[str] = KEMS,
        metrics: BrokerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        kems = frozenset(allowed_kems)
        if not kems or not kems <= set(KEMS):
            raise ConfigurationError(f"allowed KEMs must be a non-empty subset of {list(KEMS)}")
        if not 0 < nonce_ttl <= 3600:
            raise ConfigurationError("the nonce TTL must be between 0 and 3600 seconds")
        self.store = store
        self._root = root_key
        self._verifier = verifier
        self._nonce_ttl = float(nonce_ttl)
        self.allowed_kems = kems
        self.metrics = metrics if metrics is not None else BrokerMetrics()
        self.metrics.count_keys_with(store.count_keys)
        self._clock = clock
        self.tokens = TokenAuthority(store, clock=clock)
        store.bind_root_key(root_key.fingerprint())
        self._check_stored_policies()

    def _check_stored_policies(self) -> None:
        """Say loudly at start-up which keys cannot be released: their stored policy does not load.

        A policy an older enclaveml accepted may be refused now (a TCB status or advisory id that
        could never match); its releases are denied (rule ``policy_invalid``) until it is set again.
        """
        for key in self.store.list_keys():
            reason = unloadable_policy(key.policy)
            if reason is not None:
                _log.error(
                    "key %r has a stored release policy that does not load (%s): every release of it "
                    "is denied until its policy is set again",
                    key.key_id,
                    reason,
                )

    # -- admin: keys ------------------------------------------------------------------------------

    def create_key(self, key_id: str, policy: Policy | Mapping[str, Any], *, actor: str | None = None) -> int:
        """Create ``key_id`` with fresh random material as version 1 and its release policy."""
        _check_key_id(key_id)
        policy_json = _policy_json(policy)
        now = self._clock()
        wrapped = self._root.wrap(key_id, 1, os.urandom(KEY_SIZE))
        self.store.create_key(
            key_id,
            policy_json,
            wrapped,
            now=now,
            audit=self._admin_event(now, "key.create", key_id, actor, policy_detail(policy_json)),
        )
        _log.info("created key %r version 1", key_id)
        return 1

    def rotate_key(self, key_id: str, *, actor: str | None = None) -> int:
        """Add a new latest version; older versions stay available for unwrapping and release."""
        _check_key_id(key_id)
        now = self._clock()

        def wrap_new(version: int) -> bytes:
            return self._root.wrap(key_id, version, os.urandom(KEY_SIZE))

        version = self.store.add_version(
            key_id, wrap_new, now=now, audit=self._admin_event(now, "key.rotate", key_id, actor)
        )
        _log.info("rotated key %r to version %d", key_id, version)
        return version

    def disable_key(self, key_id: str, *, actor: str | None = None) -> None:
        self._set_state(key_id, "disabled", actor)

    def enable_key(self, key_id: str, *, actor: str | None = None) -> None:
        self._set_state(key_id, "enabled", actor)

    def _set_state(self, key_id: str, state: str, actor: str | None) -> None:
        _check_key_id(key_id)
        now = self._clock()
        event = "key.enable" if state == "enabled" else "key.disable"
        self.store.set_state(key_id, state, now=now, audit=self._admin_event(now, event, key_id, actor))
        _log.info("key %r is now %s", key_id, state)

    def delete_key(self, key_id: str, *, actor: str | None = None) -> None:
        """Destroy every version of ``key_id``: whatever it wrapped becomes unrecoverable."""
        _check_key_id(key_id)
        now = self._clock()
        self.store.delete_key(key_id, audit=self._admin_event(now, "key.delete", key_id, actor))
        _log.warning("deleted key %r and all its versions", key_id)

    def set_policy(
        self, key_id: str, policy: Policy | Mapping[str, Any], *, actor: str | None = None
    ) -> None:
        _check_key_id(key_id)
        policy_json = _policy_json(policy)
        now = self._clock()
        self.store.set_policy(
            key_id,
            policy_json,
            now=now,
            audit=self._admin_event(now, "policy.set", key_id, actor, policy_detail(policy_json)),
        )
        _log.info("set the release policy of key %r", key_id)

    def set_min_version(self, key_id: str, min_version: int, *, actor: str | None = None) -> None:
        """Release only versions >= ``min_version`` of ``key_id`` from now on; lowering it undoes this.

        Why: the host stores the sealed artifacts, so after a model owner seals a new model under
        a rotated key, the host could keep serving the older artifact (rollback to a model with a
        known flaw, or one whose licence ended). Retiring the older key versions makes the broker
        refuse their release (rule ``version_retired``), so no attested server can unseal them.
        Versions stay stored: the owner can lower the minimum again. Releases in flight are
        refused if they complete after this returns (the key gets a new revision).
        """
        _check_key_id(key_id)
        valid = isinstance(min_version, int) and not isinstance(min_version, bool)
        if not valid or not 1 <= min_version <= _MAX_VERSION:
            raise InvalidRequestError(f"a minimum version is a key version >= 1, not {min_version!r}")
        now = self._clock()
        self.store.set_min_version(
            key_id,
            min_version,
            now=now,
            audit=self._admin_event(now, "key.min_version", key_id, actor, f"min_version {min_version}"),
        )
        _log.info("key %r now releases versions >= %d", key_id, min_version)

    def list_keys(self) -> list[KeyInfo]:
        # One read: a key deleted meanwhile is simply absent, never a 404 for the whole list.
        return [_info(k) for k in self.store.list_keys()]

    def get_key(self, key_id: str) -> KeyInfo:
        _check_key_id(key_id)
        return _info(self.store.get_key(key_id))

    def wrap(
        self, key_id: str, plaintext: bytes, aad: bytes, *, actor: str | None = None
    ) -> tuple[int, bytes]:
        """``wrap_key(KEK_latest, plaintext, aad)``: data owners seal without ever holding the KEK."""
        _check_key_id(key_id)
        if not 0 < len(plaintext) <= 64:
            raise InvalidRequestError("only 1..64 bytes are wrapped (a data key, not data)")
        key, version = self.store.get_version(key_id, None)
        if key.state != "enabled":
            raise KeyDisabledError(f"key {key_id!r} is disabled; nothing is wrapped with it")
        kek = self._root.unwrap(key_id, version.version, version.wrapped)
        wrapped = wrap_key(kek, plaintext, aad)
        now = self._clock()
        detail = attributed(actor)
        event = AuditEvent(now, "key.wrap", "ok", key_id=key_id, version=version.version, detail=detail)
        self.store.append_audit(event)
        return version.version, wrapped

    def wrap_data_key(self, key_id: str, data_key: bytes, aad: bytes) -> tuple[int, bytes]:
        """:class:`~enclaveml.crypto.keys.DataKeyWrapper` for in-process use of the broker."""
        return self.wrap(key_id, data_key, aad)

    # -- release ----------------------------------------------------------------------------------

    def challenge(self) -> Challenge:
        """A fresh single-use nonce, valid for the configured TTL."""
        now = self._clock()
        nonce = os.urandom(NONCE_SIZE)
        expires_at = now + self._nonce_ttl
        self.store.add_nonce(nonce, expires_at, now=now)
        return Challenge(nonce, expires_at)

    def release(
        self,
        key_id: str,
        nonce: bytes,
        evidence: bytes,
        public_key: bytes,
        kem: str = DEFAULT_KEM,
        version: int | None = None,
    ) -> Release:
        """Release one KEK version to an attested workload, HPKE-sealed to ``public_key``.

        Raises KeyReleaseDeniedError (rule ``nonce``, ``version_retired``, ``policy_invalid``,
        ``evidence``, ``binding``, ``key_changed`` or the policy rule), KeyNotFoundError,
        KeyDisabledError or InvalidRequestError; every outcome is audited except a malformed key
        id, which is refused before anything is read, consumed or written.
        """
        _check_key_id(key_id)
        now = self._clock()
        status = self.store.consume_nonce(nonce, now=now)  # first: one attempt per nonce, whatever happens
        recorder = RecordingVerifier(self._verifier)
        number = version
        try:
            if status is not NonceStatus.OK:
                raise KeyReleaseDeniedError(
                    f"release nonce is {status.value}: request a new challenge",
                    rule="nonce",
                    observed=status.value if status is NonceStatus.EXPIRED else "unknown or already used",
                    expected="a fresh nonce from POST /v1/challenge, used once",
                )
            if kem not in self.allowed_kems:
                raise KemNotAllowedError(kem, self.allowed_kems)
            try:
                workload_key = parse_public_key(kem, public_key)
            except UnusablePublicKeyError as exc:
                raise InvalidRequestError(str(exc)) from None
            if number is not None and not -_MAX_VERSION <= number <= _MAX_VERSION:
                # Not even a SQLite integer: audited without a version (it could not be stored).
                requested, number = number, None
                raise KeyNotFoundError(f"key {key_id!r} has no version {requested}")
            if number is not None and number < 1:
                raise KeyNotFoundError(f"key versions start at 1, not {number}")
            key, stored = self.store.get_version(key_id, number)
            number = stored.version
            if key.state != "enabled":
                raise KeyDisabledError(f"key {key_id!r} is disabled; nothing is released")
            if number < key.min_version:
                raise KeyReleaseDeniedError(
                    f"version {number} of key {key_id!r} is retired: this broker releases only "
                    f"versions >= {key.min_version} of it",
                    rule="version_retired",
                    observed=f"version {number}",
                    expected=f"version >= {key.min_version}",
                )
            claims = appraise_release(
                key.policy, evidence, expected_report_data(nonce, public_key), recorder, now
            )
            kek = self._root.unwrap(key_id, number, stored.wrapped)
            try:
                ciphertext = seal_kek(kem, workload_key, kek, key_id, number)
            except UnusablePublicKeyError as exc:
                raise InvalidRequestError(str(exc)) from None
        except (KeyReleaseDeniedError, KeyNotFoundError, KeyDisabledError, InvalidRequestError) as exc:
            rule = _refusal_rule(exc)
            self._deny(now, key_id, number, rule, recorder.measurement, str(exc))
            raise
        except StorageError as exc:
            # Stored material that does not decrypt under the root key (an altered or copied row)
            # is exactly what the audit log is for; a database that cannot be read or written
            # cannot take the record either, and the release fails closed all the same.
            try:
                self._deny(now, key_id, number, "storage", recorder.measurement, str(exc))
            except StorageError:
                _log.error("could not audit the failed release of key %r: the database fails", key_id)
            raise
        measurement = claims.measurement.hex()
        # Audit first: if the audit write fails, no key leaves the broker. The write also checks
        # that the key was not disabled, deleted or given another policy since it was read.
        event = AuditEvent(
            now, "release", "released", key_id=key_id, version=number, measurement=measurement, detail=kem
        )
        try:
            self.store.append_audit(event, release_of=key)
        except (KeyReleaseDeniedError, KeyNotFoundError, KeyDisabledError) as exc:
            self._deny(now, key_id, number, _refusal_rule(exc), measurement, str(exc))
            raise
        self.metrics.count_release(kem)
        _log.info("released key %r version %d to measurement %s (%s)", key_id, number, measurement, kem)
        return Release(key_id, number, kem, ciphertext)

    def _deny(
        self, now: float, key_id: str, version: int | None, rule: str, measurement: str | None, message: str
    ) -> None:
        self.metrics.count_denial(rule)
        _log.info("denied key %r release (rule %s, measurement %s): %s", key_id, rule, measurement, message)
        self.store.append_audit(
            AuditEvent(
                now,
                "release",
                "denied",
                key_id=key_id,
                version=version,
                measurement=measurement,
                rule=rule,
                detail=message,
            )
        )

    # -- tokens and audit -------------------------------------------------------------------------

    def create_token(self, name: str, scopes: Iterable[str], *, actor: str | None = None) -> str:
        """A new admin token, returned once (the store keeps its hash)."""
        return self.tokens.create_token(name, scopes, actor=actor)

    def authenticate(self, token: str | None, scope: str) -> StoredToken:
        return self.tokens.authenticate(token, scope)

    def revoke_token(self, name: str, *, actor: str | None = None) -> None:
        self.tokens.revoke_token(name, actor=actor)

    def audit_records(self, *, after: int = 0, limit: int = 100) -> list[AuditRecord]:
        return self.store.audit_records(after=after, limit=limit)

    def verify_audit(self) -> ChainVerdict:
        """Check the audit log's hash chain (see :func:`enclaveml.kms._audit.verify_chain`)."""
        return self.store.verify_audit()

    def _admin_event(
        self, now: float, event: str, key_id: str, actor: str | None, detail: str = ""
    ) -> AuditEvent:
        return AuditEvent(now, event, "ok", key_id=key_id, detail=attributed(actor, detail))


def _info(key: StoredKey) -> KeyInfo:
    return KeyInfo(key.key_id, key.versions, key.latest, key.state, json.loads(key.policy), key.min_version)


def _check_key_id(key_id: str) -> None:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise InvalidRequestError(
            "key ids are 1-128 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
        )


def _refusal_rule(exc: KeyBrokerError) -> str:
    """The rule a refused release is audited and counted under."""
    if isinstance(exc, KeyReleaseDeniedError):
        return exc.rule
    if isinstance(exc, KeyNotFoundError):
        return "not_found"
    if isinstance(exc, KeyDisabledError):
        return "disabled"
    return "request"


def _policy_json(policy: Policy | Mapping[str, Any]) -> str:
    """Validate and canonicalise a policy (ConfigurationError names what is wrong)."""
    return dump_policy(policy if isinstance(policy, Policy) else policy_from_dict(policy))
