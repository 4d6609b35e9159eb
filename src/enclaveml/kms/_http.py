"""HTTP plumbing shared by the key broker's release and admin clients.

This module is the one boundary where httpx (transport failures, TLS errors, bad JSON) and
the broker's error bodies (``{"error": CODE, "message": TEXT, ...}``, see
``docs/kbs-protocol.md``) become enclaveml exceptions:

=====================================  ==================================================
HTTP answer                            exception
=====================================  ==================================================
403 ``{"error": "denied", "rule"...}``  :class:`KeyReleaseDeniedError` (rule, observed, expected)
403 ``{"error": "disabled"}``          :class:`KeyDisabledError`
401, or any other 403                  :class:`AuthorizationError`
404                                    :class:`KeyNotFoundError`
anything else not 2xx                  :class:`KeyBrokerError`
connection, TLS, timeout, bad JSON     :class:`KeyBrokerError` (httpx error as ``__cause__``)
=====================================  ==================================================

Nothing here logs request or response bodies: release responses carry wrapped key material
and admin requests carry data keys to wrap.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from enclaveml.errors import (
    AuthorizationError,
    ConfigurationError,
    KeyBrokerError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
)

__all__ = ["BrokerHttp", "Verify", "b64d", "b64e", "key_path", "ssl_context"]

Verify = ssl.SSLContext | str | os.PathLike[str] | bool
"""TLS trust for the broker: a context, a CA/certificate file to pin, True (system CAs) or False."""

_MAX_SERVER_MESSAGE = 300


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(value: Any, what: str) -> bytes:
    """Decode a standard-base64 field of a broker response; a malformed one is a broker error."""
    if not isinstance(value, str):
        raise KeyBrokerError(f"the key broker's response field {what!r} is missing or not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyBrokerError(f"the key broker's response field {what!r} is not valid base64") from exc


def key_path(key_id: str) -> str:
    """Percent-encode a key id for a URL path segment (ids are the operator's choice, not ours)."""
    if not isinstance(key_id, str) or not key_id:
        raise ConfigurationError("key_id must be a non-empty string")
    return quote(key_id, safe="")


def ssl_context(verify: Verify) -> ssl.SSLContext | bool:
    """Turn the ``verify`` argument into what httpx takes, loading a CA file eagerly.

    A file path is loaded into a fresh TLS 1.2+ context whose only trust anchor is that file
    (the broker's self-signed certificate or its private CA): the system store is *not*
    added, so a public CA cannot vouch for an impostor broker. Host names are still checked.
    """
    if isinstance(verify, ssl.SSLContext | bool):
        return verify
    path = os.fspath(verify)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the key broker CA/certificate file {path}: {exc}") from exc
    return context


class BrokerHttp:
    """A keep-alive httpx client bound to one broker URL, translating every failure at one place."""

    def __init__(
        self,
        url: str,
        *,
        verify: Verify,
        timeout: float,
        transport: httpx.BaseTransport | None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigurationError(f"the key broker URL must look like https://host:port, got {url!r}")
        if parts.scheme == "http" and transport is None:
            raise ConfigurationError(
                "the key broker is reached over https only; plain http is accepted just with an "
                "in-process test transport"
            )
        if timeout <= 0:
            raise ConfigurationError("timeout must be positive")
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url,
            verify=ssl_context(verify),
            timeout=timeout,
            transport=transport,
            headers=dict(headers or {}),
            follow_redirects=False,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        expect_body: bool = True,
    ) -> dict[str, Any]:
        """Send one request; return the JSON object of a 2xx answer or raise the mapped error."""
        try:
            response = self._client.request(method, path, json=json_body, params=params)
        except httpx.HTTPError as exc:
            raise KeyBrokerError(
                f"cannot reach the key broker at {self.url} ({type(exc).__name__}: {exc}); "
                "check the URL, that the broker runs, and the pinned TLS certificate"
            ) from exc
        if not response.is_success:
            raise _error_from(response)
        if not expect_body or response.status_code == 204:
            return {}
        try:
            body = response.json()
        except ValueError as exc:
            raise KeyBrokerError(f"the key broker answered {method} {path} with invalid JSON") from exc
        if not isinstance(body, dict):
            raise KeyBrokerError(f"the key broker answered {method} {path} with a non-object JSON body")
        return body

    def close(self) -> None:
        self._client.close()


def _error_from(response: httpx.Response) -> KeyBrokerError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    code = str(body.get("error", ""))
    message = _clip(body.get("message", "")) or response.reason_phrase or "no message"
    status = response.status_code
    where = f"{response.request.method} {response.request.url.path}"
    if status == 403 and code == "denied":
        rule = _clip(body.get("rule", ""))
        observed, expected = _clip(body.get("observed", "")), _clip(body.get("expected", ""))
        return KeyReleaseDeniedError(
            f"the key broker denied the release (rule '{rule or 'unknown'}'): {message}",
            rule=rule,
            observed=observed,
            expected=expected,
        )
    if status == 403 and code == "disabled":
        return KeyDisabledError(f"the key is disabled at the broker ({where}): {message}; enable it first")
    if status in (401, 403):
        return AuthorizationError(
            f"the key broker refused {where} ({status}): {message}; "
            "check the admin token (ENCLAVEML_KBS_TOKEN) and its scopes"
        )
    if status == 404:
        return KeyNotFoundError(f"the key broker has no such key or version ({where}): {message}")
    return KeyBrokerError(f"the key broker answered {where} with {status} {code or ''}: {message}".strip())


def _clip(value: Any) -> str:
    """Server-provided text, bounded so a hostile or broken server cannot flood logs."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= _MAX_SERVER_MESSAGE else text[:_MAX_SERVER_MESSAGE] + "..."
