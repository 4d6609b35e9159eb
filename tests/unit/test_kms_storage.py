"""SqliteKeyStore on real SQLite files: schema, pragmas, atomicity, nonces, tokens, audit chain."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclaveml.errors import (
    ConfigurationError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
    StorageError,
)
from enclaveml.kms._audit import AuditEvent, AuditRecord
from enclaveml.kms._schema import SCHEMA_VERSION
from enclaveml.kms._storage import KeyExistsError, KeyStore, NonceStatus, SqliteKeyStore, StoredKey

POLICY = '{"type":"measurement","values":["00"]}'


def _event(name: str = "key.create", key_id: str | None = "k") -> AuditEvent:
    return AuditEvent(1000.0, name, "ok", key_id=key_id)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteKeyStore]:
    s = SqliteKeyStore(tmp_path / "db" / "kbs.sqlite")
    yield s
    s.close()


def _raw(store: SqliteKeyStore) -> sqlite3.Connection:
    return sqlite3.connect(store.path)


def test_is_a_keystore_and_creates_a_private_versioned_wal_file(store: SqliteKeyStore) -> None:
    typed: KeyStore = store  # structural conformance, checked by mypy in server.py too
    assert typed is store
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    raw = _raw(store)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA application_id").fetchone()[0] == 0x656B4253
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"meta", "keys", "key_policies", "key_versions", "tokens", "nonces", "audit"} <= tables
    raw.close()
    # The store's own connection: durable commits and enforced foreign keys.
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_refuses_a_newer_schema_and_foreign_databases(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite"
    SqliteKeyStore(newer).close()
    with sqlite3.connect(newer) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StorageError, match="newer than this enclaveml"):
        SqliteKeyStore(newer)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE t (x)")
    with pytest.raises(StorageError, match="not a key broker database"):
        SqliteKeyStore(other)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError):
        SqliteKeyStore(garbage)


def test_root_key_binding(store: SqliteKeyStore) -> None:
    store.bind_root_key(b"a" * 32)
    store.bind_root_key(b"a" * 32)
    with pytest.raises(StorageError, match="root key does not match"):
        store.bind_root_key(b"b" * 32)


def test_a_database_holding_keys_without_its_root_key_record_binds_no_root_key(store: SqliteKeyStore) -> None:
    # With the record gone (a lost row, a partial restore) any root key was accepted and new keys
    # were wrapped under it beside the old ones, which then failed only at release.
    store.bind_root_key(b"a" * 32)
    store.create_key("k", POLICY, b"wrapped-1", now=1.0, audit=_event())
    with _raw(store) as raw:
        raw.execute("DELETE FROM meta WHERE name = 'root_key_check'")
    for fingerprint in (b"b" * 32, b"a" * 32):
        with pytest.raises(StorageError, match="no record of the root key"):
            store.bind_root_key(fingerprint)
    with _raw(store) as raw:
        assert raw.execute("SELECT count(*) FROM meta WHERE name = 'root_key_check'").fetchone()[0] == 0


@pytest.mark.parametrize("suffix", ["", "-journal", "-wal", "-shm"])
@pytest.mark.parametrize("mode", [0o666, 0o602])
def test_a_database_file_anyone_may_write_is_refused(tmp_path: Path, suffix: str, mode: int) -> None:
    # Its tokens table is the admin credential store: a restored or pre-created file keeps its mode.
    path = tmp_path / "kbs.sqlite"
    SqliteKeyStore(path).close()
    target = path.with_name(path.name + suffix)
    target.touch()
    target.chmod(mode)
    with pytest.raises(ConfigurationError, match="writable by other users"):
        SqliteKeyStore(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
@pytest.mark.parametrize("suffix", ["", "-journal", "-wal"])
def test_a_database_file_of_another_user_is_refused_even_at_mode_600(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "kbs.sqlite"
    SqliteKeyStore(path).close()
    target = path.with_name(path.name + suffix)
    target.touch(mode=0o600)
    os.chown(target, 65534, 65534)  # nobody: may write it, hence mint admin tokens
    with pytest.raises(ConfigurationError, match="belongs to user 65534"):
        SqliteKeyStore(path)


@pytest.mark.parametrize("mode", [0o777, 0o1777])
def test_a_directory_anyone_may_write_is_refused_sticky_or_not(tmp_path: Path, mode: int) -> None:
    # Sticky or not, anyone may create kbs.sqlite-journal there, and SQLite replays a hot journal
    # into the database at the next open: the reviewer replaced the token table through /tmp.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(ConfigurationError, match="may be written by other users"):
        SqliteKeyStore(shared / "kbs.sqlite")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user or group needs root")
def test_a_directory_group_writable_is_accepted_only_for_the_brokers_own_group(tmp_path: Path) -> None:
    directory = tmp_path / "db"
    directory.mkdir(mode=0o770)
    directory.chmod(0o2770)  # as a Kubernetes fsGroup volume: the broker's own group
    SqliteKeyStore(directory / "kbs.sqlite").close()
    os.chown(directory, 0, 65534)  # another group may write it
    with pytest.raises(ConfigurationError, match="may be written by other users"):
        SqliteKeyStore(directory / "kbs.sqlite")
    os.chown(directory, 65534, os.getegid())  # another user owns it
    with pytest.raises(ConfigurationError, match="may be written by other users"):
        SqliteKeyStore(directory / "kbs.sqlite")


@pytest.mark.parametrize("mode", [0o660, 0o644, 0o640])
def test_the_brokers_own_database_file_with_group_or_other_access_is_made_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    # Kubernetes' fsGroup makes volume files group-writable at every mount: refusing them stopped
    # the broker at its next restart; the broker's own file is set to 0600 instead.
    path = tmp_path / "kbs.sqlite"
    SqliteKeyStore(path).close()
    path.chmod(mode)
    SqliteKeyStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"had mode {mode:o}" in caplog.text


def test_key_lifecycle_and_cascading_delete(store: SqliteKeyStore) -> None:
    store.create_key("k", POLICY, b"wrapped-1", now=1.0, audit=_event())
    with pytest.raises(KeyExistsError):
        store.create_key("k", POLICY, b"x", now=1.0, audit=_event())
    assert store.add_version("k", lambda v: f"wrapped-{v}".encode(), now=2.0, audit=_event("key.rotate")) == 2
    key, version = store.get_version("k", None)
    assert key.versions == (1, 2)
    assert key.latest == 2
    assert key.state == "enabled"
    assert key.policy == POLICY
    assert version.version == 2
    assert version.wrapped == b"wrapped-2"
    assert "wrapped-2" not in repr(version)
    assert store.get_version("k", 1)[1].wrapped == b"wrapped-1"
    with pytest.raises(KeyNotFoundError, match="no version 7"):
        store.get_version("k", 7)
    store.set_state("k", "disabled", now=3.0, audit=_event("key.disable"))
    store.set_policy("k", "{}", now=4.0, audit=_event("policy.set"))
    assert store.get_key("k").state == "disabled"
    assert store.get_key("k").policy == "{}"
    assert [k.key_id for k in store.list_keys()] == ["k"]
    assert store.count_keys() == 1
    store.delete_key("k", audit=_event("key.delete"))
    with pytest.raises(KeyNotFoundError):
        store.get_key("k")
    raw = _raw(store)
    assert raw.execute("SELECT count(*) FROM key_versions").fetchone()[0] == 0
    assert raw.execute("SELECT count(*) FROM key_policies").fetchone()[0] == 0
    raw.close()
    for call in (
        lambda: store.add_version("k", lambda v: b"x", now=1.0, audit=_event()),
        lambda: store.set_state("k", "enabled", now=1.0, audit=_event()),
        lambda: store.set_policy("k", POLICY, now=1.0, audit=_event()),
        lambda: store.delete_key("k", audit=_event()),
    ):
        with pytest.raises(KeyNotFoundError):
            call()
    events = [r.event for r in store.audit_records()]
    assert events == ["key.create", "key.rotate", "key.disable", "policy.set", "key.delete"]
    assert [r.version for r in store.audit_records()][:2] == [1, 2]


def test_a_failing_change_leaves_no_trace(store: SqliteKeyStore) -> None:
    store.create_key("k", POLICY, b"w", now=1.0, audit=_event())

    def explode(version: int) -> bytes:
        raise RuntimeError("wrapping failed")

    with pytest.raises(RuntimeError):
        store.add_version("k", explode, now=2.0, audit=_event("key.rotate"))
    assert store.get_key("k").versions == (1,)
    assert len(store.audit_records()) == 1
    # A constraint violation half way through a creation rolls back the rows already inserted.
    with pytest.raises(StorageError):
        store.create_key("bad", POLICY, None, now=1.0, audit=_event(key_id="bad"))  # type: ignore[arg-type]
    with pytest.raises(KeyNotFoundError):
        store.get_key("bad")
    assert len(store.audit_records()) == 1
    assert store.verify_audit().ok


def test_nonces_are_single_use_and_expire(store: SqliteKeyStore) -> None:
    store.add_nonce(b"n1", 100.0, now=40.0)
    store.add_nonce(b"n2", 100.0, now=40.0)
    assert store.consume_nonce(b"n1", now=50.0) is NonceStatus.OK
    assert store.consume_nonce(b"n1", now=50.0) is NonceStatus.UNKNOWN
    assert store.consume_nonce(b"n2", now=100.0) is NonceStatus.EXPIRED
    assert store.consume_nonce(b"never", now=50.0) is NonceStatus.UNKNOWN
    store.add_nonce(b"old", 10.0, now=5.0)
    store.add_nonce(b"new", 300.0, now=200.0)  # purges every expired nonce
    raw = _raw(store)
    assert [r[0] for r in raw.execute("SELECT nonce FROM nonces")] == [b"new"]
    raw.close()


def test_nonce_is_consumed_exactly_once_under_concurrency(store: SqliteKeyStore) -> None:
    store.add_nonce(b"race", 100.0, now=1.0)
    results: list[NonceStatus] = []
    threads = [
        threading.Thread(target=lambda: results.append(store.consume_nonce(b"race", now=2.0)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.value for r in results) == ["ok"] + ["unknown"] * 7


def test_tokens(store: SqliteKeyStore) -> None:
    store.add_token(b"h" * 32, "alice", frozenset({"keys:read"}), now=1.0, audit=_event("token.create", None))
    with pytest.raises(KeyExistsError):
        store.add_token(b"i" * 32, "alice", frozenset(), now=1.0, audit=_event("token.create", None))
    token = store.find_token(b"h" * 32)
    assert token is not None
    assert token.name == "alice"
    assert token.scopes == {"keys:read"}
    assert not token.revoked
    assert store.find_token(b"x" * 32) is None
    store.revoke_token("alice", audit=_event("token.revoke", None))
    assert store.find_token(b"h" * 32).revoked  # type: ignore[union-attr]
    with pytest.raises(KeyNotFoundError):
        store.revoke_token("bob", audit=_event("token.revoke", None))
    assert [t.name for t in store.list_tokens()] == ["alice"]


def test_audit_chain_survives_reopen_and_detects_tampering(tmp_path: Path) -> None:
    path = tmp_path / "kbs.sqlite"
    store = SqliteKeyStore(path)
    for i in range(5):
        store.append_audit(AuditEvent(float(i), "release", "denied", key_id="k", rule="nonce"))
    store.close()
    store = SqliteKeyStore(path)
    store.append_audit(AuditEvent(9.0, "release", "released", key_id="k"))
    assert store.verify_audit() == (True, 6, None)
    assert [r.seq for r in store.audit_records(after=2, limit=2)] == [3, 4]
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE audit SET verdict = 'released' WHERE seq = 2")
    assert store.verify_audit() == (False, 6, 2)
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE audit SET verdict = 'denied' WHERE seq = 2")
    assert store.verify_audit().ok
    with sqlite3.connect(path) as raw:
        raw.execute("DELETE FROM audit WHERE seq = 6")  # the newest record: only the head notices
    assert store.verify_audit() == (False, 5, 6)
    # Numbers are never reused, so the hole stays visible after later appends.
    assert store.append_audit(AuditEvent(10.0, "release", "released")).seq == 7
    assert store.verify_audit().first_bad is not None
    store.close()


def test_concurrent_writers_keep_the_chain_and_every_key(store: SqliteKeyStore, tmp_path: Path) -> None:
    second = SqliteKeyStore(store.path)  # a second connection, as another process would have

    def work(s: SqliteKeyStore, prefix: str) -> None:
        for i in range(15):
            s.create_key(f"{prefix}{i}", POLICY, b"w", now=1.0, audit=_event(key_id=f"{prefix}{i}"))
            s.append_audit(AuditEvent(1.0, "release", "denied", key_id=f"{prefix}{i}", rule="nonce"))

    threads = [
        threading.Thread(target=work, args=(s, p)) for s, p in ((store, "a"), (store, "b"), (second, "c"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    second.close()
    assert store.count_keys() == 45
    assert store.verify_audit() == (True, 90, None)


def test_nonces_commit_without_fsync_everything_else_durably(store: SqliteKeyStore) -> None:
    # Three connections: durable writes (FULL), nonces (NORMAL), and read-only lookups.
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._nonce_conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert store._read_conn.execute("PRAGMA query_only").fetchone()[0] == 1
    for conn in (store._nonce_conn, store._read_conn):
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store._read_conn.execute("DELETE FROM nonces")


def test_nonce_is_single_use_across_stores_on_one_file(store: SqliteKeyStore) -> None:
    others = [SqliteKeyStore(store.path) for _ in range(3)]  # as other broker processes would
    try:
        for round_ in range(5):
            nonce = f"race-{round_}".encode()
            store.add_nonce(nonce, 100.0, now=1.0)
            results: list[NonceStatus] = []
            threads = [
                threading.Thread(target=lambda s=s: results.append(s.consume_nonce(nonce, now=2.0)))
                for s in [store, *others] * 2
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(r.value for r in results) == ["ok"] + ["unknown"] * 7
    finally:
        for other in others:
            other.close()


def test_reads_see_what_another_connection_committed(store: SqliteKeyStore) -> None:
    other = SqliteKeyStore(store.path)
    try:
        store.create_key("k", POLICY, b"w", now=1.0, audit=_event())
        assert other.get_key("k").policy == POLICY
        other.set_policy("k", "{}", now=2.0, audit=_event("policy.set"))
        other.set_state("k", "disabled", now=2.0, audit=_event("key.disable"))
        key, _ = store.get_version("k", None)
        assert (key.policy, key.state) == ("{}", "disabled")
    finally:
        other.close()


def _queued_appends(
    store: SqliteKeyStore, events: list[AuditEvent], release_of: list[StoredKey | None] | None = None
) -> list[object]:
    """Append ``events`` from one thread each while the write lock is held, then let them go."""
    outcomes: list[object] = [None] * len(events)
    guards = release_of or [None] * len(events)

    def append(i: int) -> None:
        try:
            outcomes[i] = store.append_audit(events[i], release_of=guards[i])
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            outcomes[i] = exc

    threads = [threading.Thread(target=append, args=(i,)) for i in range(len(events))]
    with store._lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(store._audit_queue) < len(events):  # all queued behind the lock
            assert time.monotonic() < deadline
            time.sleep(0.01)
    for t in threads:
        t.join()
    return outcomes


def test_concurrent_audit_appends_share_one_durable_commit(
    store: SqliteKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    real = SqliteKeyStore._append_all

    def recording(db: sqlite3.Connection, events: list[AuditEvent]) -> list[AuditRecord]:
        batches.append(len(events))
        return real(db, events)

    monkeypatch.setattr(SqliteKeyStore, "_append_all", staticmethod(recording))
    store.append_audit(AuditEvent(1.0, "release", "released", key_id="k"))
    events = [AuditEvent(2.0, "release", "denied", key_id=f"k{i}", rule="nonce") for i in range(8)]
    outcomes = _queued_appends(store, events)
    assert batches == [1, 8]  # the first thread to get the lock wrote every queued record
    records = [o for o in outcomes if isinstance(o, AuditRecord)]
    assert sorted(r.seq for r in records) == list(range(2, 10))
    assert {r.key_id for r in records} == {e.key_id for e in events}  # each caller got its own record
    assert store.verify_audit() == (True, 9, None)
    assert [r.seq for r in store.audit_records(limit=100)] == list(range(1, 10))


def test_a_bad_record_fails_only_its_own_caller(store: SqliteKeyStore) -> None:
    good = [AuditEvent(1.0, "release", "released", key_id=f"k{i}") for i in range(4)]
    poison = AuditEvent(1.0, "release", "denied", key_id="bad", version=2**70)  # not an SQLite integer
    outcomes = _queued_appends(store, [*good[:2], poison, *good[2:]])
    assert isinstance(outcomes[2], OverflowError)
    stored = [o for o in outcomes if isinstance(o, AuditRecord)]
    assert [r.key_id for r in stored] == ["k0", "k1", "k2", "k3"]
    assert store.verify_audit() == (True, 4, None)


@pytest.mark.parametrize("poisoned", [False, True])
def test_a_release_record_is_written_only_while_its_key_is_unchanged(
    store: SqliteKeyStore, poisoned: bool
) -> None:
    names = ["same", "disabled", "deleted", "repoliced", "retired"]
    for key_id in names:
        store.create_key(key_id, POLICY, b"w", now=1.0, audit=_event(key_id=key_id))
    store.add_version("retired", lambda version: b"w2", now=1.5, audit=_event("key.rotate", "retired"))
    read = {key_id: store.get_key(key_id) for key_id in names}
    store.set_state("disabled", "disabled", now=2.0, audit=_event("key.disable", "disabled"))
    store.delete_key("deleted", audit=_event("key.delete", "deleted"))
    store.set_policy(
        "repoliced", '{"type":"measurement","values":["01"]}', now=2.0, audit=_event("p", "repoliced")
    )
    store.set_min_version("retired", 2, now=2.0, audit=_event("key.min_version", "retired"))
    events = [AuditEvent(3.0, "release", "released", key_id=name) for name in [*names, "other"]]
    guards: list[StoredKey | None] = [*read.values(), None]
    if poisoned:  # a record that fails its batch: each is then written alone, still guarded
        events.append(AuditEvent(3.0, "release", "denied", key_id="bad", version=2**70))
        guards.append(None)
    outcomes = _queued_appends(store, events, guards)
    assert isinstance(outcomes[0], AuditRecord)
    assert isinstance(outcomes[5], AuditRecord)
    assert isinstance(outcomes[1], KeyDisabledError)
    assert isinstance(outcomes[2], KeyNotFoundError)
    for changed in outcomes[3:5]:
        assert isinstance(changed, KeyReleaseDeniedError)
        assert changed.rule == "key_changed"
    released = [r.key_id for r in store.audit_records(limit=100) if r.verdict == "released"]
    assert sorted(released) == ["other", "same"]
    assert store.verify_audit()[0]


def test_minimum_versions_are_existing_versions_and_audited(store: SqliteKeyStore) -> None:
    store.create_key("k", POLICY, b"w", now=1.0, audit=_event())
    assert store.get_key("k").min_version == 1
    for missing in (0, 2, -1):
        with pytest.raises(KeyNotFoundError, match="minimum released version must be one of them"):
            store.set_min_version("k", missing, now=2.0, audit=_event("key.min_version"))
    assert store.get_key("k").min_version == 1
    store.add_version("k", lambda version: b"w2", now=2.0, audit=_event("key.rotate"))
    before = store.get_key("k").revision
    store.set_min_version("k", 2, now=3.0, audit=_event("key.min_version"))
    after = store.get_key("k")
    assert (after.min_version, after.versions) == (2, (1, 2))  # retired, still stored
    assert after.revision > before
    record = store.audit_records(limit=100)[-1]
    assert (record.event, record.key_id, record.version, record.seq) == (
        "key.min_version",
        "k",
        2,
        after.revision,
    )
    with pytest.raises(KeyNotFoundError):
        store.set_min_version("nope", 1, now=3.0, audit=_event("key.min_version", "nope"))
    assert store.verify_audit()[0]


# Each schema version's additions, undone newest first: the file an older broker would have left.
_UNDO = {
    3: ("DROP TRIGGER audit_no_release_of_retired_versions", "ALTER TABLE keys DROP COLUMN min_version"),
    2: ("ALTER TABLE keys DROP COLUMN revision",),
}


def _downgrade(path: Path, version: int) -> None:
    with contextlib.closing(sqlite3.connect(path)) as raw:
        for undone in range(SCHEMA_VERSION, version, -1):
            for statement in _UNDO[undone]:
                raw.execute(statement)
        raw.execute(f"PRAGMA user_version = {version}")
        raw.commit()


def test_a_schema_1_database_is_migrated_and_its_keys_get_revisions_on_change(tmp_path: Path) -> None:
    path = tmp_path / "kbs.sqlite"
    store = SqliteKeyStore(path)
    store.create_key("old", POLICY, b"w", now=1.0, audit=_event(key_id="old"))
    store.close()
    _downgrade(path, 1)  # what a version-1 broker left behind
    store = SqliteKeyStore(path)
    try:
        assert store.get_key("old").revision == 0
        store.set_state("old", "disabled", now=2.0, audit=_event("key.disable", "old"))
        assert store.get_key("old").revision > 0
        store.create_key("new", POLICY, b"w", now=3.0, audit=_event(key_id="new"))
        assert store.get_key("new").revision > store.get_key("old").revision
        before = store.get_key("new").revision
        store.add_version("new", lambda version: b"w2", now=4.0, audit=_event("key.rotate", "new"))
        assert store.get_key("new").revision == before  # a rotation keeps it
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3


def _released(key_id: str, version: int) -> AuditEvent:
    return AuditEvent(3.0, "release", "released", key_id=key_id, version=version)


def test_the_database_refuses_a_release_record_of_a_retired_version(store: SqliteKeyStore) -> None:
    """What a broker that does not know minimum versions (schema 2, still running) would write."""
    store.create_key("k", POLICY, b"w", now=1.0, audit=_event())
    store.add_version("k", lambda version: b"w2", now=2.0, audit=_event("key.rotate"))
    store.set_min_version("k", 2, now=3.0, audit=_event("key.min_version"))
    with pytest.raises(StorageError, match="retired key version"):
        store.append_audit(_released("k", 1))  # no release_of guard: the old broker's write
    store.append_audit(_released("k", 2))
    store.append_audit(AuditEvent(3.0, "release", "denied", key_id="k", version=1, rule="version_retired"))
    assert [(r.version, r.verdict) for r in store.audit_records(limit=100)][-2:] == [
        (2, "released"),
        (1, "denied"),
    ]
    assert store.verify_audit()[0]


def test_a_schema_2_database_is_migrated_and_releases_every_version_until_told(tmp_path: Path) -> None:
    path = tmp_path / "kbs.sqlite"
    store = SqliteKeyStore(path)
    store.create_key("old", POLICY, b"w", now=1.0, audit=_event(key_id="old"))
    store.add_version("old", lambda version: b"w2", now=2.0, audit=_event("key.rotate", "old"))
    revision = store.get_key("old").revision
    store.close()
    _downgrade(path, 2)  # what a version-2 broker left behind
    store = SqliteKeyStore(path)
    try:
        old = store.get_key("old")
        assert (old.min_version, old.revision, old.versions) == (1, revision, (1, 2))
        store.set_min_version("old", 2, now=3.0, audit=_event("key.min_version", "old"))
        assert store.get_key("old").min_version == 2
        with pytest.raises(StorageError, match="retired key version"):  # the migration added the trigger
            store.append_audit(_released("old", 1))
        store.create_key("new", POLICY, b"w", now=4.0, audit=_event(key_id="new"))
        assert store.get_key("new").min_version == 1
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
