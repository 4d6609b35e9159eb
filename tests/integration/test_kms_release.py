"""Key release against the real broker over HTTPS on 127.0.0.1, with the simulation TEE.

The broker is the server engineer's FastAPI app under uvicorn in a thread (own port, own
self-signed certificate, pinned by the clients). ``running_broker`` is imported by the other
key broker integration tests.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import uvicorn

from enclaveml._web import start_in_thread
from enclaveml.attestation.evidence import Evidence, TeeType
from enclaveml.attestation.policy import AllOf, MeasurementAllowlist, UnsafeAllowSimulation
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider, SimulationVerifier
from enclaveml.attestation.verifier import EvidenceVerifier, Verifier
from enclaveml.crypto.sealed import read_header, seal_bytes, unseal_bytes
from enclaveml.errors import (
    AuthorizationError,
    ConfigurationError,
    DecryptionError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
)
from enclaveml.kms import client as client_module
from enclaveml.kms._rootkey import RootKey
from enclaveml.kms._tokens import SCOPES
from enclaveml.kms.admin import KeyBrokerAdmin
from enclaveml.kms.client import KeyBrokerClient
from enclaveml.kms.server import BrokerConfig, create_app, create_self_signed_certificate

CANARY = b"CANARY-enclaveml-plaintext-7f3a9c2e51d04b86"


@dataclass
class RunningBroker:
    url: str
    ca: Path
    token: str

    def admin(self, token: str | None = None) -> KeyBrokerAdmin:
        return KeyBrokerAdmin(self.url, token or self.token, verify=str(self.ca))

    def client(self, provider: SimulationProvider, **kwargs: object) -> KeyBrokerClient:
        return KeyBrokerClient(self.url, provider, verify=str(self.ca), **kwargs)  # type: ignore[arg-type]


@contextmanager
def running_broker(
    db: Path, root_key: RootKey, verifier: Verifier, tls_dir: Path, *, scopes: frozenset[str] = SCOPES
) -> Iterator[RunningBroker]:
    """Serve a broker on an ephemeral 127.0.0.1 port over TLS until the block ends."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    cert, key = tls_dir / "cert.pem", tls_dir / "key.pem"
    if not cert.exists():
        create_self_signed_certificate(cert, key)
    app = create_app(BrokerConfig(db_path=db, root_key=root_key, verifier=verifier))
    token = app.state.broker.create_token(f"test-{os.urandom(3).hex()}", scopes)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, ssl_certfile=str(cert), ssl_keyfile=str(key),
        log_level="info", lifespan="on", loop="asyncio",
    )  # fmt: skip
    running = start_in_thread(config, name="test-kbs", startup_timeout=20)
    try:
        yield RunningBroker(running.url, cert, token)
    finally:
        running.stop(timeout=20)


@pytest.fixture
def root_key() -> RootKey:
    return RootKey.generate()


@pytest.fixture
def broker(tmp_path: Path, root_key: RootKey, sim_verifier: SimulationVerifier) -> Iterator[RunningBroker]:
    with running_broker(
        tmp_path / "db" / "kbs.db", root_key, EvidenceVerifier(simulation=sim_verifier), tmp_path / "tls"
    ) as running:
        yield running


def allow_only(provider: SimulationProvider) -> UnsafeAllowSimulation:
    return UnsafeAllowSimulation(AllOf(MeasurementAllowlist([provider.measurement])))


@pytest.fixture
def other_provider(sim_key: SimulationKey) -> SimulationProvider:
    """Same TEE and signing key, different workload configuration: a different measurement."""
    return SimulationProvider(key=sim_key, entry_point="tests", config={"purpose": "something-else"})


def test_allowed_workload_gets_the_key_and_unseals_a_model(
    broker: RunningBroker, sim_provider: SimulationProvider
) -> None:
    model = b"onnx-model-weights:" + CANARY + os.urandom(4096)
    with broker.admin() as admin, broker.client(sim_provider) as client:
        assert admin.create_key("model", allow_only(sim_provider)) == 1
        sealed = seal_bytes(model, wrapper=admin, key_id="model", content_type="application/onnx")
        handle = client.release("model")
        assert (handle.key_id, handle.version) == ("model", 1)
        assert unseal_bytes(sealed, unwrapper=client) == model
        events = [(r["event"], r["verdict"], r["measurement"]) for r in admin.audit_records()]
    assert ("release", "released", sim_provider.measurement.hex()) in events


