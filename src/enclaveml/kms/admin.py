"""The key owner's side of the broker: manage keys and policies, wrap data keys, read the audit log.

:class:`KeyBrokerAdmin` speaks the admin API of ``docs/kbs-protocol.md`` with a bearer token.
It never sees a key-encryption key: sealing asks the broker to wrap a data key
(:meth:`KeyBrokerAdmin.wrap_data_key`, the :class:`~enclaveml.crypto.keys.DataKeyWrapper`
interface), so the data owner's laptop holds nothing that could unseal another artifact.
401 and 403 answers raise :class:`~enclaveml.errors.AuthorizationError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from enclaveml.attestation.policy import Policy, policy_from_dict
from enclaveml.errors import ConfigurationError, KeyBrokerError
from enclaveml.kms._http import BrokerHttp, Verify, b64d, b64e, key_path

__all__ = ["AuditVerification", "KeyBrokerAdmin", "KeyInfo"]


@dataclass(frozen=True)
class KeyInfo:
    """One key as the broker lists it (no key material, ever)."""

    key_id: str
    versions: tuple[int, ...]
    latest: int
    state: str
    policy: dict[str, Any]
    min_version: int = 1  # the oldest version the broker releases

    @property
    def enabled(self) -> bool:
        return self.state == "enabled"


@dataclass(frozen=True)
class AuditVerification:
    """Result of checking the audit log's hash chain: ``first_bad`` is the first broken row, if any."""

    ok: bool
    records: int
    first_bad: int | None


class KeyBrokerAdmin:
    """Administers keys at the broker with one bearer token (its scopes decide what is allowed)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        verify: Verify = True,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not isinstance(token, str) or not token.strip():
            raise ConfigurationError("an admin token is required (ENCLAVEML_KBS_TOKEN or --token)")
        # The token lives only in the client's default headers; it is not kept on self.
        self._http = BrokerHttp(
            url,
            verify=verify,
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {token.strip()}"},
        )

    @property
    def url(self) -> str:
        return self._http.url

    # -- keys -----------------------------------------------------------------------------------

    def create_key(self, key_id: str, policy: Policy | Mapping[str, Any]) -> int:
        """Create ``key_id`` (version 1) with its release policy; returns the version."""
        body = {"key_id": _check_id(key_id), "policy": _policy_dict(policy)}
        return _version(self._http.request("POST", "/v1/admin/keys", json_body=body))

    def rotate_key(self, key_id: str) -> int:
        """Add a version; new wraps use it, older versions keep unsealing older artifacts."""
        return _version(self._http.request("POST", f"/v1/admin/keys/{key_path(key_id)}/rotate"))

    def disable_key(self, key_id: str) -> None:
        """Stop every wrap and release of ``key_id`` until it is enabled again."""
        self._http.request("POST", f"/v1/admin/keys/{key_path(key_id)}/disable")

    def enable_key(self, key_id: str) -> None:
        self._http.request("POST", f"/v1/admin/keys/{key_path(key_id)}/enable")

    def delete_key(self, key_id: str) -> None:
        """Destroy every version: artifacts sealed under ``key_id`` become unrecoverable."""
        self._http.request("DELETE", f"/v1/admin/keys/{key_path(key_id)}", expect_body=False)

    def set_min_version(self, key_id: str, min_version: int) -> None:
        """Release only versions >= ``min_version`` of ``key_id`` (rollback protection; lower it to undo).

        After sealing a new model under a rotated key, retiring the older versions stops any
        server from unsealing the older artifacts the host may still hold.
        """
        if isinstance(min_version, bool) or not isinstance(min_version, int) or min_version < 1:
            raise ConfigurationError(f"a minimum version is a key version >= 1, not {min_version!r}")
        body = {"min_version": min_version}
        self._http.request("PUT", f"/v1/admin/keys/{key_path(key_id)}/min-version", json_body=body)

    def list_keys(self) -> list[KeyInfo]:
        keys = self._http.request("GET", "/v1/admin/keys").get("keys")
        if not isinstance(keys, list):
            raise KeyBrokerError("the key broker's key list has no 'keys' array")
        return [_key_info(item) for item in keys]

    def set_policy(self, key_id: str, policy: Policy | Mapping[str, Any]) -> None:
        """Replace the release policy of ``key_id`` (validated here first, so typos fail locally)."""
        body = {"policy": _policy_dict(policy)}
        self._http.request("PUT", f"/v1/admin/keys/{key_path(key_id)}/policy", json_body=body)

    def wrap_data_key(self, key_id: str, data_key: bytes, aad: bytes) -> tuple[int, bytes]:
        """:class:`DataKeyWrapper`: the broker wraps ``data_key`` under the latest version of ``key_id``."""
        if not isinstance(data_key, bytes | bytearray) or not 0 < len(data_key) <= 64:
            raise ConfigurationError("only keys of 1..64 bytes are wrapped")
        body = {"plaintext": b64e(bytes(data_key)), "aad": b64e(bytes(aad))}
        answer = self._http.request("POST", f"/v1/admin/keys/{key_path(key_id)}/wrap", json_body=body)
        return _version(answer), b64d(answer.get("wrapped"), "wrapped")

    # -- audit ----------------------------------------------------------------------------------

    def audit_records(self, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Audit rows with ``seq > after``, oldest first, at most ``limit`` of them."""
        answer = self._http.request("GET", "/v1/admin/audit", params={"after": after, "limit": limit})
        records = answer.get("records")
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise KeyBrokerError("the key broker's audit answer has no 'records' array")
        return records

    def verify_audit(self) -> AuditVerification:
        """Ask the broker to re-check the audit log's hash chain."""
        answer = self._http.request("GET", "/v1/admin/audit/verify")
        ok, records, first_bad = answer.get("ok"), answer.get("records"), answer.get("first_bad")
        if not isinstance(ok, bool) or not isinstance(records, int):
            raise KeyBrokerError("the key broker's audit verification answer is malformed")
        return AuditVerification(ok, records, first_bad if isinstance(first_bad, int) else None)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KeyBrokerAdmin:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KeyBrokerAdmin(url={self.url!r}, token=<hidden>)"

    def __reduce__(self) -> Any:
        raise TypeError("KeyBrokerAdmin holds an admin token and cannot be pickled")


