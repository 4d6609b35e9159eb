"""The key broker's SQLite file: creation, pragmas, schema and schema versioning.

Schema version 3 (``PRAGMA user_version``; ``PRAGMA application_id`` = ``0x656b4253``, "ekBS")::

    meta(name TEXT PK, value BLOB)      root_key_check: HMAC fingerprint of the root key
                                        audit_head: seq (8 bytes big-endian) || hash (32 bytes)
    keys(key_id TEXT PK, state, created_at, updated_at, revision, min_version)
                                        state: enabled | disabled
                                        revision: audit seq of the last create, state, policy or
                                        minimum-version change (never reused, so a re-created key
                                        differs too)
                                        min_version: the oldest version the broker releases; older
                                        versions stay stored (lowering it releases them again)
    key_policies(key_id PK -> keys ON DELETE CASCADE, policy (dump_policy JSON), updated_at)
    key_versions(key_id -> keys ON DELETE CASCADE, version >= 1, wrapped BLOB, created_at,
                 PK(key_id, version))     wrapped = RootKey.wrap(key_id, version, kek)
    tokens(token_hash BLOB PK (SHA-256), name UNIQUE, scopes (JSON list), revoked, created_at)
    nonces(nonce BLOB PK, expires_at REAL)
    audit(seq INTEGER PK AUTOINCREMENT, time, event, key_id, version, verdict, measurement,
          rule, detail, prev_hash BLOB, hash BLOB)              see enclaveml.kms._audit

Version 1 had no ``revision``, version 2 no ``min_version``; opening an older file migrates it
(existing keys get revision 0 and minimum version 1). Stop brokers of an earlier enclaveml before
one of this version opens their database: a schema-1 broker cannot create keys in the new schema
and sets no revisions, and a schema-2 broker does not know minimum versions, so it would release
versions an administrator retired, were it not for a trigger (``audit_no_release_of_retired_versions``)
that refuses the "released" audit record of a retired version, which every release writes before
its key leaves the broker: such a broker's release then fails instead.

Pragmas and why:

* ``journal_mode=WAL``: readers never block the writer, and a crash (even ``kill -9``) mid
  transaction leaves the last committed state.
* ``synchronous=FULL`` on the connection that writes keys, versions, policies, tokens and
  audit records: under NORMAL a power cut may roll back the last commits even in WAL mode;
  losing a key version *after* a data owner wrapped an artifact with it would make that
  artifact unrecoverable, and losing audit rows defeats the audit. The cost is one WAL fsync
  per commit (audit records of concurrent releases share one, see ``_storage.py``).
* ``synchronous=NORMAL`` on a second connection used for release nonces only. WAL with NORMAL
  never corrupts the database and loses nothing on a process crash (``kill -9`` included);
  only a power cut or OS crash may roll back the newest nonce commits, and a lost nonce only
  makes its release fail (a lost *consumption* cannot resurrect a used nonce: see
  ``_storage.py``). Each commit is then a write to the WAL without an fsync.
* ``foreign_keys=ON``: deleting a key cascades to its versions and policy.
* ``secure_delete=ON``: a deleted key's wrapped material is overwritten, not left in free pages.
* ``busy_timeout``: a second process (another broker, the CLI) waits for the lock instead of
  failing at once.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from pathlib import Path
from typing import Literal

from enclaveml.errors import ConfigurationError, StorageError

__all__ = ["SCHEMA_VERSION", "open_connection", "open_database"]

SCHEMA_VERSION = 3
_APPLICATION_ID = 0x656B4253
_BUSY_TIMEOUT_MS = 10_000
_log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE keys (
    key_id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('enabled', 'disabled')),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    min_version INTEGER NOT NULL DEFAULT 1 CHECK (min_version >= 1)
);
CREATE TABLE key_policies (
    key_id TEXT PRIMARY KEY REFERENCES keys(key_id) ON DELETE CASCADE,
    policy TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE key_versions (
    key_id TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    version INTEGER NOT NULL CHECK (version >= 1),
    wrapped BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE tokens (
    token_hash BLOB PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
    created_at REAL NOT NULL
);
CREATE TABLE nonces (nonce BLOB PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX nonces_expiry ON nonces(expires_at);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    event TEXT NOT NULL,
    key_id TEXT,
    version INTEGER,
    verdict TEXT NOT NULL,
    measurement TEXT,
    rule TEXT,
    detail TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
)
"""
# The database itself refuses a "released" audit record for a retired version. Releases write that
# record before any key leaves the broker, so a broker of schema 2 still running on a migrated
# file (it knows nothing of min_version) cannot release a retired version either: its write fails.
_RETIRED_VERSION_TRIGGER = """
CREATE TRIGGER audit_no_release_of_retired_versions BEFORE INSERT ON audit
WHEN NEW.event = 'release' AND NEW.verdict = 'released'
    AND NEW.version < (SELECT min_version FROM keys WHERE key_id = NEW.key_id)
BEGIN
    SELECT RAISE(ABORT, 'release of a retired key version refused');
END
"""
# from-version -> statements upgrading to from-version + 1, each run in the migration transaction.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 1 -> 2: key revisions; existing keys start at 0, their next change sets a real one.
    1: ("ALTER TABLE keys ADD COLUMN revision INTEGER NOT NULL DEFAULT 0",),
    # 2 -> 3: minimum released versions (rollback protection); existing keys release every version.
    2: (
        "ALTER TABLE keys ADD COLUMN min_version INTEGER NOT NULL DEFAULT 1 CHECK (min_version >= 1)",
        _RETIRED_VERSION_TRIGGER,
    ),
}