def test_other_measurement_is_denied_and_gets_no_key(
    broker: RunningBroker, sim_provider: SimulationProvider, other_provider: SimulationProvider
) -> None:
    with broker.admin() as admin, broker.client(other_provider) as intruder:
        admin.create_key("model", allow_only(sim_provider))
        sealed = seal_bytes(b"weights" + CANARY, wrapper=admin, key_id="model")
        with pytest.raises(KeyReleaseDeniedError) as denied:
            intruder.release("model")
        assert denied.value.rule == "measurement"
        assert other_provider.measurement.hex() in denied.value.observed
        assert sim_provider.measurement.hex() in denied.value.expected
        with pytest.raises(KeyReleaseDeniedError):
            unseal_bytes(sealed, unwrapper=intruder)
        assert intruder.cached_versions == []
        denials = [r for r in admin.audit_records() if r["verdict"] == "denied"]
    assert {r["rule"] for r in denials} == {"measurement"}


class _MisbindingProvider:
    """Real simulation evidence, but bound to other report data than the release asked for."""

    def __init__(self, inner: SimulationProvider) -> None:
        self.inner = inner

    @property
    def tee(self) -> TeeType:
        return self.inner.tee

    def collect(self, report_data: bytes) -> Evidence:
        return self.inner.collect(bytes(64))


def test_evidence_bound_to_other_data_is_denied(
    broker: RunningBroker, sim_provider: SimulationProvider
) -> None:
    with broker.admin() as admin:
        admin.create_key("model", allow_only(sim_provider))
    client = KeyBrokerClient(broker.url, _MisbindingProvider(sim_provider), verify=str(broker.ca))
    with client, pytest.raises(KeyReleaseDeniedError) as denied:
        client.release("model")
    assert denied.value.rule == "binding"


def test_rotation_keeps_older_versions_unsealable(
    broker: RunningBroker, sim_provider: SimulationProvider
) -> None:
    with broker.admin() as admin, broker.client(sim_provider, kem="X25519") as client:
        admin.create_key("model", allow_only(sim_provider))
        first = seal_bytes(b"v1 weights", wrapper=admin, key_id="model")
        assert admin.rotate_key("model") == 2
        second = seal_bytes(b"v2 weights", wrapper=admin, key_id="model")
        assert (read_header(first).key_version, read_header(second).key_version) == (1, 2)
        assert unseal_bytes(first, unwrapper=client) == b"v1 weights"
        assert unseal_bytes(second, unwrapper=client) == b"v2 weights"
        assert client.release("model").version == 2
        [info] = admin.list_keys()
    assert (info.versions, info.latest, info.state) == ((1, 2), 2, "enabled")


def test_retired_versions_stop_older_artifacts_from_unsealing(
    broker: RunningBroker, sim_provider: SimulationProvider
) -> None:
    """Rollback protection: the owner seals v2 under a rotated key and retires version 1."""
    with broker.admin() as admin:
        admin.create_key("model", allow_only(sim_provider))
        first = seal_bytes(b"v1 weights", wrapper=admin, key_id="model")
        admin.rotate_key("model")
        second = seal_bytes(b"v2 weights", wrapper=admin, key_id="model")
        admin.set_min_version("model", 2)
        [info] = admin.list_keys()
        assert (info.versions, info.latest, info.min_version) == ((1, 2), 2, 2)
        with broker.client(sim_provider) as client:  # a server started after the owner's change
            with pytest.raises(KeyReleaseDeniedError, match="retired") as denied:
                unseal_bytes(first, unwrapper=client)
            assert (denied.value.rule, denied.value.expected) == ("version_retired", "version >= 2")
            assert unseal_bytes(second, unwrapper=client) == b"v2 weights"
        with pytest.raises(KeyNotFoundError):
            admin.set_min_version("model", 3)
        admin.set_min_version("model", 1)
        with broker.client(sim_provider) as client:
            assert unseal_bytes(first, unwrapper=client) == b"v1 weights"
        records = admin.audit_records(limit=1000)
    changes = [(r["event"], r["version"]) for r in records if r["event"] == "key.min_version"]
    assert changes == [("key.min_version", 2), ("key.min_version", 1)]
    assert [r["rule"] for r in records if r["verdict"] == "denied"] == ["version_retired"]


