"""KeyBroker without HTTP: keys, wrapping, attested release and its denials, tokens, audit, root key."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pickle
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from enclaveml.attestation import (
    AllOf,
    Claims,
    Evidence,
    EvidenceVerifier,
    MeasurementAllowlist,
    UnsafeAllowSimulation,
)
from enclaveml.attestation._time import Instant
from enclaveml.attestation.policy import dump_policy, policy_from_dict
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider, SimulationVerifier
from enclaveml.crypto.keys import unwrap_key
from enclaveml.errors import (
    ConfigurationError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
    StorageError,
)
from enclaveml.kms._release import release_info
from enclaveml.kms._rootkey import (
    ROOT_KEY_ENV,
    RootKey,
    generate_root_key_file,
    load_root_key,
)
from enclaveml.kms._service import InvalidRequestError, KemNotAllowedError, KeyBroker
from enclaveml.kms._storage import KeyExistsError, SqliteKeyStore
from enclaveml.kms._tokens import InvalidTokenError, MissingScopeError

SUITES = {
    "MLKEM768-X25519": hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    "X25519": hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Workload:
    """The client side of a release, written from the protocol document (not the SDK)."""

    def __init__(self, provider: SimulationProvider, kem: str = "MLKEM768-X25519") -> None:
        self.provider, self.kem = provider, kem
        self.x = x25519.X25519PrivateKey.generate()
        if kem == "X25519":
            self.private: object = self.x
            self.public = self.x.public_key().public_bytes_raw()
        else:
            m = mlkem.MLKEM768PrivateKey.generate()
            self.private = hpke.MLKEM768X25519PrivateKey(m, self.x)
            self.public = m.public_key().public_bytes_raw() + self.x.public_key().public_bytes_raw()

    def evidence(self, nonce: bytes, public: bytes | None = None) -> bytes:
        digest = hashlib.sha256(nonce + (self.public if public is None else public)).digest()
        return self.provider.collect(digest + bytes(32)).to_bytes()

    def open(self, ciphertext: bytes, key_id: str, version: int) -> bytes:
        return SUITES[self.kem].decrypt(ciphertext, self.private, info=release_info(key_id, version))  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def root_key() -> RootKey:
    return RootKey.generate()


@pytest.fixture
def broker(tmp_path: Path, root_key: RootKey, sim_key: SimulationKey, clock: Clock) -> Iterator[KeyBroker]:
    store = SqliteKeyStore(tmp_path / "kbs.sqlite")
    verifier = EvidenceVerifier(simulation=SimulationVerifier(sim_key.public_key()))
    yield KeyBroker(store, root_key, verifier, clock=clock, nonce_ttl=60)
    store.close()


@pytest.fixture
def policy(sim_provider: SimulationProvider) -> UnsafeAllowSimulation:
    return UnsafeAllowSimulation(AllOf(MeasurementAllowlist([sim_provider.measurement])))


def _release(broker: KeyBroker, workload: Workload, key_id: str = "k", version: int | None = None) -> bytes:
    challenge = broker.challenge()
    released = broker.release(
        key_id, challenge.nonce, workload.evidence(challenge.nonce), workload.public, workload.kem, version
    )
    assert released.key_id == key_id
    assert released.kem == workload.kem
    return workload.open(released.ciphertext, key_id, released.version)


@pytest.mark.parametrize("kem", ["MLKEM768-X25519", "X25519"])
def test_release_unwraps_what_wrap_wrapped(broker: KeyBroker, policy, sim_provider, kem: str) -> None:
    assert broker.create_key("k", policy) == 1
    version, wrapped = broker.wrap("k", b"D" * 32, b"header")
    kek = _release(broker, Workload(sim_provider, kem))
    assert version == 1
    assert unwrap_key(kek, wrapped, b"header") == b"D" * 32
    record = broker.audit_records()[-1]
    assert (record.event, record.verdict, record.version) == ("release", "released", 1)
    assert record.measurement == sim_provider.measurement.hex()
    assert broker.metrics.releases.labels(kem=kem)._value.get() == 1


def test_rotation_keeps_old_versions_releasable(broker: KeyBroker, policy, sim_provider) -> None:
    broker.create_key("k", policy)
    _, wrapped_v1 = broker.wrap("k", b"one", b"")
    assert broker.rotate_key("k") == 2
    version, wrapped_v2 = broker.wrap("k", b"two", b"")
    assert version == 2
    workload = Workload(sim_provider)
    assert unwrap_key(_release(broker, workload, version=1), wrapped_v1, b"") == b"one"
    assert unwrap_key(_release(broker, workload), wrapped_v2, b"") == b"two"
    info = broker.get_key("k")
    assert info.versions == (1, 2)
    assert info.latest == 2
    assert info.policy == policy.to_dict()


def test_policy_records_name_the_actor_and_the_whole_policy_however_long_it_is(
    broker: KeyBroker, sim_provider
) -> None:
    # A policy over ~480 characters used to push "(by actor)" and its own end past the 500
    # characters of a record: a policy:write token could add its workload unattributed.
    allowed = [bytes([i]) * 32 for i in range(7)]
    broker.create_key("k", UnsafeAllowSimulation(MeasurementAllowlist(allowed)), actor="owner")
    widened = UnsafeAllowSimulation(MeasurementAllowlist([*allowed, sim_provider.measurement]))
    broker.set_policy("k", widened, actor="mallory")
    records = {r.event: r for r in broker.audit_records(limit=10)}
    stored = dump_policy(policy_from_dict(broker.get_key("k").policy))
    assert len(stored) > 500
    for event, actor, policy_json in [
        ("key.create", "owner", dump_policy(UnsafeAllowSimulation(MeasurementAllowlist(allowed)))),
        ("policy.set", "mallory", stored),
    ]:
        detail = records[event].detail
        digest = hashlib.sha256(policy_json.encode()).hexdigest()
        assert detail.startswith(f"by {actor}: policy sha256:{digest} {policy_json[:100]}")
        assert len(detail) == 500


def test_retired_versions_are_not_released_until_the_minimum_is_lowered(
    broker: KeyBroker, policy, sim_provider
) -> None:
    broker.create_key("k", policy)
    _, wrapped_v1 = broker.wrap("k", b"model v1 key", b"")
    broker.rotate_key("k")
    _, wrapped_v2 = broker.wrap("k", b"model v2 key", b"")
    broker.set_min_version("k", 2, actor="owner")
    info = broker.get_key("k")
    assert (info.versions, info.latest, info.min_version) == ((1, 2), 2, 2)
    assert info.to_dict()["min_version"] == 2
    workload = Workload(sim_provider)
    c = broker.challenge()
    error = _denied(
        broker,
        "version_retired",
        key_id="k",
        nonce=c.nonce,
        evidence=workload.evidence(c.nonce),
        public_key=workload.public,
        version=1,
    )
    assert (error.observed, error.expected) == ("version 1", "version >= 2")
    assert broker.audit_records()[-1].version == 1
    assert unwrap_key(_release(broker, workload), wrapped_v2, b"") == b"model v2 key"  # the latest
    assert unwrap_key(_release(broker, workload, version=2), wrapped_v2, b"") == b"model v2 key"
    change = [r for r in broker.audit_records(limit=100) if r.event == "key.min_version"]
    assert [(r.version, r.detail) for r in change] == [(2, "by owner: min_version 2")]
    broker.set_min_version("k", 1)  # the owner takes it back
    assert unwrap_key(_release(broker, workload, version=1), wrapped_v1, b"") == b"model v1 key"
    with pytest.raises(KeyNotFoundError, match="no version 3"):
        broker.set_min_version("k", 3)
    for bad in (0, -1, True, 2.0, "2", 2**63):
        with pytest.raises(InvalidRequestError, match="minimum version"):
            broker.set_min_version("k", bad)  # type: ignore[arg-type]
    assert broker.get_key("k").min_version == 1


def _denied(broker: KeyBroker, rule: str, **kwargs: object) -> KeyReleaseDeniedError:
    with pytest.raises(KeyReleaseDeniedError) as caught:
        broker.release(**kwargs)  # type: ignore[arg-type]
    assert caught.value.rule == rule
    record = broker.audit_records(after=0, limit=1000)[-1]
    assert (record.verdict, record.rule) == ("denied", rule)
    assert broker.metrics.denials.labels(rule=rule)._value.get() >= 1
    return caught.value


def test_nonce_is_single_use_even_after_a_failure(broker: KeyBroker, policy, sim_provider) -> None:
    broker.create_key("k", policy)
    w = Workload(sim_provider)
    c = broker.challenge()
    # First attempt fails (wrong binding) and still burns the nonce...
    _denied(broker, "binding", key_id="k", nonce=c.nonce, evidence=w.evidence(b"other"), public_key=w.public)
    # ...so a correct second attempt with the same nonce is refused as a replay.
    error = _denied(
        broker, "nonce", key_id="k", nonce=c.nonce, evidence=w.evidence(c.nonce), public_key=w.public
    )
    assert "already used" in error.observed
    _denied(
        broker, "nonce", key_id="k", nonce=os.urandom(32), evidence=w.evidence(c.nonce), public_key=w.public
    )


def test_expired_nonce(broker: KeyBroker, policy, sim_provider, clock: Clock) -> None:
    broker.create_key("k", policy)
    w = Workload(sim_provider)
    c = broker.challenge()
    assert c.expires_at == clock.now + 60
    clock.now += 61
    error = _denied(
        broker, "nonce", key_id="k", nonce=c.nonce, evidence=w.evidence(c.nonce), public_key=w.public
    )
    assert error.observed == "expired"


def test_other_measurement_and_bad_evidence_are_denied(broker: KeyBroker, policy, sim_key) -> None:
    broker.create_key("k", policy)
    intruder = Workload(SimulationProvider(key=sim_key, entry_point="tests", config={"evil": True}))
    c = broker.challenge()
    error = _denied(
        broker,
        "measurement",
        key_id="k",
        nonce=c.nonce,
        evidence=intruder.evidence(c.nonce),
        public_key=intruder.public,
    )
    assert intruder.provider.measurement.hex() in error.observed
    assert broker.audit_records()[-1].measurement == intruder.provider.measurement.hex()
    c = broker.challenge()
    _denied(
        broker, "evidence", key_id="k", nonce=c.nonce, evidence=b"\xa1garbage", public_key=intruder.public
    )
    forged = SimulationProvider(
        key=SimulationKey.generate(), entry_point="tests", config={"purpose": "unit-test"}
    )
    c = broker.challenge()
    w = Workload(forged)
    _denied(broker, "evidence", key_id="k", nonce=c.nonce, evidence=w.evidence(c.nonce), public_key=w.public)


def test_policy_change_takes_effect(broker: KeyBroker, policy, sim_provider) -> None:
    broker.create_key("k", policy)
    broker.set_policy("k", {"type": "measurement", "values": [sim_provider.measurement.hex()]})
    w, c = Workload(sim_provider), broker.challenge()
    # Without the unsafe wrapper, every rule refuses simulation evidence.
    _denied(
        broker, "simulation", key_id="k", nonce=c.nonce, evidence=w.evidence(c.nonce), public_key=w.public
    )
    with pytest.raises(ConfigurationError):
        broker.set_policy("k", {"type": "no-such-rule"})


def test_disabled_missing_and_malformed(broker: KeyBroker, policy, sim_provider, root_key) -> None:
    broker.create_key("k", policy)
    w = Workload(sim_provider)

    def attempt(key_id: str = "k", **overrides: object) -> None:
        c = broker.challenge()
        args = {"nonce": c.nonce, "evidence": w.evidence(c.nonce), "public_key": w.public, **overrides}
        broker.release(key_id, **args)  # type: ignore[arg-type]

    broker.disable_key("k")
    with pytest.raises(KeyDisabledError):
        attempt()
    with pytest.raises(KeyDisabledError):
        broker.wrap("k", b"x", b"")
    broker.enable_key("k")
    with pytest.raises(KeyNotFoundError):
        attempt(version=2)
    with pytest.raises(KeyNotFoundError):
        attempt("missing")
    with pytest.raises(InvalidRequestError, match="1216 bytes"):
        attempt(public_key=w.public[:-1])
    with pytest.raises(KemNotAllowedError):
        attempt(kem="P256")
    with pytest.raises(InvalidRequestError, match="key ids"):
        broker.create_key("bad/id", policy)
    with pytest.raises(KeyExistsError):
        broker.create_key("k", policy)
    with pytest.raises(InvalidRequestError):
        broker.wrap("k", b"x" * 65, b"")
    broker.delete_key("k")
    with pytest.raises(KeyNotFoundError):
        attempt()
    rules = [r.rule for r in broker.audit_records(limit=1000) if r.event == "release"]
    assert rules == ["disabled", "not_found", "not_found", "request", "request", "not_found"]


@pytest.mark.parametrize("version", [2**63, -(2**63), 2**80])
def test_a_version_beyond_sqlite_integers_is_not_found_and_audited(
    broker: KeyBroker, policy, sim_provider, version: int
) -> None:
    broker.create_key("k", policy)
    w = Workload(sim_provider)
    c = broker.challenge()
    with pytest.raises(KeyNotFoundError, match="no version"):
        broker.release("k", c.nonce, w.evidence(c.nonce), w.public, w.kem, version)
    last = broker.audit_records(limit=1000)[-1]
    assert (last.event, last.verdict, last.rule, last.version) == ("release", "denied", "not_found", None)
    assert broker.verify_audit().ok


def test_policy_is_parsed_once_per_stored_text_and_changes_are_seen(
    broker: KeyBroker, policy, sim_provider, sim_key: SimulationKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    from enclaveml.attestation import policy_from_dict as real
    from enclaveml.kms import _release as release_module

    parsed: list[object] = []

    def counting(data: object) -> object:
        parsed.append(data)
        return real(data)  # type: ignore[arg-type]

    release_module._load_policy.cache_clear()
    monkeypatch.setattr(release_module, "policy_from_dict", counting)
    broker.create_key("k", policy)
    workload = Workload(sim_provider)
    for _ in range(3):
        assert len(_release(broker, workload)) == 32
    assert len(parsed) == 1  # three releases, one parse
    other = SimulationProvider(key=sim_key, entry_point="tests", config={"v": 2})
    broker.set_policy("k", UnsafeAllowSimulation(AllOf(MeasurementAllowlist([other.measurement]))))
    with pytest.raises(KeyReleaseDeniedError):  # the new policy applies to the very next release
        _release(broker, workload)
    assert len(_release(broker, Workload(other))) == 32
    assert len(parsed) == 2


def test_x25519_can_be_refused_by_configuration(
    tmp_path: Path, root_key, sim_key, policy, sim_provider
) -> None:
    store = SqliteKeyStore(tmp_path / "strict.sqlite")
    verifier = EvidenceVerifier(simulation=SimulationVerifier(sim_key.public_key()))
    strict = KeyBroker(store, root_key, verifier, allowed_kems={"MLKEM768-X25519"})
    strict.create_key("k", policy)
    with pytest.raises(KemNotAllowedError) as caught:
        _release(strict, Workload(sim_provider, "X25519"))
    assert caught.value.allowed == {"MLKEM768-X25519"}
    assert len(_release(strict, Workload(sim_provider))) == 32
    with pytest.raises(ConfigurationError):
        KeyBroker(store, root_key, verifier, allowed_kems=set())
    store.close()


def test_stored_material_that_does_not_decrypt_is_an_audited_storage_denial(
    broker: KeyBroker, policy, sim_provider
) -> None:
    # The broker's own message calls this tampering: it must reach the audit log, not only a 500.
    broker.create_key("k", policy)
    with sqlite3.connect(broker.store.path) as raw:  # type: ignore[attr-defined]
        raw.execute("UPDATE key_versions SET wrapped = ? WHERE key_id = 'k'", (os.urandom(60),))
    workload = Workload(sim_provider)
    c = broker.challenge()
    with pytest.raises(StorageError, match="does not decrypt"):
        broker.release("k", c.nonce, workload.evidence(c.nonce), workload.public)
    record = broker.audit_records()[-1]
    assert (record.event, record.verdict, record.rule, record.version) == ("release", "denied", "storage", 1)
    assert record.measurement == sim_provider.measurement.hex()
    assert broker.metrics.denials.labels(rule="storage")._value.get() == 1


def test_what_an_unauthenticated_release_is_told_is_bounded(broker: KeyBroker, policy, sim_provider) -> None:
    broker.create_key("k", policy)
    broker.rotate_key("k")
    workload = Workload(sim_provider)
    c = broker.challenge()
    with pytest.raises(KeyNotFoundError) as missing:  # not the list of versions (keys:read lists them)
        broker.release("k", c.nonce, workload.evidence(c.nonce), workload.public, version=9)
    assert "[1, 2]" not in str(missing.value)
    c = broker.challenge()
    with pytest.raises(KemNotAllowedError) as kem:  # a 200 KB kem was echoed whole, logged whole
        broker.release("k", c.nonce, workload.evidence(c.nonce), workload.public, kem="K" * 200_000)
    assert len(str(kem.value)) < 200
    assert len(broker.audit_records()[-1].detail) < 200


def test_wrong_root_key_fails_at_startup(tmp_path: Path, root_key, sim_key, policy) -> None:
    verifier = EvidenceVerifier(simulation=SimulationVerifier(sim_key.public_key()))
    store = SqliteKeyStore(tmp_path / "kbs.sqlite")
    KeyBroker(store, root_key, verifier).create_key("k", policy)
    with pytest.raises(StorageError, match="root key does not match"):
        KeyBroker(store, RootKey.generate(), verifier)
    store.close()


def test_tokens_and_scopes(broker: KeyBroker) -> None:
    token = broker.create_token("ops", ["keys:read", "keys:write"])
    assert len(token) == 43
    assert broker.authenticate(token, "keys:read").name == "ops"
    with pytest.raises(MissingScopeError, match="keys:delete"):
        broker.authenticate(token, "keys:delete")
    for bad in (None, "", "x" * 43, token + "x"):
        with pytest.raises(InvalidTokenError):
            broker.authenticate(bad, "keys:read")
    with pytest.raises(ConfigurationError):
        broker.create_token("ops2", ["root"])
    with pytest.raises(KeyExistsError):
        broker.create_token("ops", ["keys:read"])
    broker.revoke_token("ops")
    with pytest.raises(InvalidTokenError):
        broker.authenticate(token, "keys:read")
    raw = (broker.store.path).read_bytes()  # type: ignore[attr-defined]
    assert token.encode() not in raw


def test_no_key_material_in_audit_or_database(
    broker: KeyBroker, policy, sim_provider, tmp_path: Path
) -> None:
    broker.create_key("k", policy)
    secret = os.urandom(32)
    broker.wrap("k", secret, b"aad")
    kek = _release(broker, Workload(sim_provider))
    audit = repr([r.to_dict() for r in broker.audit_records(limit=1000)])
    db_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("kbs.sqlite*"))
    for marker in (kek, secret):
        for form in (marker, marker.hex().encode(), base64.b64encode(marker)):
            assert form not in db_bytes
            assert form.decode("latin-1") not in audit
    assert broker.verify_audit().ok


# -- root key files -------------------------------------------------------------------------------


def test_root_key_formats_and_environment(tmp_path: Path) -> None:
    secret = os.urandom(32)
    keys = tmp_path / "keys"
    keys.mkdir()
    for name, data in (
        ("raw", secret),
        ("hex", secret.hex().encode() + b"\n"),
        ("b64", base64.b64encode(secret) + b"\n"),
        ("url", base64.urlsafe_b64encode(secret).rstrip(b"=")),
    ):
        path = keys / name
        path.write_bytes(data)
        path.chmod(0o600)
        assert load_root_key(path).fingerprint() == RootKey(secret).fingerprint()
    assert load_root_key(environ={ROOT_KEY_ENV: secret.hex()}).fingerprint() == RootKey(secret).fingerprint()
    with pytest.raises(ConfigurationError, match=ROOT_KEY_ENV):
        load_root_key(environ={})
    bad = keys / "bad"
    bad.write_bytes(b"too short")
    bad.chmod(0o600)
    with pytest.raises(ConfigurationError) as caught:
        load_root_key(bad)
    assert "too short" not in str(caught.value)
    assert secret.hex() not in repr(RootKey(secret))
    assert "hidden" in str(RootKey(secret))


def test_root_key_file_permissions_and_location(tmp_path: Path) -> None:
    path = generate_root_key_file(tmp_path / "secrets" / "root.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    load_root_key(path, database=tmp_path / "db" / "kbs.sqlite")
    with pytest.raises(ConfigurationError, match="already exists"):
        generate_root_key_file(path)
    path.chmod(0o604)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        load_root_key(path)
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match="inside the database directory"):
        load_root_key(path, database=tmp_path / "secrets" / "kbs.sqlite")
    with pytest.raises(ConfigurationError, match="inside the database directory"):
        generate_root_key_file(tmp_path / "db" / "sub" / "root.key", database=tmp_path / "db" / "kbs.sqlite")
    loaded = load_root_key(path)
    with pytest.raises(TypeError):
        pickle.dumps(loaded)


MALFORMED_IDS = ["a b", "\x00", "k\n", "", "-k", "a" * 129, "k/../j"]


@pytest.mark.parametrize("key_id", MALFORMED_IDS)
def test_a_malformed_key_id_is_refused_before_anything_is_read_consumed_or_audited(
    broker: KeyBroker, policy, sim_provider, key_id: str
) -> None:
    broker.create_key("k", policy)
    workload = Workload(sim_provider)
    challenge = broker.challenge()
    audited = len(broker.audit_records(limit=1000))
    with pytest.raises(InvalidRequestError, match="key ids"):
        broker.release(
            key_id, challenge.nonce, workload.evidence(challenge.nonce), workload.public, workload.kem
        )
    admin = [
        lambda: broker.rotate_key(key_id),
        lambda: broker.disable_key(key_id),
        lambda: broker.enable_key(key_id),
        lambda: broker.delete_key(key_id),
        lambda: broker.set_policy(key_id, policy),
        lambda: broker.get_key(key_id),
        lambda: broker.wrap(key_id, b"D" * 32, b""),
    ]
    for call in admin:
        with pytest.raises(InvalidRequestError, match="key ids"):
            call()
    assert len(broker.audit_records(limit=1000)) == audited  # no row, whatever the id held
    # The nonce was not consumed by the refused request: it still releases the real key.
    released = broker.release(
        "k", challenge.nonce, workload.evidence(challenge.nonce), workload.public, workload.kem
    )
    assert released.key_id == "k"


def test_a_key_deleted_while_keys_are_listed_does_not_fail_the_list(broker: KeyBroker, policy) -> None:
    for key_id in ("a", "b", "c"):
        broker.create_key(key_id, policy)
    real_get = broker.store.get_key

    def deleted_meanwhile(key_id: str) -> object:  # another admin deletes every key right after the list
        raise KeyNotFoundError(f"no key {key_id!r}")

    broker.store.get_key = deleted_meanwhile  # type: ignore[assignment]
    try:
        assert [k.key_id for k in broker.list_keys()] == ["a", "b", "c"]
    finally:
        broker.store.get_key = real_get  # type: ignore[method-assign]


def test_a_stored_policy_that_no_longer_loads_is_an_audited_denial(
    tmp_path: Path,
    root_key: RootKey,
    sim_key: SimulationKey,
    sim_provider,
    policy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A policy an older enclaveml stored (an advisory id that could never match) is refused now."""
    path = tmp_path / "kbs.sqlite"
    verifier = EvidenceVerifier(simulation=SimulationVerifier(sim_key.public_key()))
    store = SqliteKeyStore(path)
    KeyBroker(store, root_key, verifier).create_key("k", policy)
    store.close()
    old = '{"accepted":["UpToDate"],"rejected_advisories":["INTEL-SA-615"],"type":"tcb_status"}'
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.execute("UPDATE key_policies SET policy = ? WHERE key_id = 'k'", (old,))
        raw.commit()
    store = SqliteKeyStore(path)
    try:
        broker = KeyBroker(store, root_key, verifier)  # starts, and says which key cannot be released
        assert "key 'k' has a stored release policy that does not load" in caplog.text
        workload = Workload(sim_provider)
        c = broker.challenge()
        error = _denied(
            broker,
            "policy_invalid",
            key_id="k",
            nonce=c.nonce,
            evidence=workload.evidence(c.nonce),
            public_key=workload.public,
        )
        assert "INTEL-SA-615" in str(error)
        broker.set_policy("k", policy)  # the owner sets it again
        assert len(_release(broker, workload)) == 32
    finally:
        store.close()


