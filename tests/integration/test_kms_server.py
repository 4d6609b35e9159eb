"""The key broker over real HTTPS on 127.0.0.1 (uvicorn subprocesses and in-process), real SQLite.

Requests are built from docs/kbs-protocol.md with plain httpx and the cryptography HPKE API
(not the client SDK), so these tests pin the wire protocol itself.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from enclaveml._web import start_in_thread
from enclaveml.attestation import EvidenceVerifier
from enclaveml.attestation.policy import AllOf, MeasurementAllowlist, UnsafeAllowSimulation
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider, SimulationVerifier
from enclaveml.crypto.keys import unwrap_key
from enclaveml.errors import StorageError
from enclaveml.kms._rootkey import generate_root_key_file, load_root_key
from enclaveml.kms._storage import SqliteKeyStore
from enclaveml.kms._tokens import SCOPES, TokenAuthority
from enclaveml.kms.server import BrokerConfig, create_app, create_self_signed_certificate

_SERVER = """
import json, logging, sys
from enclaveml.attestation import EvidenceVerifier
from enclaveml.attestation.simulation import SimulationVerifier
from enclaveml.kms._rootkey import load_root_key
from enclaveml.kms.server import BrokerConfig, run_broker
logging.basicConfig(level=logging.DEBUG)
a = json.loads(sys.argv[1])
config = BrokerConfig(
    db_path=a["db"], root_key=load_root_key(a["root_key"], database=a["db"]),
    verifier=EvidenceVerifier(simulation=SimulationVerifier(bytes.fromhex(a["sim_pub"]))),
    nonce_ttl=a["ttl"], allowed_kems=frozenset(a["kems"]), max_request_body=64 * 1024,
)
run_broker(
    config, "127.0.0.1", a["port"], certfile=a["cert"], keyfile=a["key"], log_level="debug",
    workers=a["workers"],
)
"""
HYBRID, X25519 = "MLKEM768-X25519", "X25519"
SUITES = {
    HYBRID: hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}
ERROR_BODIES: list[str] = []  # every non-2xx body seen, checked by the canary test


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class Db:
    """A broker database, its root key file (in another directory) and two admin tokens."""

    path: Path
    root_key: Path
    admin: str
    reader: str


@dataclass
class Env:
    root: Path
    cert: Path
    tls_key: Path
    sim_key: SimulationKey
    provider: SimulationProvider
    logs: list[Path] = field(default_factory=list)

    def trust(self) -> ssl.SSLContext:
        """Pin the broker's self-signed certificate as the only trust anchor; host names are checked."""
        return ssl.create_default_context(cafile=self.cert)

    def database(self, name: str) -> Db:
        db, root_key = self.root / f"db-{name}" / "kbs.sqlite", self.root / f"secrets-{name}" / "root.key"
        generate_root_key_file(root_key, database=db)
        store = SqliteKeyStore(db)  # the CLI's bootstrap path: tokens straight into the database
        tokens = TokenAuthority(store)
        admin, reader = tokens.create_token("admin", SCOPES), tokens.create_token("reader", ["keys:read"])
        store.close()
        return Db(db, root_key, admin, reader)


class Broker:
    """One broker process serving HTTPS on an ephemeral port, its output captured in a file."""

    def __init__(
        self,
        env: Env,
        db: Db,
        root_key: Path | None = None,
        *,
        ttl: float = 60.0,
        kems=(HYBRID, X25519),
        workers: int = 1,
    ) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"https://127.0.0.1:{port}"
        self.log = env.root / f"broker-{port}-{time.monotonic_ns()}.log"
        env.logs.append(self.log)
        self.env = env
        args = {
            "db": str(db.path), "root_key": str(root_key or db.root_key), "ttl": ttl, "kems": list(kems),
            "sim_pub": env.sim_key.public_bytes.hex(), "port": port,
            "cert": str(env.cert), "key": str(env.tls_key), "workers": workers,
        }  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SERVER, json.dumps(args)], stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> Broker:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"broker exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/healthz", verify=self.env.trust(), timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"broker did not start:\n{self.log.read_text()[-3000:]}")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.env.trust(), timeout=30)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("kbs")
    cert, tls_key = root / "tls" / "broker.pem", root / "tls" / "broker.key"
    create_self_signed_certificate(cert, tls_key)
    assert (tls_key.stat().st_mode & 0o777) == 0o600
    sim_key = SimulationKey.generate()
    provider = SimulationProvider(key=sim_key, entry_point="tests", config={"suite": "kbs"})
    return Env(root, cert, tls_key, sim_key, provider)


