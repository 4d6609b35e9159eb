"""Key broker clients against an in-process fake broker (httpx.MockTransport): protocol and errors.

The fake follows docs/kbs-protocol.md closely enough to check what the client sends (binding,
fresh ephemeral keys, KEM) and how it reads every kind of answer. The real server is exercised
in tests/integration/test_kms_release.py.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from enclaveml.attestation.evidence import Evidence
from enclaveml.attestation.policy import AllOf, MeasurementAllowlist, UnsafeAllowSimulation
from enclaveml.attestation.simulation import SimulationProvider, SimulationVerifier
from enclaveml.crypto.keys import DataKeyUnwrapper, DataKeyWrapper, KeyHandle, wrap_key
from enclaveml.errors import (
    AuthorizationError,
    ConfigurationError,
    DecryptionError,
    KeyBrokerError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
)
from enclaveml.kms._release import expected_report_data, release_info
from enclaveml.kms.admin import KeyBrokerAdmin
from enclaveml.kms.client import KeyBrokerClient

URL = "http://broker.test"
KEK = {("model", 1): os.urandom(32), ("model", 2): os.urandom(32)}
SUITES = {
    "X25519": hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    "MLKEM768-X25519": hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class FakeBroker:
    """Just enough of the release protocol to check the client's side of it."""

    def __init__(self, verifier: SimulationVerifier) -> None:
        self.verifier = verifier
        self.nonces: set[bytes] = set()
        self.requests: list[httpx.Request] = []
        self.public_keys: list[bytes] = []
        self.override: Callable[[httpx.Request], httpx.Response | None] = lambda request: None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        forced = self.override(request)
        if forced is not None:
            return forced
        if request.url.path == "/v1/challenge":
            nonce = os.urandom(32)
            self.nonces.add(nonce)
            return httpx.Response(200, json={"nonce": b64(nonce), "expires_at": 0})
        key_id = request.url.path.split("/")[3]
        body = json.loads(request.content)
        nonce, public = base64.b64decode(body["nonce"]), base64.b64decode(body["public_key"])
        if nonce not in self.nonces:
            return httpx.Response(403, json={"error": "denied", "rule": "nonce", "message": "reused"})
        self.nonces.discard(nonce)
        claims = self.verifier.verify(Evidence.from_bytes(base64.b64decode(body["evidence"])))
        assert claims.report_data == expected_report_data(nonce, public)
        self.public_keys.append(public)
        version = body["version"] or 2
        if (key_id, version) not in KEK:
            return httpx.Response(404, json={"error": "not_found", "message": "no such key"})
        kem = body["kem"]
        if kem == "X25519":
            recipient: Any = x25519.X25519PublicKey.from_public_bytes(public)
        else:
            recipient = hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(public[:1184]),
                x25519.X25519PublicKey.from_public_bytes(public[1184:]),
            )
        ciphertext = SUITES[kem].encrypt(
            KEK[(key_id, version)], recipient, info=release_info(key_id, version)
        )
        return httpx.Response(
            200, json={"key_id": key_id, "version": version, "kem": kem, "ciphertext": b64(ciphertext)}
        )


@pytest.fixture
def broker(sim_verifier: SimulationVerifier) -> FakeBroker:
    return FakeBroker(sim_verifier)


@pytest.fixture
def client(broker: FakeBroker, sim_provider: SimulationProvider) -> KeyBrokerClient:
    return KeyBrokerClient(URL, sim_provider, transport=httpx.MockTransport(broker))


@pytest.mark.parametrize("kem", ["MLKEM768-X25519", "X25519"])
def test_release_binds_a_fresh_key_and_decrypts(
    broker: FakeBroker, sim_provider: SimulationProvider, kem: str
) -> None:
    client = KeyBrokerClient(URL, sim_provider, kem=kem, transport=httpx.MockTransport(broker))
    first, second = client.release("model", 1), client.release("model", 1)
    assert first.secret_bytes() == second.secret_bytes() == KEK[("model", 1)]
    assert (first.key_id, first.version) == ("model", 1)
    assert len(broker.public_keys) == 2
    assert broker.public_keys[0] != broker.public_keys[1]
    assert len(broker.public_keys[0]) == (1216 if kem == "MLKEM768-X25519" else 32)


def test_latest_version_when_none_requested(client: KeyBrokerClient) -> None:
    assert client.release("model").version == 2


def test_unwrapper_releases_once_per_version_and_caches(client: KeyBrokerClient, broker: FakeBroker) -> None:
    assert isinstance(client, DataKeyUnwrapper)
    data_key, aad = os.urandom(32), b"header"
    for version in (1, 2, 1, 2):
        wrapped = wrap_key(KEK[("model", version)], data_key, aad)
        assert client.unwrap_data_key("model", version, wrapped, aad) == data_key
    releases = [r for r in broker.requests if r.url.path.endswith("/release")]
    assert len(releases) == 2
    client.forget()
    client.unwrap_data_key("model", 1, wrap_key(KEK[("model", 1)], data_key, aad), aad)
    assert len([r for r in broker.requests if r.url.path.endswith("/release")]) == 3