def open_database(path: Path) -> sqlite3.Connection:
    """Open (creating if needed, mode 0600) and configure the database, migrating its schema.

    The connection is in autocommit mode: callers run explicit ``BEGIN IMMEDIATE`` transactions.
    Its commits are durable (``synchronous=FULL``).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # SQLite creates -wal/-shm with the database file's mode, so 0600 here covers all three.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as exc:
        raise StorageError(f"cannot create key broker database {path}: {exc.strerror}") from exc
    _check_database_files(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open key broker database {path}: {exc}") from exc
    try:
        _configure(conn, path)
        _migrate(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise StorageError(f"key broker database {path} cannot be opened: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _check_database_files(path: Path) -> None:
    """Refuse a database others could have written; make the broker's own files private.

    The database holds the admin tokens' hashes, the release policies and the audit log: whoever
    can write it mints tokens and rewrites policies. A file restored from a backup or created
    beforehand keeps its owner and mode (only a file :func:`open_database` creates is 0600), and
    whoever may write the directory may replace the file or plant a journal. Refused: a
    directory others may write (other than the broker's own groups), and a database file (or its
    -journal/-wal/-shm) owned by another user than this process's or root, or one anyone may
    write. A file of the broker's own with group or other access (Kubernetes' ``fsGroup`` makes
    volume files group-writable at every mount) is set to 0600, with a warning.
    """
    directory = path.parent
    try:
        info = os.stat(directory)
    except OSError as exc:
        raise StorageError(f"cannot stat key broker database directory {directory}: {exc.strerror}") from exc
    me = os.geteuid()
    # Whoever may create files there can plant a -journal (SQLite replays a hot journal into the
    # database at the next open) or -wal, sticky bit or not: only the broker's user, root, and
    # the broker's own groups (Kubernetes' fsGroup) may write the directory.
    if (
        info.st_uid not in (me, 0)
        or info.st_mode & 0o002
        or (info.st_mode & 0o020 and info.st_gid not in {os.getegid(), *os.getgroups()})
    ):
        raise ConfigurationError(
            f"key broker database directory {directory} may be written by other users (owner "
            f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}): they could plant a journal that "
            "SQLite replays into the database; use a directory only the broker's user may write"
        )
    for file in (path, *(path.with_name(path.name + suffix) for suffix in ("-journal", "-wal", "-shm"))):
        try:
            info = os.stat(file)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StorageError(f"cannot stat key broker database file {file}: {exc.strerror}") from exc
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid not in (me, 0):
            raise ConfigurationError(
                f"key broker database file {file} belongs to user {info.st_uid}, who can create admin "
                "tokens and change release policies in it: chown it to the broker's user"
            )
        if mode & 0o002 or (mode & 0o020 and info.st_uid != me):
            raise ConfigurationError(
                f"key broker database file {file} is writable by other users (mode {mode:o}): whoever "
                "can write it can create admin tokens and change release policies; run chmod 600 on it"
            )
        if mode & 0o077 and info.st_uid == me:
            os.chmod(file, 0o600)
            _log.warning("key broker database file %s had mode %o; set it to 600", file, mode)
        elif mode & 0o077:
            _log.warning("key broker database file %s is readable by others (mode %o): chmod 600", file, mode)


def open_connection(
    path: Path, *, synchronous: Literal["FULL", "NORMAL"], query_only: bool = False
) -> sqlite3.Connection:
    """Another connection to a database :func:`open_database` has opened (and migrated).

    ``synchronous="NORMAL"`` is for data whose newest commits may be lost on power loss (see
    the module docstring); ``query_only`` refuses every write on this connection.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open key broker database {path}: {exc}") from exc
    try:
        _configure(conn, path, synchronous)
        if query_only:
            conn.execute("PRAGMA query_only = ON")
    except sqlite3.Error as exc:
        conn.close()
        raise StorageError(f"key broker database {path} cannot be opened: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, path: Path, synchronous: str = "FULL") -> None:
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StorageError(f"cannot switch key broker database {path} to WAL mode (got {mode})")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA secure_delete = ON")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("BEGIN IMMEDIATE")  # two processes opening a new file: only one creates the schema
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
            if tables or app_id not in (0, _APPLICATION_ID):
                raise StorageError(f"{path} is an SQLite database, but not a key broker database")
            for statement in _SCHEMA.split(";"):
                conn.execute(statement)
            conn.execute(_RETIRED_VERSION_TRIGGER)
            conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            version = SCHEMA_VERSION
        elif app_id != _APPLICATION_ID:
            raise StorageError(f"{path} is an SQLite database, but not a key broker database")
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"key broker database {path} has schema version {version}, newer than this "
                f"enclaveml supports ({SCHEMA_VERSION}); upgrade enclaveml"
            )
        while version < SCHEMA_VERSION:
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
            version += 1
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