@pytest.fixture(scope="module")
def main_db(env: Env) -> Db:
    return env.database("main")


@pytest.fixture(scope="module")
def broker(env: Env, main_db: Db) -> Iterator[Broker]:
    server = Broker(env, main_db).wait_ready()
    yield server
    server.stop()


class InProcessBroker:
    """A broker app (create_app) served by uvicorn over TLS in a thread of the test process."""

    def __init__(self, env: Env, config: BrokerConfig) -> None:
        self.env = env
        settings = uvicorn.Config(
            create_app(config), host="127.0.0.1", port=0, log_level="warning",
            ssl_certfile=str(env.cert), ssl_keyfile=str(env.tls_key),
        )  # fmt: skip
        self.running = start_in_thread(settings, name="test-kbs")
        self.url = self.running.url

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.env.trust(), timeout=30)

    def stop(self) -> None:
        self.running.stop(timeout=30)


def config_for(env: Env, db: Db, root_key: Path | None = None, **overrides: Any) -> BrokerConfig:
    verifier = EvidenceVerifier(simulation=SimulationVerifier(env.sim_key.public_key()))
    key = load_root_key(root_key or db.root_key, database=db.path)
    return BrokerConfig(db_path=db.path, root_key=key, verifier=verifier, **overrides)


@pytest.fixture(scope="module")
def strict(env: Env, main_db: Db, broker: Broker) -> Iterator[InProcessBroker]:
    """A second broker on the same database as the main process: 1 s nonces, hybrid KEM only."""
    server = InProcessBroker(env, config_for(env, main_db, nonce_ttl=1.0, allowed_kems=frozenset({HYBRID})))
    yield server
    server.stop()


@pytest.fixture
def http(broker: Broker) -> Iterator[httpx.Client]:
    with broker.client() as client:
        yield client