def test_denial_carries_rule_observed_expected(client: KeyBrokerClient, broker: FakeBroker) -> None:
    denial = {"error": "denied", "rule": "measurement", "observed": "ab12", "expected": "['cd34']"}
    broker.override = lambda r: httpx.Response(403, json=denial) if "release" in r.url.path else None
    with pytest.raises(KeyReleaseDeniedError) as info:
        client.release("model", 1)
    assert (info.value.rule, info.value.observed, info.value.expected) == ("measurement", "ab12", "['cd34']")


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (404, {"error": "not_found"}, KeyNotFoundError),
        (403, {"error": "disabled"}, KeyDisabledError),
        (400, {"error": "malformed"}, KeyBrokerError),
        (413, {}, KeyBrokerError),
        (500, None, KeyBrokerError),
    ],
)
def test_error_answers_map_to_typed_errors(
    client: KeyBrokerClient, broker: FakeBroker, status: int, body: Any, error: type[Exception]
) -> None:
    def answer(request: httpx.Request) -> httpx.Response | None:
        if "release" not in request.url.path:
            return None
        return httpx.Response(status, json=body) if body is not None else httpx.Response(status, text="x")

    broker.override = answer
    with pytest.raises(error):
        client.release("model", 1)


def test_transport_failure_becomes_key_broker_error(sim_provider: SimulationProvider) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = KeyBrokerClient(URL, sim_provider, transport=httpx.MockTransport(refuse))
    with pytest.raises(KeyBrokerError, match="cannot reach the key broker") as info:
        client.release("model")
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def _rewrite_release(broker: FakeBroker, change: Callable[[dict[str, Any]], None]) -> None:
    """Let a second fake answer releases (sharing nonces), then edit its answer with ``change``."""
    inner = FakeBroker(broker.verifier)
    inner.nonces = broker.nonces

    def rewrite(request: httpx.Request) -> httpx.Response | None:
        if "release" not in request.url.path:
            return None
        body = json.loads(inner(request).content)
        change(body)
        return httpx.Response(200, json=body)

    broker.override = rewrite


def test_answer_for_another_version_or_kem_is_refused(client: KeyBrokerClient, broker: FakeBroker) -> None:
    _rewrite_release(broker, lambda body: body.update(version=2))
    with pytest.raises(KeyBrokerError, match="released 2"):
        client.release("model", 1)
    _rewrite_release(broker, lambda body: body.update(key_id="other"))
    with pytest.raises(KeyBrokerError, match="another key"):
        client.release("model", 1)
    _rewrite_release(broker, lambda body: body.update(kem="X25519"))
    with pytest.raises(KeyBrokerError, match="KEM"):
        client.release("model", 1)


def test_tampered_ciphertext_says_only_that_it_failed(client: KeyBrokerClient, broker: FakeBroker) -> None:
    def flip(body: dict[str, Any]) -> None:
        raw = bytearray(base64.b64decode(body["ciphertext"]))
        raw[-1] ^= 1
        body["ciphertext"] = b64(bytes(raw))

    _rewrite_release(broker, flip)
    with pytest.raises(DecryptionError) as info:
        client.release("model", 1)
    assert str(info.value) == "the released key could not be decrypted"


def test_short_nonce_and_bad_base64_are_broker_errors(client: KeyBrokerClient, broker: FakeBroker) -> None:
    broker.override = lambda r: httpx.Response(200, json={"nonce": b64(b"short")})
    with pytest.raises(KeyBrokerError, match="nonce"):
        client.release("model")
    broker.override = lambda r: httpx.Response(200, json={"nonce": "not base64!"})
    with pytest.raises(KeyBrokerError, match="base64"):
        client.release("model")


def test_no_key_bytes_in_repr_or_errors(client: KeyBrokerClient) -> None:
    handle = client.handle("model", 1)
    secret = KEK[("model", 1)]
    for text in (repr(client), repr(handle), str(handle)):
        assert secret.hex() not in text
        assert b64(secret) not in text
    with pytest.raises(TypeError):
        pickle.dumps(client)


def test_bad_arguments_fail_early(sim_provider: SimulationProvider) -> None:
    with pytest.raises(ConfigurationError, match="KEM"):
        KeyBrokerClient(URL, sim_provider, kem="P256", transport=httpx.MockTransport(lambda r: None))  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match="https"):
        KeyBrokerClient("http://plain.example", sim_provider)
    with pytest.raises(ConfigurationError, match="CA"):
        KeyBrokerClient("https://broker.example", sim_provider, verify="/nonexistent/ca.pem")
    with pytest.raises(ConfigurationError):
        KeyBrokerClient(URL, object(), transport=httpx.MockTransport(lambda r: None))  # type: ignore[arg-type,return-value]


# -- admin ---------------------------------------------------------------------------------------