class _Crashing:
    """A verifier with a parser bug that hostile evidence triggers (not an enclaveml error)."""

    def verify(self, evidence: Evidence, *, now: Instant = None) -> Claims:
        raise TypeError("oid must be X500_UNIQUE_IDENTIFIER for BitString type.")


def test_a_verifier_crash_is_an_audited_evidence_denial(
    tmp_path: Path, root_key: RootKey, sim_provider, policy, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteKeyStore(tmp_path / "kbs.sqlite")
    broker = KeyBroker(store, root_key, _Crashing())  # type: ignore[arg-type]
    try:
        broker.create_key("k", policy)
        workload = Workload(sim_provider)
        c = broker.challenge()
        error = _denied(
            broker,
            "evidence",
            key_id="k",
            nonce=c.nonce,
            evidence=workload.evidence(c.nonce),
            public_key=workload.public,
        )
        assert (error.observed, str(error)) == ("TypeError", "evidence could not be verified (TypeError)")
        assert "evidence verification raised TypeError" in caplog.text
        assert not any(r.verdict == "released" for r in broker.audit_records(limit=100))
    finally:
        store.close()


class _Meanwhile:
    """A verifier that runs an admin action once, while a release is being appraised."""

    def __init__(self, inner: EvidenceVerifier) -> None:
        self.inner = inner
        self.action: Callable[[], object] | None = None

    def verify(self, evidence: Evidence, *, now: Instant = None) -> Claims:
        claims = self.inner.verify(evidence, now=now)
        action, self.action = self.action, None
        if action is not None:
            action()
        return claims


@pytest.mark.parametrize(
    ("change", "error", "rule"),
    [
        (lambda b, p: b.disable_key("k"), KeyDisabledError, "disabled"),
        (lambda b, p: b.delete_key("k"), KeyNotFoundError, "not_found"),
        (lambda b, p: b.set_policy("k", UnsafeAllowSimulation(AllOf(MeasurementAllowlist([bytes(32)])))),
         KeyReleaseDeniedError, "key_changed"),
        # Back as it was by the time the release commits, but not the key that was read:
        (lambda b, p: (b.disable_key("k"), b.enable_key("k")), KeyReleaseDeniedError, "key_changed"),
        (lambda b, p: (b.delete_key("k"), b.create_key("k", p)), KeyReleaseDeniedError, "key_changed"),
        (lambda b, p: b.set_policy("k", p), KeyReleaseDeniedError, "key_changed"),
        # The version being released (the latest when read) is retired meanwhile:
        (lambda b, p: (b.rotate_key("k"), b.set_min_version("k", 2)), KeyReleaseDeniedError, "key_changed"),
    ],
)  # fmt: skip
def test_a_disable_delete_or_policy_change_during_a_release_stops_it(
    tmp_path: Path, root_key: RootKey, sim_key: SimulationKey, sim_provider, policy, change, error, rule
) -> None:
    store = SqliteKeyStore(tmp_path / "kbs.sqlite")
    verifier = _Meanwhile(EvidenceVerifier(simulation=SimulationVerifier(sim_key.public_key())))
    broker = KeyBroker(store, root_key, verifier)
    try:
        broker.create_key("k", policy)
        workload = Workload(sim_provider)
        verifier.action = lambda: change(broker, policy)  # returns before the release is recorded
        with pytest.raises(error):
            _release(broker, workload)
        last = broker.audit_records()[-1]
        assert (last.event, last.verdict, last.rule) == ("release", "denied", rule)
        assert not any(r.verdict == "released" for r in broker.audit_records(limit=1000))
        # A rotation meanwhile is no change of who may have the key: that release goes through.
        if rule == "disabled":
            broker.enable_key("k")
            verifier.action = lambda: broker.rotate_key("k")
            assert len(_release(broker, workload, version=1)) == 32
    finally:
        store.close()