def call(
    client: httpx.Client, method: str, path: str, token: str | None = None, **kwargs: Any
) -> httpx.Response:
    headers = {**kwargs.pop("headers", {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    response = client.request(method, path, headers=headers, **kwargs)
    if response.status_code >= 400:
        ERROR_BODIES.append(response.text)
        assert response.headers["content-type"].startswith("application/json")
        assert {"error", "message"} <= set(response.json())
    return response


def policy_for(*providers: SimulationProvider) -> dict[str, Any]:
    return UnsafeAllowSimulation(AllOf(MeasurementAllowlist([p.measurement for p in providers]))).to_dict()


def deep_policy(depth: int) -> dict[str, Any]:
    policy: dict[str, Any] = {"type": "debug", "allow": False}
    for _ in range(depth):
        policy = {"type": "all_of", "rules": [policy]}
    return policy


def create_key(client: httpx.Client, db: Db, key_id: str, provider: SimulationProvider) -> None:
    answer = call(
        client, "POST", "/v1/admin/keys", db.admin, json={"key_id": key_id, "policy": policy_for(provider)}
    )
    assert answer.status_code == 201, answer.text
    assert answer.json() == {"key_id": key_id, "version": 1}


def wrap(
    client: httpx.Client, db: Db, key_id: str, data_key: bytes, aad: bytes = b"hdr"
) -> tuple[int, bytes]:
    answer = call(
        client,
        "POST",
        f"/v1/admin/keys/{key_id}/wrap",
        db.admin,
        json={"plaintext": b64(data_key), "aad": b64(aad)},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["version"], base64.b64decode(answer.json()["wrapped"])


class Workload:
    """An attested workload: an ephemeral HPKE key pair and simulation evidence bound to nonce and key."""

    def __init__(self, provider: SimulationProvider, kem: str = HYBRID) -> None:
        self.provider, self.kem = provider, kem
        x = x25519.X25519PrivateKey.generate()
        if kem == X25519:
            self.private: Any = x
            self.public = x.public_key().public_bytes_raw()
        else:
            m = mlkem.MLKEM768PrivateKey.generate()
            self.private = hpke.MLKEM768X25519PrivateKey(m, x)
            self.public = m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()

    def challenge(self, client: httpx.Client) -> bytes:
        answer = call(client, "POST", "/v1/challenge")
        assert answer.status_code == 200
        assert answer.json()["expires_at"] > time.time()
        return base64.b64decode(answer.json()["nonce"])

    def request(
        self, nonce: bytes, *, bound_to: bytes | None = None, version: int | None = None
    ) -> dict[str, Any]:
        digest = hashlib.sha256((nonce if bound_to is None else bound_to) + self.public).digest()
        evidence = self.provider.collect(digest + bytes(32)).to_bytes()
        return {
            "nonce": b64(nonce),
            "evidence": b64(evidence),
            "public_key": b64(self.public),
            "kem": self.kem,
            "version": version,
        }

    def release(self, client: httpx.Client, key_id: str, version: int | None = None) -> httpx.Response:
        body = self.request(self.challenge(client), version=version)
        return call(client, "POST", f"/v1/keys/{key_id}/release", json=body)

    def open(self, answer: httpx.Response, key_id: str) -> bytes:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["key_id"] == key_id
        assert body["kem"] == self.kem
        info = b"enclaveml-kbs-release-v1\x00" + key_id.encode() + b"\x00" + str(body["version"]).encode()
        return SUITES[self.kem].decrypt(base64.b64decode(body["ciphertext"]), self.private, info=info)


def assert_denied(answer: httpx.Response, rule: str) -> dict[str, Any]:
    assert answer.status_code == 403, answer.text
    body = answer.json()
    assert body["error"] == "denied"
    assert body["rule"] == rule
    assert "ciphertext" not in body
    return body


# -- release --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kem", [HYBRID, X25519])
def test_allowed_measurement_gets_the_key_that_unwraps_wrapped_data(
    http, env: Env, main_db: Db, kem: str
) -> None:
    key_id = f"model-{kem.lower()}"
    create_key(http, main_db, key_id, env.provider)
    data_key = os.urandom(32)
    version, wrapped = wrap(http, main_db, key_id, data_key)
    workload = Workload(env.provider, kem)
    kek = workload.open(workload.release(http, key_id), key_id)
    assert version == 1
    assert unwrap_key(kek, wrapped, b"hdr") == data_key


def test_denials_measurement_replay_binding(http, env: Env, main_db: Db) -> None:
    create_key(http, main_db, "denials", env.provider)
    intruder = Workload(SimulationProvider(key=env.sim_key, entry_point="tests", config={"suite": "evil"}))
    body = assert_denied(intruder.release(http, "denials"), "measurement")
    assert intruder.provider.measurement.hex() in body["observed"]

    workload = Workload(env.provider)
    replayed = workload.request(workload.challenge(http))
    workload.open(call(http, "POST", "/v1/keys/denials/release", json=replayed), "denials")
    assert_denied(call(http, "POST", "/v1/keys/denials/release", json=replayed), "nonce")

    nonce = workload.challenge(http)
    mismatched = workload.request(nonce, bound_to=os.urandom(32))
    assert_denied(call(http, "POST", "/v1/keys/denials/release", json=mismatched), "binding")


def test_rotation_keeps_both_versions_releasable(http, env: Env, main_db: Db) -> None:
    create_key(http, main_db, "rotating", env.provider)
    _, wrapped_v1 = wrap(http, main_db, "rotating", b"one")
    answer = call(http, "POST", "/v1/admin/keys/rotating/rotate", main_db.admin)
    assert answer.json() == {"key_id": "rotating", "version": 2}
    version, wrapped_v2 = wrap(http, main_db, "rotating", b"two")
    assert version == 2
    workload = Workload(env.provider)
    assert (
        unwrap_key(workload.open(workload.release(http, "rotating", 1), "rotating"), wrapped_v1, b"hdr")
        == b"one"
    )
    latest = workload.release(http, "rotating")
    assert latest.json()["version"] == 2
    assert unwrap_key(workload.open(latest, "rotating"), wrapped_v2, b"hdr") == b"two"
    assert (
        call(
            http,
            "POST",
            "/v1/keys/rotating/release",
            json=workload.request(workload.challenge(http), version=3),
        ).status_code
        == 404
    )


def test_disabled_key_is_refused_and_deleted_key_is_gone(http, env: Env, main_db: Db) -> None:
    create_key(http, main_db, "lifecycle", env.provider)
    admin = main_db.admin
    assert call(http, "POST", "/v1/admin/keys/lifecycle/disable", admin).json() == {
        "key_id": "lifecycle",
        "state": "disabled",
    }
    workload = Workload(env.provider)
    refused = workload.release(http, "lifecycle")
    assert refused.status_code == 403
    assert refused.json()["error"] == "disabled"
    assert (
        call(
            http, "POST", "/v1/admin/keys/lifecycle/wrap", admin, json={"plaintext": b64(b"k"), "aad": ""}
        ).status_code
        == 403
    )
    assert call(http, "POST", "/v1/admin/keys/lifecycle/enable", admin).json()["state"] == "enabled"
    workload.open(workload.release(http, "lifecycle"), "lifecycle")
    listed = {k["key_id"]: k for k in call(http, "GET", "/v1/admin/keys", main_db.reader).json()["keys"]}
    assert listed["lifecycle"] == {
        "key_id": "lifecycle",
        "versions": [1],
        "latest": 1,
        "min_version": 1,
        "state": "enabled",
        "policy": policy_for(env.provider),
    }
    # Minimum versions: an existing version, a keys:write token, a JSON integer.
    min_version = "/v1/admin/keys/lifecycle/min-version"
    assert call(http, "PUT", min_version, main_db.reader, json={"min_version": 1}).status_code == 403
    assert call(http, "PUT", min_version, admin, json={"min_version": 2}).status_code == 404
    for bad in (0, "1", 1.5, None):
        assert call(http, "PUT", min_version, admin, json={"min_version": bad}).status_code == 400
    assert call(http, "POST", "/v1/admin/keys/lifecycle/rotate", admin).json()["version"] == 2
    answer = call(http, "PUT", min_version, admin, json={"min_version": 2})
    assert (answer.status_code, answer.json()) == (200, {"key_id": "lifecycle", "min_version": 2})
    retired = workload.release(http, "lifecycle", version=1)
    assert (retired.status_code, retired.json()["rule"]) == (403, "version_retired")
    workload.open(workload.release(http, "lifecycle"), "lifecycle")
    assert call(http, "DELETE", "/v1/admin/keys/lifecycle", admin).status_code == 204
    assert workload.release(http, "lifecycle").status_code == 404
    assert call(http, "DELETE", "/v1/admin/keys/lifecycle", admin).status_code == 404
    assert "lifecycle" not in {k["key_id"] for k in call(http, "GET", "/v1/admin/keys", admin).json()["keys"]}


def test_policy_update_and_conflicts(http, env: Env, main_db: Db) -> None:
    create_key(http, main_db, "policed", env.provider)
    admin = main_db.admin
    other = SimulationProvider(key=env.sim_key, entry_point="tests", config={"suite": "v2"})
    assert call(
        http, "PUT", "/v1/admin/keys/policed/policy", admin, json={"policy": policy_for(other)}
    ).json() == {"key_id": "policed"}
    assert_denied(Workload(env.provider).release(http, "policed"), "measurement")
    newcomer = Workload(other)
    newcomer.open(newcomer.release(http, "policed"), "policed")
    bad_policy = call(http, "PUT", "/v1/admin/keys/policed/policy", admin, json={"policy": {"type": "nope"}})
    assert bad_policy.status_code == 400
    duplicate = call(
        http, "POST", "/v1/admin/keys", admin, json={"key_id": "policed", "policy": policy_for(other)}
    )
    assert duplicate.status_code == 409
    assert duplicate.json()["error"] == "exists"


def test_expired_nonce_and_refused_x25519_on_a_second_broker(
    env: Env, main_db: Db, strict: InProcessBroker, http
) -> None:
    create_key(http, main_db, "shared", env.provider)  # created by the process, served by the other
    with strict.client() as client:
        workload = Workload(env.provider)
        nonce = workload.challenge(client)
        time.sleep(1.2)
        body = assert_denied(
            call(client, "POST", "/v1/keys/shared/release", json=workload.request(nonce)), "nonce"
        )
        assert body["observed"] == "expired"
        workload.open(workload.release(client, "shared"), "shared")
        refused = Workload(env.provider, X25519).release(client, "shared")
        assert refused.status_code == 400
        assert refused.json()["error"] == "kem_not_allowed"
        assert refused.json()["allowed"] == [HYBRID]


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def test_two_worker_processes_share_nonces_and_stop_together(env: Env, main_db: Db) -> None:
    server = Broker(env, main_db, workers=2).wait_ready()
    clients = [server.client() for _ in range(8)]  # one TLS connection each, spread over the workers
    try:
        workers = _children(server.proc.pid)
        assert len(workers) == 2
        create_key(clients[0], main_db, "multi", env.provider)
        workload = Workload(env.provider)
        body = workload.request(workload.challenge(clients[0]))
        answers = [call(c, "POST", "/v1/keys/multi/release", json=body) for c in clients]
        assert sorted(a.status_code for a in answers) == [200] + [403] * 7  # one nonce, one release
        assert all(a.json()["rule"] == "nonce" for a in answers if a.status_code == 403)
        for client in clients:
            workload.open(workload.release(client, "multi"), "multi")
    finally:
        for client in clients:
            client.close()
        server.stop()
    assert server.proc.returncode == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


# -- admin, robustness, metrics -------------------------------------------------------------------


def test_admin_endpoints_require_a_token_with_the_scope(http, env: Env, main_db: Db) -> None:
    body = {"key_id": "nope", "policy": policy_for(env.provider)}
    missing = call(http, "POST", "/v1/admin/keys", json=body)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert call(http, "POST", "/v1/admin/keys", "not-a-token", json=body).status_code == 401
    assert call(http, "GET", "/v1/admin/audit", main_db.admin[:-2] + "xx").status_code == 401
    wrong_scope = call(http, "POST", "/v1/admin/keys", main_db.reader, json=body)
    assert wrong_scope.status_code == 403
    assert wrong_scope.json()["error"] == "forbidden"
    assert call(http, "GET", "/v1/admin/audit/verify", main_db.reader).status_code == 403
    assert call(http, "GET", "/v1/admin/keys", main_db.reader).status_code == 200


def test_malformed_requests_are_4xx_and_the_server_keeps_serving(http, env: Env, main_db: Db) -> None:
    admin = main_db.admin
    release = "/v1/keys/anything/release"
    good = Workload(env.provider).request(os.urandom(32))
    cases = [
        call(http, "POST", release, content=b"{not json", headers={"content-type": "application/json"}),
        call(http, "POST", release, json=[1, 2, 3]),
        call(http, "POST", release, json={**good, "nonce": "%%%not base64%%%"}),
        call(http, "POST", release, json={**good, "version": "3"}),
        call(http, "POST", release, json={k: v for k, v in good.items() if k != "evidence"}),
        call(http, "POST", "/v1/admin/keys", admin, json={"key_id": "a/b", "policy": {}}),
        call(
            http,
            "POST",
            "/v1/admin/keys",
            admin,
            json={"key_id": "bad id", "policy": policy_for(env.provider)},
        ),
        call(http, "GET", "/v1/admin/audit?limit=0", admin),
        call(http, "GET", f"/v1/admin/audit?after={2**64}", admin),  # not a SQLite integer
        call(http, "POST", "/v1/keys/a%20b/release", json=good),  # malformed ids, before the nonce
        call(http, "POST", "/v1/keys/k%0A/release", json=good),
        call(http, "POST", f"/v1/keys/{'a' * 200}/release", json=good),
        call(http, "POST", "/v1/admin/keys/a%20b/rotate", admin),
        call(http, "PUT", "/v1/admin/keys/a%20b/policy", admin, json={"policy": policy_for(env.provider)}),
        call(
            http,
            "POST",
            "/v1/admin/keys",
            admin,
            json={"key_id": "deep", "policy": deep_policy(400)},  # nesting a recursive parser cannot take
        ),
        call(
            http,
            "POST",
            "/v1/admin/keys/x/wrap",
            admin,
            content=b"\xff\xfe",
            headers={"content-type": "application/json"},
        ),
    ]
    assert [c.status_code for c in cases] == [400] * len(cases), [c.text for c in cases]
    assert all(c.json()["error"] == "bad_request" for c in cases)
    assert call(http, "GET", "/v1/no/such/route").json()["error"] == "not_found"
    assert call(http, "GET", "/v1/challenge").status_code == 405

    oversized = call(http, "POST", release, json={**good, "evidence": b64(os.urandom(100_000))})
    assert oversized.status_code == 413
    assert oversized.json()["error"] == "too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold for chunked bodies too
        for _ in range(100):
            yield b"x" * 1024

    assert call(http, "POST", release, content=chunks()).status_code == 413
    assert call(http, "GET", "/healthz").json() == {"status": "ok"}
    assert "/v1/keys/{key_id}/release" in call(http, "GET", "/openapi.json").json()["paths"]
    # No Swagger UI or ReDoc: both load a CDN's script into the page an operator pastes tokens into.
    assert call(http, "GET", "/docs").status_code == 404
    assert call(http, "GET", "/redoc").status_code == 404


def test_metrics_expose_releases_denials_latency_and_keys(http, env: Env, main_db: Db) -> None:
    create_key(http, main_db, "metered", env.provider)
    workload = Workload(env.provider)
    workload.open(workload.release(http, "metered"), "metered")
    assert_denied(
        call(http, "POST", "/v1/keys/metered/release", json=workload.request(os.urandom(32))), "nonce"
    )
    text = call(http, "GET", "/metrics").text
    assert 'enclaveml_kbs_releases_total{kem="MLKEM768-X25519"}' in text
    assert 'enclaveml_kbs_denials_total{rule="nonce"}' in text
    assert (
        'enclaveml_kbs_request_seconds_bucket{le="0.005",method="POST",route="/v1/keys/{key_id}/release",status="200"}'
        in text
    )
    keys = next(line for line in text.splitlines() if line.startswith("enclaveml_kbs_keys "))
    assert float(keys.split()[1]) >= 1


# -- durability -----------------------------------------------------------------------------------


def test_wrong_root_key_is_refused_at_startup(env: Env, main_db: Db, broker: Broker) -> None:
    other_key = env.root / "secrets-other" / "root.key"
    generate_root_key_file(other_key)
    with pytest.raises(StorageError, match="root key does not match"):
        create_app(config_for(env, main_db, other_key))


@dataclass
class Crash:
    """A broker killed with SIGKILL during a burst of key creations, then restarted on the same files."""

    db: Db
    acknowledged: list[str]
    wrapped: bytes
    revived: Broker


@pytest.fixture(scope="module")
def crash(env: Env) -> Iterator[Crash]:
    db = env.database("crash")
    victim = Broker(env, db).wait_ready()
    with victim.client() as client:
        create_key(client, db, "survivor", env.provider)
        _, wrapped = wrap(client, db, "survivor", b"still here")
    acknowledged: list[str] = []
    stop = threading.Event()

    def burst(worker: int) -> None:
        with victim.client() as client:
            for i in range(10_000):
                if stop.is_set():
                    return
                body = {"key_id": f"burst-{worker}-{i}", "policy": policy_for(env.provider)}
                try:
                    answer = client.post(
                        "/v1/admin/keys", headers={"Authorization": f"Bearer {db.admin}"}, json=body
                    )
                except httpx.TransportError:
                    return
                if answer.status_code == 201:
                    acknowledged.append(body["key_id"])

    workers = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 20
    while len(acknowledged) < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.stop(signal.SIGKILL)  # in the middle of the burst
    stop.set()
    for w in workers:
        w.join(timeout=30)
    assert len(acknowledged) >= 30
    revived = Broker(env, db).wait_ready()  # a new process on the same database and root key
    yield Crash(db, acknowledged, wrapped, revived)
    revived.stop()


def test_kill_9_during_a_creation_burst_leaves_a_consistent_database(crash: Crash) -> None:
    with sqlite3.connect(crash.db.path) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        keys = {r[0] for r in raw.execute("SELECT key_id FROM keys")}
        incomplete = raw.execute(
            "SELECT count(*) FROM keys WHERE key_id NOT IN (SELECT key_id FROM key_versions) "
            "OR key_id NOT IN (SELECT key_id FROM key_policies)"
        ).fetchone()[0]
        audited = {r[0] for r in raw.execute("SELECT key_id FROM audit WHERE event = 'key.create'")}
    assert set(crash.acknowledged) <= keys  # acknowledged means committed
    assert incomplete == 0
    assert audited == keys  # every key has its audit record, and no record lacks its key
    with crash.revived.client() as client:
        listed = call(client, "GET", "/v1/admin/keys", crash.db.reader).json()["keys"]
        verdict = call(client, "GET", "/v1/admin/audit/verify", crash.db.admin).json()
    assert {k["key_id"] for k in listed} == keys
    assert all(k["versions"] == [1] for k in listed)
    assert verdict["ok"]


def test_restart_keeps_keys(env: Env, crash: Crash) -> None:
    with crash.revived.client() as client:
        workload = Workload(env.provider)
        kek = workload.open(workload.release(client, "survivor"), "survivor")
        assert unwrap_key(kek, crash.wrapped, b"hdr") == b"still here"
        assert workload.open(workload.release(client, crash.acknowledged[0]), crash.acknowledged[0])


def test_edited_or_deleted_audit_rows_are_detected(crash: Crash) -> None:
    db = crash.db
    with crash.revived.client() as client:

        def verify() -> dict[str, Any]:
            return call(client, "GET", "/v1/admin/audit/verify", db.admin).json()

        records = call(client, "GET", "/v1/admin/audit?after=0&limit=1000", db.admin).json()["records"]
        assert verify() == {"ok": True, "records": len(records), "first_bad": None}
        target, victim = records[5]["seq"], records[8]["seq"]
        with sqlite3.connect(db.path) as raw:  # someone with file access "fixes" history
            raw.execute("UPDATE audit SET verdict = 'denied' WHERE seq = ?", (target,))
        assert verify() == {"ok": False, "records": len(records), "first_bad": target}
        with sqlite3.connect(db.path) as raw:
            raw.execute("UPDATE audit SET verdict = ? WHERE seq = ?", (records[5]["verdict"], target))
        assert verify()["ok"]
        with sqlite3.connect(db.path) as raw:
            raw.execute("DELETE FROM audit WHERE seq = ?", (victim,))
        assert verify() == {"ok": False, "records": len(records) - 1, "first_bad": records[9]["seq"]}


# -- canary: last, so it also sees every other test's error bodies and logs -----------------------


def test_canary_key_material_never_in_database_logs_or_error_bodies(
    http, env: Env, broker: Broker, main_db: Db
) -> None:
    create_key(http, main_db, "canary", env.provider)
    marker = b"CANARY-DATA-KEY-" + os.urandom(16)
    _, wrapped = wrap(http, main_db, "canary", marker)
    workload = Workload(env.provider)
    kek = workload.open(workload.release(http, "canary"), "canary")
    assert unwrap_key(kek, wrapped, b"hdr") == marker
    admin = main_db.admin
    # Malformed wrap requests carrying the marker must not echo it back.
    call(http, "POST", "/v1/admin/keys/canary/wrap", admin, json={"plaintext": b64(marker) + "!", "aad": ""})
    call(http, "POST", "/v1/admin/keys/canary/wrap", admin, json={"plaintext": b64(marker * 3), "aad": ""})
    call(http, "POST", "/v1/admin/keys/canary/wrap", admin, json={"plaintext": [b64(marker)], "aad": 1})
    call(http, "POST", "/v1/admin/keys/missing/wrap", admin, json={"plaintext": b64(marker), "aad": ""})

    db = main_db.path
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    logs = b"".join(p.read_bytes() for p in env.logs)
    bodies = "\n".join(ERROR_BODIES).encode()
    assert len(ERROR_BODIES) > 20
    assert len(logs) > 1000
    for secret in (kek, marker):
        for form in (secret, secret.hex().encode(), b64(secret).encode(), b64(secret)[:-2].encode()):
            assert form not in stored
            assert form not in logs
            assert form not in bodies


@contextlib.contextmanager
def _challenge_upload(env: Env, broker: InProcessBroker, first: bytes) -> Iterator[ssl.SSLSocket]:
    """A raw TLS connection that sent the head of a 100-byte ``POST /v1/challenge`` and ``first``."""
    host, port = broker.url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        env.trust().wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(
            b"POST /v1/challenge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + first
        )
        yield tls


def test_a_trickled_request_body_gets_408_once_below_the_minimum_rate(
    env: Env, strict: InProcessBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte now and then, each within the idle deadline, must not hold a broker connection."""
    from enclaveml.kms import server as kms_server

    monkeypatch.setattr(kms_server, "DEFAULT_BODY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(kms_server, "DEFAULT_MIN_BODY_RATE", 100.0)
    with _challenge_upload(env, strict, b"") as tls:
        started = time.monotonic()
        tls.settimeout(0.2)
        answer = b""
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while time.monotonic() - started < 8 and not answer.endswith(b"}"):
                tls.sendall(b" ")  # 10 bytes/s: the 100-byte body would take 10 s
                with contextlib.suppress(TimeoutError):
                    answer += tls.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 3
    assert b"100 bytes/s" in answer


def test_a_stalled_request_body_gets_408_and_its_connection_closed(
    env: Env, strict: InProcessBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends part of a body and waits must not hold a broker connection for ever."""
    from enclaveml.kms import server as kms_server

    monkeypatch.setattr(kms_server, "DEFAULT_BODY_TIMEOUT_S", 0.5)
    with _challenge_upload(env, strict, b"{") as tls:
        started = time.monotonic()
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 5
    with strict.client() as http:  # the broker is fine
        assert http.get("/healthz").status_code == 200