class FakeAdmin:
    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.kek = KeyHandle.generate("model", 3)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != "Bearer good-token":
            return httpx.Response(401, json={"error": "unauthorized", "message": "invalid token"})
        path, method = request.url.path, request.method
        body = json.loads(request.content) if request.content else {}
        if path == "/v1/admin/keys" and method == "POST":
            if body["key_id"] == "forbidden":
                return httpx.Response(403, json={"error": "forbidden", "message": "missing scope keys:write"})
            return httpx.Response(201, json={"key_id": body["key_id"], "version": 1})
        if path == "/v1/admin/keys":
            policy = json.dumps({"type": "debug", "allow": False})
            return httpx.Response(
                200,
                json={"keys": [{"key_id": "model", "versions": [1, 2], "latest": 2, "state": "enabled",
                                "policy": policy}]},
            )  # fmt: skip
        if path.endswith("/wrap"):
            data_key, aad = base64.b64decode(body["plaintext"]), base64.b64decode(body["aad"])
            version, wrapped = self.kek.wrap_data_key("model", data_key, aad)
            return httpx.Response(200, json={"version": version, "wrapped": b64(wrapped)})
        if path.endswith("/rotate"):
            return httpx.Response(200, json={"key_id": "model", "version": 2})
        if method == "DELETE":
            return httpx.Response(204)
        if path == "/v1/admin/audit/verify":
            return httpx.Response(200, json={"ok": False, "records": 7, "first_bad": 4})
        if path == "/v1/admin/audit":
            return httpx.Response(200, json={"records": [{"seq": int(request.url.params["after"]) + 1}]})
        return httpx.Response(200, json={"key_id": "model"})


@pytest.fixture
def fake_admin() -> FakeAdmin:
    return FakeAdmin()


def admin_for(fake: FakeAdmin, token: str = "good-token") -> KeyBrokerAdmin:
    return KeyBrokerAdmin(URL, token, transport=httpx.MockTransport(fake))


def test_admin_round_trip(fake_admin: FakeAdmin, sim_provider: SimulationProvider) -> None:
    admin = admin_for(fake_admin)
    assert isinstance(admin, DataKeyWrapper)
    policy = UnsafeAllowSimulation(AllOf(MeasurementAllowlist([sim_provider.measurement])))
    assert admin.create_key("model", policy) == 1
    assert json.loads(fake_admin.requests[-1].content)["policy"] == policy.to_dict()
    assert admin.rotate_key("model") == 2
    admin.disable_key("model")
    admin.enable_key("model")
    admin.set_policy("model", {"type": "debug"})
    assert json.loads(fake_admin.requests[-1].content) == {"policy": {"type": "debug", "allow": False}}
    admin.set_min_version("model", 2)
    sent = fake_admin.requests[-1]
    assert (sent.method, sent.url.path, json.loads(sent.content)) == (
        "PUT",
        "/v1/admin/keys/model/min-version",
        {"min_version": 2},
    )
    for bad in (0, True, "2"):
        with pytest.raises(ConfigurationError, match="minimum version"):
            admin.set_min_version("model", bad)  # type: ignore[arg-type]
    assert fake_admin.requests[-1] is sent  # refused before any request
    [info] = admin.list_keys()
    assert (info.versions, info.latest, info.enabled, info.policy["type"]) == ((1, 2), 2, True, "debug")
    assert info.min_version == 1  # a broker that does not report it releases every version
    data_key = os.urandom(32)
    version, wrapped = admin.wrap_data_key("model", data_key, b"aad")
    assert version == 3
    assert fake_admin.kek.unwrap_data_key("model", 3, wrapped, b"aad") == data_key
    admin.delete_key("model")
    assert admin.audit_records(after=5) == [{"seq": 6}]
    verdict = admin.verify_audit()
    assert (verdict.ok, verdict.records, verdict.first_bad) == (False, 7, 4)
    assert "good-token" not in repr(admin)


def test_admin_key_ids_are_path_encoded(fake_admin: FakeAdmin) -> None:
    admin_for(fake_admin).rotate_key("team/model v2")
    assert fake_admin.requests[-1].url.raw_path == b"/v1/admin/keys/team%2Fmodel%20v2/rotate"


def test_admin_auth_errors(fake_admin: FakeAdmin) -> None:
    with pytest.raises(AuthorizationError, match="401"):
        admin_for(fake_admin, "bad-token").list_keys()
    with pytest.raises(AuthorizationError, match="403"):
        admin_for(fake_admin).create_key("forbidden", {"type": "debug"})
    with pytest.raises(ConfigurationError):
        KeyBrokerAdmin(URL, "  ")


def test_invalid_policy_is_rejected_before_any_request(fake_admin: FakeAdmin) -> None:
    with pytest.raises(ConfigurationError, match="unknown policy type"):
        admin_for(fake_admin).set_policy("model", {"type": "nope"})
    assert fake_admin.requests == []