def test_a_maximum_key_age_makes_a_broker_side_disable_reach_a_long_lived_reader(
    broker: RunningBroker, sim_provider: SimulationProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]  # the client's monotonic clock, moved by hand: no sleeps, no timing races
    monkeypatch.setattr(client_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    with broker.admin() as admin:
        admin.create_key("data", allow_only(sim_provider))
        sealed = seal_bytes(b"day 1 partition", wrapper=admin, key_id="data")
        with (
            broker.client(sim_provider) as forever,
            KeyBrokerClient(broker.url, sim_provider, verify=str(broker.ca), max_key_age_s=60) as bounded,
        ):
            for client in (forever, bounded):
                assert unseal_bytes(sealed, unwrapper=client) == b"day 1 partition"
            admin.disable_key("data")
            clock[0] += 60
            assert unseal_bytes(sealed, unwrapper=bounded) == b"day 1 partition"  # still young
            clock[0] += 0.5
            with pytest.raises(KeyDisabledError):
                unseal_bytes(sealed, unwrapper=bounded)
            assert bounded.cached_versions == []  # the old key is gone, not kept for later
            assert (
                unseal_bytes(sealed, unwrapper=forever) == b"day 1 partition"
            )  # the default: until forget()
            admin.enable_key("data")
            assert unseal_bytes(sealed, unwrapper=bounded) == b"day 1 partition"
    for bad in (0, -1.0, float("inf"), float("nan"), True, "60"):
        with pytest.raises(ConfigurationError, match="max_key_age_s"):
            KeyBrokerClient(broker.url, sim_provider, max_key_age_s=bad)  # type: ignore[arg-type]


def test_restart_keeps_keys(
    tmp_path: Path, root_key: RootKey, sim_verifier: SimulationVerifier, sim_provider: SimulationProvider
) -> None:
    db, verifier = tmp_path / "db" / "kbs.db", EvidenceVerifier(simulation=sim_verifier)
    with running_broker(db, root_key, verifier, tmp_path / "tls") as first, first.admin() as admin:
        admin.create_key("model", allow_only(sim_provider))
        sealed = seal_bytes(b"survives restarts", wrapper=admin, key_id="model")
    with (
        running_broker(db, root_key, verifier, tmp_path / "tls") as second,
        second.client(sim_provider) as client,
    ):
        assert unseal_bytes(sealed, unwrapper=client) == b"survives restarts"


def test_disabled_unknown_and_unauthorized(broker: RunningBroker, sim_provider: SimulationProvider) -> None:
    with broker.admin() as admin, broker.client(sim_provider) as client:
        admin.create_key("model", allow_only(sim_provider))
        admin.disable_key("model")
        with pytest.raises(KeyDisabledError):
            client.release("model")
        admin.enable_key("model")
        with pytest.raises(KeyNotFoundError):
            client.release("model", 7)
        with pytest.raises(KeyNotFoundError):
            client.release("no-such-key")
        with pytest.raises(AuthorizationError, match="401"), broker.admin("not-a-token") as stranger:
            stranger.list_keys()
        admin.delete_key("model")
        with pytest.raises(KeyNotFoundError):
            client.release("model")


def test_canary_never_leaves_the_sealed_file_or_the_workload(
    tmp_path: Path,
    broker: RunningBroker,
    sim_provider: SimulationProvider,
    other_provider: SimulationProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    model = b"model-header " + CANARY + b" model-tail" + os.urandom(2048)
    errors: list[str] = []
    with (
        broker.admin() as admin,
        broker.client(sim_provider) as client,
        broker.client(other_provider) as intruder,
    ):
        admin.create_key("model", allow_only(sim_provider))
        sealed_path = tmp_path / "model.sealed"
        sealed_path.write_bytes(seal_bytes(model, wrapper=admin, key_id="model"))
        assert unseal_bytes(sealed_path.read_bytes(), unwrapper=client) == model
        kek = client.handle("model", 1).secret_bytes()
        tampered = bytearray(sealed_path.read_bytes())
        tampered[-5] ^= 1
        for attempt in (
            lambda: unseal_bytes(sealed_path.read_bytes(), unwrapper=intruder),
            lambda: unseal_bytes(bytes(tampered), unwrapper=client),
        ):
            with pytest.raises((KeyReleaseDeniedError, DecryptionError)) as failure:
                attempt()
            errors.append(repr(failure.value) + str(failure.value) + str(failure.value.__cause__))
        admin.rotate_key("model")
        audit = repr(admin.audit_records(limit=1000))
    secrets = {"canary": CANARY, "kek": kek}
    texts = {"logs": caplog.text, "errors": "\n".join(errors), "audit": audit, "repr": repr(client)}
    for name, secret in secrets.items():
        for where, text in texts.items():
            for form in (secret.decode("latin-1"), secret.hex(), base64.b64encode(secret).decode()):
                assert form not in text, f"{name} found in {where}"
        for path in (p for p in tmp_path.rglob("*") if p.is_file()):
            assert secret not in path.read_bytes(), f"{name} found in {path}"
