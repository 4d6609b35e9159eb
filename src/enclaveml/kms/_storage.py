"""Key broker storage: the :class:`KeyStore` interface and its SQLite implementation.

The store keeps wrapped key material, policies, admin-token hashes, outstanding nonces and
the chained audit log. It never sees a plaintext key: material arrives already wrapped by
the root key (:mod:`enclaveml.kms._rootkey`). Every change and its audit record commit in
one transaction, so a crash (``kill -9`` included) leaves either no trace of a change or the
change and its audit record together. File format, pragmas and schema versioning are in
:mod:`enclaveml.kms._schema`.

Durability, decided per kind of data:

* keys, versions, policies, tokens and **every audit record** (admin changes, wraps, releases
  and denials) commit with ``synchronous=FULL``: once a call returns, the change survives a
  power cut. For releases this is a decision, not a default: the audit record is committed
  *before* the sealed key is returned and is the only trace that a key left the broker, so
  it must not be what a power cut or OS crash takes back while the key lives on in a
  workload. ``synchronous=NORMAL`` would keep it across a process crash but not across those,
  so instead of weakening it, audit appends use *group commit*: the records of concurrent
  releases that queue up behind one fsync are written together in the next FULL
  transaction, and each caller returns only once the commit holding its record is on disk
  (one fsync per batch instead of one per release). A failing batch is retried record by
  record, so a bad record fails only its own caller.
* release nonces commit with ``synchronous=NORMAL`` on a second connection to the same WAL
  database: no fsync per challenge or consumption. A process crash loses nothing; a power
  cut may roll back the newest nonce commits, which is harmless: a lost nonce makes its
  release fail, and a lost *consumption* cannot revive a nonce that served a release, because
  that release's (or denial's) audit record is committed FULL afterwards, and that fsync of
  the WAL also makes every earlier WAL frame durable, the consumption included. A nonce whose
  consumption is lost had no outcome recorded, no key left with it, and it still expires
  after its TTL. Single use does not depend on durability: consumption is a ``DELETE ...
  RETURNING`` in a ``BEGIN IMMEDIATE`` transaction, atomic across threads and across broker
  processes sharing the file.

Connections and locks: this process's writes are serialised by one lock (SQLite allows one
writer at a time anyway, and waiting on a Python lock avoids SQLite's sleeping busy
handler); the FULL and the NORMAL connection both write under it. Reads use a third,
read-only connection with its own lock, each read one snapshot (a WAL read transaction), so
looking up a key never waits for another request's fsync. Other processes (a second broker,
the CLI) are serialised by SQLite's locking, with ``BEGIN IMMEDIATE`` so read-modify-write
transactions never fail on a lock upgrade.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from enclaveml.errors import (
    KeyBrokerError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
    StorageError,
)
from enclaveml.kms._audit import GENESIS_HASH, AuditEvent, AuditRecord, ChainVerdict, verify_chain
from enclaveml.kms._schema import SCHEMA_VERSION, open_connection, open_database

__all__ = [
    "SCHEMA_VERSION",
    "KeyExistsError",
    "KeyStore",
    "NonceStatus",
    "SqliteKeyStore",
    "StoredKey",
    "StoredToken",
    "StoredVersion",
]

_AUDIT_PAGE = 1000


class KeyExistsError(KeyBrokerError):
    """A key with this id already exists (create refuses to overwrite it)."""


class NonceStatus(Enum):
    """Outcome of consuming a release nonce."""

    OK = "ok"
    EXPIRED = "expired"
    UNKNOWN = "unknown"  # never issued, already used, or expired and purged


@dataclass(frozen=True, slots=True)
class StoredKey:
    key_id: str
    state: str
    policy: str
    versions: tuple[int, ...]
    created_at: float
    updated_at: float
    revision: int = 0  # changes with every create, state, policy or minimum-version change (not a rotation)
    min_version: int = 1  # the oldest version released (rollback protection: see KeyBroker.set_min_version)

    @property
    def latest(self) -> int:
        return self.versions[-1]


@dataclass(frozen=True, slots=True)
class StoredVersion:
    key_id: str
    version: int
    wrapped: bytes
    created_at: float

    def __repr__(self) -> str:
        return f"StoredVersion(key_id={self.key_id!r}, version={self.version}, wrapped=<hidden>)"


@dataclass(frozen=True, slots=True)
class StoredToken:
    name: str
    scopes: frozenset[str]
    revoked: bool
    created_at: float


class KeyStore(Protocol):
    """What the broker needs from a database; a server database (PostgreSQL) can follow.

    Mutating methods take the audit event describing the change and must commit both in one
    transaction. Missing keys raise KeyNotFoundError; database failures StorageError.
    """

    def close(self) -> None: ...
    def bind_root_key(self, fingerprint: bytes) -> None: ...
    def create_key(
        self, key_id: str, policy: str, wrapped: bytes, *, now: float, audit: AuditEvent
    ) -> None: ...
    def add_version(
        self, key_id: str, wrap: Callable[[int], bytes], *, now: float, audit: AuditEvent
    ) -> int: ...
    def set_state(self, key_id: str, state: str, *, now: float, audit: AuditEvent) -> None: ...
    def set_policy(self, key_id: str, policy: str, *, now: float, audit: AuditEvent) -> None: ...
    def set_min_version(self, key_id: str, min_version: int, *, now: float, audit: AuditEvent) -> None: ...
    def delete_key(self, key_id: str, *, audit: AuditEvent) -> None: ...
    def get_key(self, key_id: str) -> StoredKey: ...
    def list_keys(self) -> list[StoredKey]: ...
    def get_version(self, key_id: str, version: int | None) -> tuple[StoredKey, StoredVersion]: ...
    def add_nonce(self, nonce: bytes, expires_at: float, *, now: float) -> None: ...
    def consume_nonce(self, nonce: bytes, *, now: float) -> NonceStatus: ...
    def add_token(
        self, token_hash: bytes, name: str, scopes: frozenset[str], *, now: float, audit: AuditEvent
    ) -> None: ...
    def find_token(self, token_hash: bytes) -> StoredToken | None: ...
    def revoke_token(self, name: str, *, audit: AuditEvent) -> None: ...
    def list_tokens(self) -> list[StoredToken]: ...
    def append_audit(self, event: AuditEvent, *, release_of: StoredKey | None = None) -> AuditRecord: ...
    def audit_records(self, *, after: int = 0, limit: int = 100) -> list[AuditRecord]: ...
    def audit_head(self) -> tuple[int, bytes] | None: ...
    def verify_audit(self) -> ChainVerdict: ...
    def count_keys(self) -> int: ...


class _PendingAudit:
    """One audit event waiting for the group commit that writes it."""

    __slots__ = ("error", "event", "record", "release_of")

    def __init__(self, event: AuditEvent, release_of: StoredKey | None) -> None:
        self.event = event
        self.release_of = release_of
        self.record: AuditRecord | None = None
        self.error: Exception | None = None

    @property
    def done(self) -> bool:
        return self.record is not None or self.error is not None

    def result(self) -> AuditRecord:
        if self.record is not None:
            return self.record
        if self.error is not None:
            raise self.error
        raise StorageError("the audit record was not written (its batch was interrupted)")


class SqliteKeyStore:
    """:class:`KeyStore` in one SQLite file (format in :mod:`enclaveml.kms._schema`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()  # this process's writes, on either writing connection
        self._read_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._audit_queue: list[_PendingAudit] = []
        self._conn = open_database(self.path)  # synchronous=FULL: everything but nonces
        try:
            self._nonce_conn = open_connection(self.path, synchronous="NORMAL")
        except BaseException:
            self._conn.close()
            raise
        try:
            self._read_conn = open_connection(self.path, synchronous="FULL", query_only=True)
        except BaseException:
            self._nonce_conn.close()
            self._conn.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StorageError(f"key broker database {self.path}: {what} failed: {exc}") from exc

    @contextlib.contextmanager
    def _tx(self, what: str, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, rolled back on any exception.

        On the durable (FULL) connection unless ``conn`` names the nonce connection.
        """
        db = self._conn if conn is None else conn
        with self._lock, self._errors(what):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        """One read transaction on the read-only connection: all its statements see one snapshot."""
        with self._read_lock, self._errors(what):
            db = self._read_conn
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")  # ends a read transaction: nothing to roll back

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._read_conn.close()
            self._nonce_conn.close()
            self._conn.close()

    def bind_root_key(self, fingerprint: bytes) -> None:
        """Record the root key's fingerprint on first use; refuse a different key afterwards."""
        with self._tx("root key check") as db:
            row = db.execute("SELECT value FROM meta WHERE name = 'root_key_check'").fetchone()
            if row is None:
                if db.execute("SELECT 1 FROM key_versions LIMIT 1").fetchone():
                    # The record of its root key is gone (a lost row, a partial restore, an edit):
                    # binding now would accept any root key and mix keys under two of them.
                    raise StorageError(
                        f"key broker database {self.path} holds keys but no record of the root key "
                        "they were wrapped with; restore the database from a backup"
                    )
                db.execute("INSERT INTO meta(name, value) VALUES ('root_key_check', ?)", (fingerprint,))
            elif not hmac.compare_digest(bytes(row[0]), fingerprint):
                raise StorageError(
                    f"the root key does not match the one key broker database {self.path} was created "
                    "with; start the broker with the original root key (keys wrapped under another "
                    "root key cannot be unwrapped)"
                )

    # -- keys -------------------------------------------------------------------------------------

    def create_key(self, key_id: str, policy: str, wrapped: bytes, *, now: float, audit: AuditEvent) -> None:
        with self._tx("create key") as db:
            if db.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone():
                raise KeyExistsError(f"key {key_id!r} already exists; rotate it or pick another id")
            db.execute(
                "INSERT INTO keys (key_id, state, created_at, updated_at) VALUES (?, 'enabled', ?, ?)",
                (key_id, now, now),
            )
            db.execute("INSERT INTO key_policies VALUES (?, ?, ?)", (key_id, policy, now))
            db.execute("INSERT INTO key_versions VALUES (?, 1, ?, ?)", (key_id, wrapped, now))
            self._revise(db, key_id, self._append(db, replace(audit, version=1)))

    def add_version(self, key_id: str, wrap: Callable[[int], bytes], *, now: float, audit: AuditEvent) -> int:
        """Add the next version; ``wrap(version)`` returns its wrapped material (the AAD needs the number)."""
        with self._tx("rotate key") as db:
            self._require(db, key_id)
            latest = db.execute(
                "SELECT max(version) FROM key_versions WHERE key_id = ?", (key_id,)
            ).fetchone()
            version = int(latest[0] or 0) + 1
            db.execute("INSERT INTO key_versions VALUES (?, ?, ?, ?)", (key_id, version, wrap(version), now))
            db.execute("UPDATE keys SET updated_at = ? WHERE key_id = ?", (now, key_id))
            self._append(db, replace(audit, version=version))
            return version

    def set_state(self, key_id: str, state: str, *, now: float, audit: AuditEvent) -> None:
        with self._tx("set key state") as db:
            self._require(db, key_id)
            db.execute("UPDATE keys SET state = ?, updated_at = ? WHERE key_id = ?", (state, now, key_id))
            self._revise(db, key_id, self._append(db, audit))

    def set_policy(self, key_id: str, policy: str, *, now: float, audit: AuditEvent) -> None:
        with self._tx("set policy") as db:
            self._require(db, key_id)
            db.execute(
                "UPDATE key_policies SET policy = ?, updated_at = ? WHERE key_id = ?", (policy, now, key_id)
            )
            db.execute("UPDATE keys SET updated_at = ? WHERE key_id = ?", (now, key_id))
            self._revise(db, key_id, self._append(db, audit))

    def set_min_version(self, key_id: str, min_version: int, *, now: float, audit: AuditEvent) -> None:
        """Release only versions >= ``min_version`` (which must exist: the latest stays releasable)."""
        with self._tx("set minimum version") as db:
            key = self._load_key(db, key_id)
            if min_version not in key.versions:
                raise KeyNotFoundError(
                    f"key {key_id!r} has no version {min_version} (versions: {list(key.versions)}); "
                    "the minimum released version must be one of them"
                )
            db.execute(
                "UPDATE keys SET min_version = ?, updated_at = ? WHERE key_id = ?", (min_version, now, key_id)
            )
            self._revise(db, key_id, self._append(db, replace(audit, version=min_version)))

    @staticmethod
    def _revise(db: sqlite3.Connection, key_id: str, change: AuditRecord) -> None:
        """Give the key a new revision: the sequence number of the audit record of this change."""
        db.execute("UPDATE keys SET revision = ? WHERE key_id = ?", (change.seq, key_id))

    def delete_key(self, key_id: str, *, audit: AuditEvent) -> None:
        with self._tx("delete key") as db:
            self._require(db, key_id)
            db.execute("DELETE FROM keys WHERE key_id = ?", (key_id,))  # versions and policy cascade
            self._append(db, audit)

    def get_key(self, key_id: str) -> StoredKey:
        with self._read("read key") as db:
            return self._load_key(db, key_id)

    def list_keys(self) -> list[StoredKey]:
        with self._read("list keys") as db:
            ids = [row[0] for row in db.execute("SELECT key_id FROM keys ORDER BY key_id").fetchall()]
            return [self._load_key(db, key_id) for key_id in ids]

    def get_version(self, key_id: str, version: int | None) -> tuple[StoredKey, StoredVersion]:
        """The key and one version (``None``: the latest), read together under the lock."""
        with self._read("read key version") as db:
            key = self._load_key(db, key_id)
            number = key.latest if version is None else version
            row = db.execute(
                "SELECT wrapped, created_at FROM key_versions WHERE key_id = ? AND version = ?",
                (key_id, number),
            ).fetchone()
        if row is None:
            # (Not the list of versions: releases ask this without a token, listing keys needs one.)
            raise KeyNotFoundError(f"key {key_id!r} has no version {number}")
        return key, StoredVersion(key_id, number, bytes(row[0]), float(row[1]))

    def count_keys(self) -> int:
        with self._read("count keys") as db:
            return int(db.execute("SELECT count(*) FROM keys").fetchone()[0])

    @staticmethod
    def _load_key(db: sqlite3.Connection, key_id: str) -> StoredKey:
        row = db.execute(
            "SELECT k.state, p.policy, k.created_at, k.updated_at, k.revision, k.min_version FROM keys k "
            "JOIN key_policies p USING (key_id) WHERE k.key_id = ?",
            (key_id,),
        ).fetchone()
        if row is None:
            raise KeyNotFoundError(f"no key {key_id!r} at this broker")
        query = "SELECT version FROM key_versions WHERE key_id = ? ORDER BY version"
        versions = tuple(int(r[0]) for r in db.execute(query, (key_id,)).fetchall())
        if not versions:
            raise StorageError(f"key {key_id!r} has no versions: the database is inconsistent")
        return StoredKey(
            key_id, str(row[0]), str(row[1]), versions, float(row[2]), float(row[3]), int(row[4]), int(row[5])
        )

    @staticmethod
    def _require(db: sqlite3.Connection, key_id: str) -> None:
        if db.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone() is None:
            raise KeyNotFoundError(f"no key {key_id!r} at this broker")

    # -- nonces -----------------------------------------------------------------------------------

    # Nonces commit on the synchronous=NORMAL connection (the module docstring says why that
    # is safe). Atomicity, hence single use, is the same on either connection.

    def add_nonce(self, nonce: bytes, expires_at: float, *, now: float) -> None:
        """Store a fresh nonce and purge expired ones (so the table stays small)."""
        with self._tx("store nonce", self._nonce_conn) as db:
            db.execute("DELETE FROM nonces WHERE expires_at <= ?", (now,))
            db.execute("INSERT INTO nonces VALUES (?, ?)", (nonce, expires_at))

    def consume_nonce(self, nonce: bytes, *, now: float) -> NonceStatus:
        """Delete the nonce atomically (single use even if the release then fails) and judge it."""
        with self._tx("consume nonce", self._nonce_conn) as db:
            rows = db.execute("DELETE FROM nonces WHERE nonce = ? RETURNING expires_at", (nonce,)).fetchall()
        if not rows:
            return NonceStatus.UNKNOWN
        return NonceStatus.OK if now < float(rows[0][0]) else NonceStatus.EXPIRED

    # -- tokens -----------------------------------------------------------------------------------

    def add_token(
        self, token_hash: bytes, name: str, scopes: frozenset[str], *, now: float, audit: AuditEvent
    ) -> None:
        with self._tx("create token") as db:
            if db.execute("SELECT 1 FROM tokens WHERE name = ?", (name,)).fetchone():
                raise KeyExistsError(f"a token named {name!r} already exists; revoke it or pick another name")
            scope_list = json.dumps(sorted(scopes))
            db.execute("INSERT INTO tokens VALUES (?, ?, ?, 0, ?)", (token_hash, name, scope_list, now))
            self._append(db, audit)

    def find_token(self, token_hash: bytes) -> StoredToken | None:
        with self._read("read token") as db:
            row = db.execute(
                "SELECT name, scopes, revoked, created_at FROM tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        return None if row is None else _token(row)

    def revoke_token(self, name: str, *, audit: AuditEvent) -> None:
        with self._tx("revoke token") as db:
            if db.execute("UPDATE tokens SET revoked = 1 WHERE name = ?", (name,)).rowcount == 0:
                raise KeyNotFoundError(f"no admin token named {name!r}")
            self._append(db, audit)

    def list_tokens(self) -> list[StoredToken]:
        with self._read("list tokens") as db:
            rows = db.execute("SELECT name, scopes, revoked, created_at FROM tokens ORDER BY name").fetchall()
        return [_token(row) for row in rows]

    # -- audit ------------------------------------------------------------------------------------

    def append_audit(self, event: AuditEvent, *, release_of: StoredKey | None = None) -> AuditRecord:
        """Chain and durably commit ``event``; returns once the commit holding it is on disk.

        Group commit: the event joins a queue, and whoever holds the write lock next writes
        every queued event in one FULL transaction, so concurrent callers share one fsync.

        ``release_of`` is the key as read for a release that this event records: the event is
        written only if, in the committing transaction, the key is still enabled under the same
        policy and revision. Otherwise nothing is written and the refusal is raised
        (KeyDisabledError, KeyNotFoundError, or KeyReleaseDeniedError rule ``key_changed``), so a
        disable, delete or policy change that has returned stops every release not yet recorded.
        """
        pending = _PendingAudit(event, release_of)
        with self._queue_lock:
            self._audit_queue.append(pending)
        with self._lock:
            if not pending.done:  # nobody took it yet: lead a batch with whatever is queued
                with self._queue_lock:
                    batch, self._audit_queue = self._audit_queue, []
                self._commit_audit(batch)
        return pending.result()

    def _commit_audit(self, batch: list[_PendingAudit]) -> None:
        """Commit ``batch`` in one transaction, or else each record alone (the caller holds the lock)."""
        try:
            with self._tx("append audit records") as db:
                admitted = [p for p in batch if self._still_releasable(db, p)]
                records = self._append_all(db, [p.event for p in admitted]) if admitted else []
        except Exception as exc:  # noqa: BLE001 - handed to the callers waiting for these records
            if len(batch) == 1:
                batch[0].error = exc
                return
            for pending in batch:
                pending.error = None
                try:
                    with self._tx("append audit record") as db:
                        if self._still_releasable(db, pending):
                            pending.record = self._append(db, pending.event)
                except Exception as single:  # noqa: BLE001 - handed to this record's caller
                    pending.error = single
            return
        for pending, record in zip(admitted, records, strict=True):
            pending.record = record

    @staticmethod
    def _still_releasable(db: sqlite3.Connection, pending: _PendingAudit) -> bool:
        """False (and the refusal as the pending's error) if its release's key changed since it was read.

        Any create, state, policy or minimum-version change gives the key a new revision (a
        rotation does not), so a key disabled and enabled again, or deleted and created anew, does
        not pass either, nor a release of a version retired meanwhile.
        """
        key = pending.release_of
        if key is None:
            return True
        # The policy is compared too: a broker of schema 1 still running on this file changes
        # policies without a revision.
        row = db.execute(
            "SELECT k.state, k.revision, p.policy FROM keys k JOIN key_policies p USING (key_id) "
            "WHERE k.key_id = ?",
            (key.key_id,),
        ).fetchone()
        if row is None:
            pending.error = KeyNotFoundError(
                f"key {key.key_id!r} was deleted during the release; nothing is released"
            )
        elif str(row[0]) != "enabled":
            pending.error = KeyDisabledError(
                f"key {key.key_id!r} was disabled during the release; nothing is released"
            )
        elif int(row[1]) != key.revision or str(row[2]) != key.policy:
            pending.error = KeyReleaseDeniedError(
                f"key {key.key_id!r} was changed (policy, state, minimum version, or deleted and created "
                "again) during the release; nothing is released: request a new challenge",
                rule="key_changed",
                observed=f"revision {int(row[1])}",
                expected=f"revision {key.revision}, as read for the release",
            )
        return pending.error is None

    def _append(self, db: sqlite3.Connection, event: AuditEvent) -> AuditRecord:
        """Chain ``event`` after the stored head, inside the caller's transaction."""
        return self._append_all(db, [event])[0]

    @staticmethod
    def _append_all(db: sqlite3.Connection, events: list[AuditEvent]) -> list[AuditRecord]:
        """Chain ``events`` in order after the stored head, inside the caller's transaction."""
        head = _head(db)
        prev_seq, prev_hash = head if head is not None else (0, GENESIS_HASH)
        # Never reuse a number, even if rows after the head were deleted.
        top = int(db.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()[0])
        seq = max(top, prev_seq)
        records = []
        for event in events:
            seq += 1
            record = AuditRecord.seal(seq, event, prev_hash)
            records.append(record)
            prev_hash = record.hash
        db.executemany(
            "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.seq, r.time, r.event, r.key_id, r.version, r.verdict,
                    r.measurement, r.rule, r.detail, r.prev_hash, r.hash,
                )
                for r in records
            ],
        )  # fmt: skip
        last = records[-1]
        db.execute(
            "INSERT OR REPLACE INTO meta(name, value) VALUES ('audit_head', ?)",
            (last.seq.to_bytes(8, "big") + last.hash,),
        )
        return records

    def audit_head(self) -> tuple[int, bytes] | None:
        with self._read("read audit head") as db:
            return _head(db)

    def audit_records(self, *, after: int = 0, limit: int = 100) -> list[AuditRecord]:
        with self._read("read audit log") as db:
            rows = db.execute(
                "SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
        return [_record(row) for row in rows]

    def verify_audit(self) -> ChainVerdict:
        """Verify the whole chain and its head on one snapshot, without blocking the broker.

        A separate read connection holds a WAL snapshot while records stream page by page, so
        records appended meanwhile neither wait for the check nor confuse the head comparison.
        """
        with self._errors("verify audit log"):
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.execute("BEGIN")
                head = _head(conn)
                return verify_chain(_stream_audit(conn), head=head)
            finally:
                conn.close()


def _head(db: sqlite3.Connection) -> tuple[int, bytes] | None:
    row = db.execute("SELECT value FROM meta WHERE name = 'audit_head'").fetchone()
    if row is None:
        return None
    value = bytes(row[0])
    return int.from_bytes(value[:8], "big"), value[8:]


def _stream_audit(conn: sqlite3.Connection) -> Iterator[AuditRecord]:
    after = 0
    while page := conn.execute(
        "SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, _AUDIT_PAGE)
    ).fetchall():
        for row in page:
            yield _record(row)
        after = int(page[-1][0])


def _token(row: Any) -> StoredToken:
    scopes = json.loads(row[1])
    return StoredToken(str(row[0]), frozenset(str(s) for s in scopes), bool(row[2]), float(row[3]))


def _record(row: Any) -> AuditRecord:
    seq, time, event, key_id, version, verdict, measurement, rule, detail, prev_hash, hash_ = row
    return AuditRecord(
        seq=int(seq),
        time=float(time),
        event=str(event),
        key_id=key_id,
        version=version,
        verdict=str(verdict),
        measurement=measurement,
        rule=rule,
        detail=str(detail),
        prev_hash=bytes(prev_hash),
        hash=bytes(hash_),
    )