def _check_id(key_id: str) -> str:
    key_path(key_id)
    return key_id


def _policy_dict(policy: Policy | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(policy, Policy):
        return policy.to_dict()
    return policy_from_dict(policy).to_dict()


def _version(answer: Mapping[str, Any]) -> int:
    version = answer.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise KeyBrokerError("the key broker's answer has no valid key 'version'")
    return version


def _key_info(item: Any) -> KeyInfo:
    if not isinstance(item, dict):
        raise KeyBrokerError("the key broker's key list holds a non-object entry")
    versions, latest, policy = item.get("versions"), item.get("latest"), item.get("policy")
    if not isinstance(versions, list) or not all(isinstance(v, int) for v in versions):
        raise KeyBrokerError("the key broker's key list has malformed 'versions'")
    min_version = item.get("min_version", 1)  # brokers before schema 3 release every version
    if not isinstance(min_version, int) or isinstance(min_version, bool):
        raise KeyBrokerError("the key broker's key list has a malformed 'min_version'")
    return KeyInfo(
        key_id=str(item.get("key_id", "")),
        versions=tuple(versions),
        latest=latest if isinstance(latest, int) else max(versions, default=0),
        state=str(item.get("state", "unknown")),
        policy=_policy_field(policy),
        min_version=min_version,
    )


def _policy_field(policy: Any) -> dict[str, Any]:
    # The broker stores the canonical JSON text of a policy; accept it either parsed or as text.
    if isinstance(policy, str):
        try:
            policy = json.loads(policy)
        except ValueError:
            return {}
    return policy if isinstance(policy, dict) else {}
